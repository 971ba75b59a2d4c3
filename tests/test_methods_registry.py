"""The method modules' registry entries (cocoop / maple / dept, alone, +atprompt, +anchoropt) and ATPrompt under them:
build, train one step through the registry's loss, score with the named heads, save / load; the deep text pass
against a block-by-block reference; CoCoOp's bias only on the class context."""

from __future__ import annotations

import pytest
import torch

import anchoropt.methods  # noqa: F401  (registers the entries)
import peer_fakes as pf
from anchoropt.methods import registry
from anchoropt import testing
from anchoropt.methods import CoCoOp, MaPLe
from anchoropt.methods.entries import PRESET_METHOD

B = 3
NAMES = [f"{base}{suffix}" for base in ("cocoop", "maple", "dept") for suffix in ("", "+atprompt", "+anchoropt")]


@pytest.fixture(scope="module")
def model():
    return testing.tiny_open_clip(layers=3, vision_layers=3).requires_grad_(False)


def _settings(name: str) -> registry.MethodSettings:
    extra = {}
    if name.endswith("+anchoropt"):
        extra["anchors"] = torch.randn(1, 64)
    if name.endswith("+atprompt"):
        extra["attributes"] = ("color", "playfulness")  # "playfulness" is several BPE tokens: kept whole
    return registry.MethodSettings(n_soft=2, deep_depth=2, tokenizer=pf.tokenize, **extra)


def _inputs(method: registry.Method) -> torch.Tensor:
    return pf.images(B) if method.image_input == "images" else torch.randn(B, 32)


def test_all_nine_entries_are_registered() -> None:
    assert set(NAMES) <= set(registry.available_methods())
    assert set(PRESET_METHOD) == set(NAMES)
    assert registry.get_method("maple").image_input == "images"
    assert registry.get_method("cocoop+anchoropt").needs_anchors
    assert registry.get_method("dept").head(seen=False) == "similarity"
    assert registry.get_method("dept+anchoropt").head(seen=False) == "ensemble"
    choice = registry.parse_method("cocoop+anchoropt:tau=0.5,n_soft=8")
    assert choice.options == {"tau": 0.5, "n_soft": 8}
    with pytest.raises(ValueError, match="no option"):
        registry.parse_method("dept:kd_weight=5")  # DePT (+AnchorOPT) trains without distillation


@pytest.mark.parametrize("name", NAMES)
def test_train_score_save_and_load_through_the_registry(name, model, tmp_path) -> None:
    method, settings = registry.get_method(name), _settings(name)
    learner = method.build(model, pf.BASE, settings).train()
    x, labels = _inputs(method), torch.tensor([0, 3, 1])
    loss = method.loss(settings)(learner(x), labels)
    loss.backward()
    assert torch.isfinite(loss)
    trained = [p for p in learner.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained if p is learner.text.ctx)
    learner.eval()
    heads = learner.heads(x)
    assert {method.head(seen=True), method.head(seen=False)} <= set(heads)
    choice = registry.parse_method(name)
    registry.save_learner(learner, choice, settings, tmp_path / "learner")
    again, _ = registry.load_learner(tmp_path / "learner", model, pf.BASE, tokenizer=pf.tokenize)
    again.eval()
    torch.manual_seed(0)
    expected = learner.heads(x)[method.head(seen=True)]
    torch.manual_seed(0)
    torch.testing.assert_close(again.heads(x)[method.head(seen=True)], expected)
    learner.set_classnames(pf.NOVEL)
    assert learner.heads(x)[method.head(seen=False)].shape == (B, len(pf.NOVEL))


def test_a_missing_attribute_list_or_anchors_is_named(model) -> None:
    with pytest.raises(ValueError, match="attribute words"):
        registry.get_method("maple+atprompt").build(model, pf.BASE, registry.MethodSettings())
    with pytest.raises(ValueError, match="anchors"):
        registry.get_method("dept+anchoropt").build(model, pf.BASE, registry.MethodSettings())


def _reference_deep_text(model, ours: MaPLe) -> torch.Tensor:
    """MaPLe's deep text pass written out: before blocks 1..J the M class-context rows get that layer's prompts."""
    text, layout = ours.text, ours.text.layout
    start = layout.slot_positions[-text.n_ctx]
    with torch.no_grad():
        x = text.template.fill(layout, text.slots()) + model.positional_embedding[: layout.embeddings.shape[1]]
        mask = model.attn_mask[: x.shape[1], : x.shape[1]]
        for i, block in enumerate(model.transformer.resblocks):
            if 1 <= i <= text.deep_prompts.shape[0]:
                x = x.clone()
                x[:, start : start + text.n_ctx] = text.deep_prompts[i - 1]
            x = block(x, attn_mask=mask)
        x = model.ln_final(x)
        return x[torch.arange(x.shape[0]), layout.pool_index] @ model.text_projection


@pytest.mark.parametrize("template", ["coop", "atprompt"])
def test_deep_text_pass_equals_a_block_by_block_reference(template, model) -> None:
    attrs = {"attributes": ("color", "playfulness")} if template == "atprompt" else {}
    ours = MaPLe(model, pf.BASE, template=template, n_ctx=2, prompt_depth=3, **attrs).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.text.features(), _reference_deep_text(model, ours), atol=1e-5, rtol=1e-4)


def test_cocoop_atprompt_shifts_only_the_class_context(model) -> None:
    ours = CoCoOp(model, pf.BASE, template="atprompt", n_ctx=2, attributes=("color",)).eval()
    n_attr = ours.text.learner.attribute_soft.shape[0]
    assert ours.text.layout.n_slots == n_attr + 2
    feats = torch.randn(B, 32)
    with torch.no_grad():
        bias = ours.meta_net(torch.nn.functional.normalize(feats, dim=-1))
        slots = ours.text.slots(ours.text.ctx[None] + bias[:, None])  # (B, K, D)
        assert torch.equal(slots[:, :n_attr], ours.text.learner.attribute_soft.expand(B, -1, -1))
        torch.testing.assert_close(slots[:, n_attr:], ours.text.ctx + bias[:, None])
        plain = ours.text.template.encode(ours.text.layout, ours.text.template.fill(ours.text.layout, slots[1]))
        torch.testing.assert_close(ours.text_features(feats)[1], torch.nn.functional.normalize(plain, dim=-1),
                                   atol=1e-5, rtol=1e-4)


def test_released_settings() -> None:
    from anchoropt.methods.entries import released_settings

    assert released_settings("maple")["deep_depth"] == 8 and released_settings("maple")["n_soft"] == 2
    assert released_settings("maple")["soft_init"] == "a photo of a" and "soft_init" not in released_settings(
        "maple+anchoropt")  # MaPLe's CTX_INIT; the released +AnchorOPT trainer ignores it
    pets = released_settings("cocoop+anchoropt", "OxfordPets")  # the AnchorOPT CoCoOp table: 4/20/10/100/2.0
    assert (pets["n_soft"], pets["epochs"], pets["ce_weight"], pets["kd_weight"], pets["kd_temperature"],
            pets["batch_size"]) == (4, 20, 10.0, 100.0, 2.0, 1)
    assert released_settings("dept+anchoropt", "eurosat")["lp_weight"] == 0.9
    cars = released_settings("dept+atprompt", "stanford_cars")
    assert (cars["n_soft"], cars["lp_weight"], cars["attributes"]) == (2, 0.6, ("luxury",))
    assert released_settings("maple+atprompt", "ucf101")["n_soft"] == 2
    with pytest.raises(KeyError, match="no released settings"):
        released_settings("kgcoop")
