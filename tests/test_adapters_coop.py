"""CoOp shim against the CoOp contract fakes: slot placement, true-EOT pooling, gradients, the peer's optimizer,
exact removal, precisions, base -> novel reload through Dassl's load_model path, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peer_fakes as pf
from anchoropt import functional, save_anchors
from anchoropt.adapters import CHILD_NAME, coop, find
from anchoropt.adapters.base import AnchorOPTInjection

M, N = 4, 1


def _anchors(clip_model, word: str = "a") -> torch.Tensor:
    return pf.word_embedding(clip_model, word)[:1]


def _build(prec="fp32", classnames=pf.BASE, patch_opts=None, **cfg_opts):
    clip_model = pf.tiny_clip(prec)
    cfg = pf.make_cfg("coop", prec=prec, **cfg_opts)
    with coop.patch(pf.coop, anchors=_anchors(clip_model), **(patch_opts or {})):
        model, optim, registered = pf.build_model("coop", cfg, classnames, clip_model)
    return model, optim, clip_model


def _set_arrangement(injection: AnchorOPTInjection, order: list[int]) -> None:
    """Position logits whose evaluation argmax puts source ``order[i]`` at slot ``i``."""
    with torch.no_grad():
        injection.position.logits.fill_(-5.0)
        injection.position.logits[torch.arange(len(order)), torch.tensor(order)] = 5.0


# ---------------------------------------------------------------------- the rewritten prompt
def test_anchor_sits_at_the_slot_the_position_matrix_chose() -> None:
    model, _, _ = _build()
    pl, h = model.prompt_learner, find(model)
    order = [1, 0, M, 3, 2]  # slot 2 takes the anchor
    _set_arrangement(h, order)
    model.eval()
    with torch.no_grad():
        prompts = pl()
    sources = torch.cat([pl.ctx, h.anchors.to(pl.ctx.dtype)])
    assert prompts.shape == (len(pf.BASE), 77, 64)  # length stays 77
    for slot, source in enumerate(order):
        assert torch.equal(prompts[:, 1 + slot], sources[source].expand(len(pf.BASE), -1))
    assert torch.equal(prompts[:, :1], pl.token_prefix)
    assert torch.equal(prompts[:, 1 + M + N :], pl.token_suffix[:, :-N])  # class . EOT, N pads dropped
    assert h.describe() == ["soft2", "soft1", "anchor1", "soft4", "soft3"]


def test_training_draws_one_hard_matrix_per_call_shared_by_all_classes() -> None:
    model, _, _ = _build()
    pl, h = model.prompt_learner, find(model)
    model.train()
    sources = torch.cat([pl.ctx.detach(), h.anchors])
    for _ in range(3):
        slots = pl()[:, 1 : 1 + M + N].detach()
        picked = (slots[:, :, None] == sources[None, None]).all(-1)  # (C, K, K): slot == source, exactly
        assert bool((picked.sum(-1) >= 1).all())  # every slot is exactly one source token (hard rows)
        assert bool((picked == picked[:1]).all())  # the same arrangement for every class


def test_pooling_reads_the_true_eot_like_the_real_sentence() -> None:
    """ctx = "a photo of", anchor = "a", anchor after the soft tokens: the prompt *is* "a photo of a {class}."."""
    clip_model = pf.tiny_clip("fp32")
    cfg = pf.make_cfg("coop", ctx_init="a photo of")
    model = pf.coop.CustomCLIP(cfg, pf.BASE, clip_model)
    ids_before = model.tokenized_prompts
    h = coop.wrap(model.prompt_learner, clip_model=clip_model, classnames=pf.BASE, anchors=_anchors(clip_model),
                  owner=model, arrangement="anchor_after")
    assert model.tokenized_prompts is ids_before is model.prompt_learner.tokenized_prompts  # updated in place
    real = pf.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in pf.BASE])
    assert torch.equal(model.tokenized_prompts.argmax(-1), real.argmax(-1))
    model.eval()
    with torch.no_grad():
        ours = model.text_encoder(model.prompt_learner(), model.tokenized_prompts)
        reference = clip_model.encode_text(real.long())
        stale = model.text_encoder(model.prompt_learner(), h._id_tensors[0][1])  # the unshifted ids
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(stale, reference, atol=1e-3)  # pooling one row early reads "." instead


def test_anchor_prompt_features_equal_the_real_anchor_sentence() -> None:
    clip_model = pf.tiny_clip("fp32")
    model = pf.coop.CustomCLIP(pf.make_cfg("coop"), pf.BASE, clip_model)
    h = coop.wrap(model.prompt_learner, clip_model=clip_model, classnames=pf.BASE, anchors=_anchors(clip_model, "a"))
    real = pf.tokenize([f"a of {c.replace('_', ' ')}." for c in pf.BASE]).long()
    with torch.no_grad():
        reference = F.normalize(clip_model.encode_text(real).float(), dim=-1)
    torch.testing.assert_close(h.anchor_text_features(), reference, atol=1e-5, rtol=1e-5)
    assert h.anchor_text_features() is h.anchor_text_features()  # computed once, cached


def test_class_specific_contexts() -> None:
    model, _, _ = _build(csc=True)
    pl, h = model.prompt_learner, find(model)
    assert pl.ctx.shape == (len(pf.BASE), M, 64)
    _set_arrangement(h, [M, 0, 1, 2, 3])
    model.eval()
    with torch.no_grad():
        prompts = pl()
    assert torch.equal(prompts[:, 1], h.anchors.expand(len(pf.BASE), -1))
    assert torch.equal(prompts[:, 2 : 2 + M], pl.ctx)


def test_arrangement_shows_a_missing_anchor_and_a_repeated_slot() -> None:
    model, _, _ = _build()
    h = find(model)
    _set_arrangement(h, [0, 1, 2, 3, 4])
    assert h.arrangement() == {"slots": ["soft1", "soft2", "soft3", "soft4", "anchor1"], "missing": [], "repeated": []}
    _set_arrangement(h, [0, 0, 1, 2, 3])  # row-wise argmax: soft1 twice, the anchor nowhere
    got = h.arrangement()
    assert got["missing"] == ["anchor1"] and got["repeated"] == ["soft1"]
    model.eval()
    with torch.no_grad():
        prompts = model.prompt_learner()
    assert torch.equal(prompts[:, 1], prompts[:, 2])  # what evaluation really runs: soft1 in slots 1 and 2


def test_class_specific_context_reload_for_other_classes_names_csc() -> None:
    model, _, _ = _build(csc=True)
    saved = model.prompt_learner.state_dict()  # CoOp registers the prompt learner
    novel, _, _ = _build(csc=True, classnames=pf.NOVEL, subsample="new")
    with pytest.raises(ValueError, match=r"CSC=True.*4 classes.*3 classes"):
        pf.dassl_load(novel.prompt_learner, saved)  # Dassl's load_model path
    same, _, _ = _build(csc=True)
    pf.dassl_load(same.prompt_learner, saved)  # the same classes reload as before
    assert torch.equal(same.prompt_learner.ctx, model.prompt_learner.ctx)
    find(novel).remove()
    with pytest.raises(RuntimeError, match="size mismatch for ctx"):  # the check goes with the shim
        pf.dassl_load(novel.prompt_learner, saved)


# ---------------------------------------------------------------------- training the peer's way
def test_gradients_reach_soft_tokens_and_position_logits_through_the_peer_optimizer() -> None:
    model, optim, _ = _build()
    pl, h = model.prompt_learner, find(model)
    in_optim = {id(p) for group in optim.param_groups for p in group["params"]}
    assert id(h.position.logits) in in_optim and id(pl.ctx) in in_optim
    assert h.position.logits.requires_grad and h.position.logits.dtype == torch.float32
    assert "anchoropt.anchors" in pl.state_dict() and not any(p is h.anchors for p in pl.parameters())
    names = [n for n, _ in model.named_parameters()]
    assert "prompt_learner.anchoropt.position.logits" in names  # found by the peers' name filters

    model.train()
    logits_before, anchors_before = h.position.logits.detach().clone(), h.anchors.clone()
    labels = torch.tensor([0, 3])
    output = model(pf.images())
    loss = h.loss(labels, logits=output)
    optim.zero_grad()
    loss.backward()
    assert pl.ctx.grad.abs().sum() > 0 and h.position.logits.grad.abs().sum() > 0
    optim.step()
    assert not torch.equal(h.position.logits, logits_before)
    assert torch.equal(h.anchors, anchors_before)  # frozen


def test_loss_is_the_stage_ii_objective() -> None:
    model, _, _ = _build(patch_opts={"kd_weight": 3.0, "kd_temperature": 2.0, "kd_normalization": "released"})
    h = find(model)
    model.train()
    labels = torch.tensor([1, 2])
    output = model(pf.images())
    expected = functional.anchoropt_loss(output, h.anchor_logits(), labels, ce_weight=1.0, kd_weight=3.0,
                                         temperature=2.0, kd_normalization="released")
    torch.testing.assert_close(h.loss(labels, logits=output), expected)
    torch.testing.assert_close(h.normal_logits(), output.float(), atol=1e-4, rtol=1e-4)  # rebuilt from captures
    torch.testing.assert_close(h.loss(labels), expected, atol=1e-4, rtol=1e-4)
    assert h.loss(labels, base_loss=torch.tensor(0.5)) > 0.5 * h.loss_config.ce_weight  # + KD


def test_predict_switches_between_normal_and_ensemble() -> None:
    model, _, _ = _build()
    h = find(model)
    model.eval()
    with torch.no_grad():
        logits = model(pf.images())
    assert h.predict(logits) is logits  # base mode
    novel = h.set_mode("novel").predict(logits)
    torch.testing.assert_close(novel, (logits.float() + h.anchor_logits()) / 2)
    with pytest.raises(ValueError, match="unknown mode"):
        h.set_mode("new")


# ---------------------------------------------------------------------- removal
@pytest.mark.parametrize("how", ["wrap", "patch"])
def test_remove_restores_the_original_outputs_exactly(how) -> None:
    clip_model = pf.tiny_clip("fp32")
    cfg = pf.make_cfg("coop")
    model = pf.coop.CustomCLIP(cfg, pf.BASE, clip_model).eval()
    pl = model.prompt_learner
    image = pf.images()
    with torch.no_grad():
        logits_before, prompts_before = model(image), pl()
    ids_before, keys_before = pl.tokenized_prompts.clone(), list(pl.state_dict())
    if how == "wrap":
        h = coop.wrap(pl, clip_model=clip_model, classnames=pf.BASE, anchors=_anchors(clip_model), owner=model)
    else:
        with coop.patch(pf.coop, anchors=_anchors(clip_model)) as patch:
            other = pf.coop.CustomCLIP(cfg, pf.BASE, clip_model)
        assert pf.coop.PromptLearner is pf.CoOpPromptLearner  # the context manager restored the class
        with torch.no_grad():
            other.prompt_learner.ctx.copy_(pl.ctx)  # the same learned context as the plain model
        h, model, pl = patch.injections[0], other.eval(), other.prompt_learner
    with torch.no_grad():
        assert not torch.equal(model(image), logits_before)
    h.remove()
    with torch.no_grad():
        assert torch.equal(model(image), logits_before)
        assert torch.equal(pl(), prompts_before)
    assert torch.equal(pl.tokenized_prompts, ids_before) and model.tokenized_prompts is pl.tokenized_prompts
    assert list(pl.state_dict()) == keys_before and not hasattr(pl, CHILD_NAME)
    assert h.removed and h.prompt_learner is None
    h.remove()  # idempotent


# ---------------------------------------------------------------------- precisions
@pytest.mark.parametrize("prec", ["fp16", "fp32", "amp"])
def test_precisions_train_and_evaluate(prec) -> None:
    """fp16: pure half CLIP and half ctx (plain SGD); fp32; amp: fp32 weights under autocast (bf16 on CPU)."""
    model, optim, _ = _build(prec)
    pl, h = model.prompt_learner, find(model)
    assert pl.ctx.dtype == (torch.float16 if prec == "fp16" else torch.float32)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "amp")
    model.train()
    with autocast:
        output = model(pf.images())
        loss = h.loss(torch.tensor([0, 1]), logits=output)
    optim.zero_grad()
    loss.backward()
    optim.step()
    assert torch.isfinite(loss) and torch.isfinite(h.position.logits.grad).all()
    assert h.position.logits.dtype == torch.float32 and h.anchors.dtype == torch.float32  # ours stay fp32
    assert torch.isfinite(pl.ctx).all()
    model.eval()
    with torch.no_grad(), autocast:
        logits = h.set_mode("novel").predict(model(pf.images()))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# ---------------------------------------------------------------------- checkpoints
def test_base_to_novel_reload_through_dassl_load_model(tmp_path) -> None:
    model, optim, clip_model = _build()
    h = find(model)
    _set_arrangement(h, [0, M, 1, 2, 3])
    model.train()
    loss = h.loss(torch.tensor([0, 3]), logits=model(pf.images()))
    loss.backward()
    optim.step()
    saved = {k: v.clone() for k, v in model.prompt_learner.state_dict().items()}  # register_model("prompt_learner")
    torch.save({"state_dict": saved}, tmp_path / "model.pth.tar")

    # evaluation run: novel classes (another n_cls), fresh anchors, built the same way, then load_model
    clip_novel = pf.tiny_clip("fp32")
    cfg = pf.make_cfg("coop", subsample="new")
    with coop.patch(pf.coop, anchors=torch.zeros(1, 64)):
        novel = pf.coop.CustomCLIP(cfg, pf.NOVEL, clip_novel)
    hn = find(novel)
    assert hn.mode == "novel"  # from DATASET.SUBSAMPLE_CLASSES
    result = pf.dassl_load(novel.prompt_learner, torch.load(tmp_path / "model.pth.tar")["state_dict"])
    assert not result.missing_keys or set(result.missing_keys) <= {"token_prefix", "token_suffix"}
    for key in ("ctx", "anchoropt.position.logits", "anchoropt.anchors"):
        assert torch.equal(novel.prompt_learner.state_dict()[key], saved[key]), key
    assert hn.describe() == h.describe()
    novel.eval()
    with torch.no_grad():
        logits = hn.predict(novel(pf.images()))
    assert logits.shape == (2, len(pf.NOVEL)) and torch.isfinite(logits).all()
    anchors_now = hn.anchor_text_features()
    assert anchors_now.shape[0] == len(pf.NOVEL)  # recomputed for the loaded anchors and the novel classes
    assert not any("template" in k for k in novel.prompt_learner.state_dict())  # class-dependent: not saved


def test_anchors_from_a_file_and_from_the_config(tmp_path) -> None:
    clip_model = pf.tiny_clip("fp32")
    path = save_anchors(_anchors(clip_model), tmp_path / "anchors.safetensors")
    cfg = pf.make_cfg("coop", ANCHORS=str(path), KD_WEIGHT=5.0, GUMBEL_TEMP=0.5, MODE="novel")
    with coop.patch(pf.coop):
        model = pf.coop.CustomCLIP(cfg, pf.BASE, clip_model)
    h = find(model)
    torch.testing.assert_close(h.anchors, _anchors(clip_model))
    assert (h.loss_config.kd_weight, h.position.tau, h.mode) == (5.0, 0.5, "novel")
    with coop.patch(pf.coop, kd_weight=2.0):  # keyword arguments win over the config
        model = pf.coop.CustomCLIP(cfg, pf.BASE, clip_model)
    assert find(model).loss_config.kd_weight == 2.0


# ---------------------------------------------------------------------- refusals and discovery
@pytest.mark.parametrize("position", ["middle", "front"])
def test_class_token_position_other_than_end_is_refused(position) -> None:
    with pytest.raises(ValueError, match="CLASS_TOKEN_POSITION"):
        _build(class_token_position=position)
    assert pf.coop.PromptLearner is pf.CoOpPromptLearner


def test_class_names_whose_eot_would_fall_off_are_refused_and_nothing_changes() -> None:
    clip_model = pf.tiny_clip("fp32")
    longest = " ".join(["dog"] * (77 - 2 - M - 1))  # the peer's prompt fills all 77 positions
    names = ["cat", longest]
    model = pf.coop.CustomCLIP(pf.make_cfg("coop"), names, clip_model)
    pl = model.prompt_learner
    assert int(pl.tokenized_prompts.argmax(-1)[1]) == 76
    ids = pl.tokenized_prompts.clone()
    with pytest.raises(ValueError, match="leave no room for 1 anchor"):
        coop.wrap(pl, clip_model=clip_model, classnames=names, anchors=_anchors(clip_model))
    assert torch.equal(pl.tokenized_prompts, ids) and not hasattr(pl, CHILD_NAME)
    assert not pl._forward_hooks and not clip_model.visual._forward_hooks


def test_bad_inputs_are_refused() -> None:
    clip_model = pf.tiny_clip("fp32")
    model = pf.coop.CustomCLIP(pf.make_cfg("coop"), pf.BASE, clip_model)
    pl = model.prompt_learner
    with pytest.raises(ValueError, match="expected \\(N, 64\\)"):
        coop.wrap(pl, clip_model=clip_model, classnames=pf.BASE, anchors=torch.zeros(1, 32))
    with pytest.raises(ValueError, match="class names"):
        coop.wrap(pl, clip_model=clip_model, classnames=pf.BASE[:2], anchors=torch.zeros(1, 64))
    with pytest.raises(ValueError, match="no anchors"):
        coop.wrap(pl, clip_model=clip_model, classnames=pf.BASE, anchors=None)
    coop.wrap(pl, clip_model=clip_model, classnames=pf.BASE, anchors=torch.zeros(1, 64))
    with pytest.raises(RuntimeError, match="already carries AnchorOPT"):
        coop.wrap(pl, clip_model=clip_model, classnames=pf.BASE, anchors=torch.zeros(1, 64))
    with pytest.raises(RuntimeError, match="already patched"), coop.patch(pf.coop, anchors=torch.zeros(1, 64)):
        coop.patch(pf.coop, anchors=torch.zeros(1, 64))
    assert pf.coop.PromptLearner is pf.CoOpPromptLearner


def test_the_learners_own_clip_tokenize_is_used(monkeypatch) -> None:
    calls = []

    def spy(texts, context_length=77, truncate=False):
        calls.append(len(texts))
        return pf.tokenize(texts, context_length, truncate)

    monkeypatch.setattr(pf.clip, "tokenize", spy)
    clip_model = pf.tiny_clip("fp32")
    model = pf.coop.CustomCLIP(pf.make_cfg("coop"), pf.BASE, clip_model)
    calls.clear()
    coop.wrap(model.prompt_learner, clip_model=clip_model, classnames=pf.BASE, anchors=torch.zeros(1, 64))
    assert calls  # found through the module that defines the learner class (`from clip import clip`)


def test_patch_handle() -> None:
    clip_model = pf.tiny_clip("fp32")
    patch = coop.patch(pf.coop, anchors=torch.zeros(1, 64))
    try:
        assert pf.coop.PromptLearner.__name__ == "CoOpPromptLearner"
        assert issubclass(pf.coop.PromptLearner, pf.CoOpPromptLearner)
        models = [pf.coop.CustomCLIP(pf.make_cfg("coop"), pf.BASE, clip_model) for _ in range(2)]
        assert len(patch.injections) == 2 and "active" in repr(patch)
        patch.injections[0].remove()
        assert len(patch.injections) == 1
    finally:
        patch.remove()
    assert pf.coop.PromptLearner is pf.CoOpPromptLearner
    plain = pf.coop.CustomCLIP(pf.make_cfg("coop"), pf.BASE, clip_model)
    assert not hasattr(plain.prompt_learner, CHILD_NAME) and hasattr(models[1].prompt_learner, CHILD_NAME)
    with pytest.raises(LookupError):
        find(plain)


def test_deepcopy_of_a_wrapped_model_is_independent() -> None:
    import copy

    model, _, _ = _build()
    model.eval()
    twin = copy.deepcopy(model)
    h, ht = find(model), find(twin)
    assert ht is not h and ht.prompt_learner is twin.prompt_learner
    image = pf.images()
    with torch.no_grad():
        assert torch.equal(twin(image), model(image))
        twin_logits = twin(image)
    assert ht.captured_image_features() is not None
    torch.testing.assert_close(ht.predict(twin_logits, mode="novel"), h.predict(model(image).detach(), mode="novel"))
    ht.remove()
    assert hasattr(model.prompt_learner, CHILD_NAME) and not hasattr(twin.prompt_learner, CHILD_NAME)
    with torch.no_grad():
        assert not torch.equal(twin(image), model(image))  # the original keeps its anchors


def test_two_models_on_one_clip_do_not_mix_their_captured_text() -> None:
    clip_model = pf.tiny_clip("fp32")
    cfg = pf.make_cfg("coop")
    first, second = (pf.coop.CustomCLIP(cfg, names, clip_model).eval() for names in (pf.BASE, pf.BASE[::-1]))
    h1, h2 = (coop.wrap(m.prompt_learner, clip_model=clip_model, classnames=n, anchors=torch.zeros(1, 64))
              for m, n in ((first, pf.BASE), (second, pf.BASE[::-1])))
    with torch.no_grad():
        first(pf.images())
        second(pf.images())  # same n_cls, same CLIP modules
    assert len(h1._text_features) == 1 and len(h2._text_features) == 1
    torch.testing.assert_close(h1._text_features[0], first.text_encoder(first.prompt_learner(), first.tokenized_prompts))


def test_wrapping_a_model_in_eval_mode_is_deterministic() -> None:
    clip_model = pf.tiny_clip("fp32")
    model = pf.coop.CustomCLIP(pf.make_cfg("coop"), pf.BASE, clip_model).eval()
    h = coop.wrap(model.prompt_learner, clip_model=clip_model, classnames=pf.BASE, anchors=torch.randn(1, 64))
    assert not h.training and not h.position.training
    with torch.no_grad():
        assert torch.equal(model(pf.images()), model(pf.images()))
