"""anchoropt.methods.MaPLe on open_clip towers: logits equal the peer's MaPLe (and MaPLe + the AnchorOPT shim) for the
same weights; deep prompts on both towers; hooks act only inside MaPLe's own passes; dtypes; refusals."""

from __future__ import annotations

import pytest
import torch

import peer_fakes as pf
from anchoropt import testing
from anchoropt.adapters import maple as maple_shim
from anchoropt.methods import DePT, MaPLe
from anchoropt.towers import UnsupportedTowerError

M, B = 2, 3


def _open_clip(vision_layers=2):
    return testing.tiny_open_clip(width=64, layers=3, heads=2, embed_dim=32,
                                  vision_layers=vision_layers).requires_grad_(False)


def _quantised(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Values in {-1/8, 0, 1/8}: exact in fp16, so MaPLe's ``.half()`` on its injected prompts rounds nothing."""
    return torch.randint(-1, 2, tensor.shape, generator=generator).float() / 8


def _peer_and_ours(anchors=None, ctx_init=""):
    model = _open_clip()
    fake = pf.MaPLeCLIP(width=64, layers=3, heads=2, embed_dim=32, image_size=32, vision_width=64, n_ctx=M).eval()
    fake.load_state_dict(model.state_dict())  # the same weights: open_clip keeps OpenAI's parameter names
    peer = pf.maple.CustomCLIP(pf.make_cfg("maple", n_ctx=M, depth=2, ctx_init=ctx_init), pf.BASE, fake).eval()
    learner = peer.prompt_learner
    handle = None
    if anchors is None:
        learner.proj.float()  # MaPLe's unconditional proj.half() fails in fp32 (the shim does this itself)
    else:
        handle = maple_shim.wrap(learner, clip_model=fake, classnames=pf.BASE, anchors=anchors, owner=peer)
    template = {"template": "anchoropt", "anchors": anchors} if anchors is not None else {}
    init = {"ctx_init": ctx_init} if ctx_init else {}
    ours = MaPLe(model, pf.BASE, n_ctx=M, prompt_depth=2, tokenizer=pf.tokenize, **template, **init).eval()
    if ctx_init:  # the released init: ctx from the phrase's first M tokens, the peer's token_suffix holds the rest
        torch.testing.assert_close(ours.text.ctx.detach(), learner.ctx.detach().float())
        ids, layout = learner.tokenized_prompts, ours.text.layout  # ours holds placeholders in the M slot rows
        fixed = [i for i in range(layout.token_ids.shape[1]) if i not in layout.slot_positions]
        assert layout.slot_positions == (1, 2)
        assert torch.equal(layout.token_ids[:, fixed], ids[:, fixed].to(layout.token_ids))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (learner.ctx, learner.compound_prompts_text[0], learner.proj.weight,
                  learner.compound_prompt_projections[0].weight):
            p.copy_(_quantised(p, g))
        learner.proj.bias.zero_(), learner.compound_prompt_projections[0].bias.zero_()
        ours.text.ctx.copy_(learner.ctx)
        ours.text.deep_prompts[0].copy_(learner.compound_prompts_text[0])
        ours.proj.load_state_dict(learner.proj.state_dict())
        ours.compound_prompt_projections[0].load_state_dict(learner.compound_prompt_projections[0].state_dict())
        if handle is not None:
            ours.text.learner.position.logits.copy_(handle.position.logits)
    return model, peer, handle, ours


@pytest.mark.parametrize("ctx_init", ["", "a photo of a"], ids=["random", "released-init"])
def test_logits_equal_the_peers_maple(ctx_init) -> None:
    _, peer, _, ours = _peer_and_ours(ctx_init=ctx_init)
    images = pf.images(B)
    with torch.no_grad():
        expected = peer(images)
        logits, anchor = ours(images)
    assert anchor is None
    torch.testing.assert_close(logits, expected.float(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the vision coupling matters: other projections, other logits
        ours.compound_prompt_projections[0].bias.add_(torch.randn(64))  # (a constant shift: LayerNorm removes it)
        assert not torch.allclose(ours(images)[0], expected.float(), atol=1e-3)


def test_anchoropt_logits_equal_the_maple_shim() -> None:
    anchors = torch.randn(1, 64) * 0.5
    _, peer, handle, ours = _peer_and_ours(anchors)
    images = pf.images(B)
    with torch.no_grad():
        expected = peer(images)
        expected_anchor = handle.anchor_logits()  # vanilla image features, vanilla text tower
        logits, anchor = ours(images)
    torch.testing.assert_close(logits, expected.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(anchor, expected_anchor.float(), atol=1e-5, rtol=1e-5)


def test_hooks_act_only_inside_maples_passes() -> None:
    model = _open_clip(vision_layers=3)
    images = pf.images(B)
    with torch.no_grad():
        before_image, before_text = model.encode_image(images), model.encode_text(pf.tokenize(["a dog."]).long())
    ours = MaPLe(model, pf.BASE, n_ctx=M, prompt_depth=3)
    with torch.no_grad():
        prompted = ours.encode_images(images)
        assert not torch.allclose(prompted, before_image, atol=1e-4)
        torch.testing.assert_close(model.encode_image(images), before_image)
        torch.testing.assert_close(model.encode_text(pf.tokenize(["a dog."]).long()), before_text)
        torch.testing.assert_close(ours.encode_images(images, prompted=False), before_image)
    ours.remove_hooks()
    assert not ours.vision.installed
    assert all(not b._forward_pre_hooks for b in [*model.visual.transformer.resblocks, *model.transformer.resblocks])


@pytest.mark.parametrize("factory", ["open_clip", "custom_text", "siglip_like"])
@pytest.mark.parametrize("template", ["coop", "anchoropt"])
def test_every_prompt_trains_on_every_tower(factory, template) -> None:
    text = {"siglip_like": {"no_causal_mask": True, "pool_type": "last"}}.get(factory, {})
    build = testing.tiny_open_clip if factory == "open_clip" else testing.tiny_custom_text_clip
    model = build(layers=3, vision_layers=3, **text).requires_grad_(False)
    anchors = {"anchors": torch.randn(1, 64)} if template == "anchoropt" else {}
    ours = MaPLe(model, pf.BASE, template=template, n_ctx=M, prompt_depth=3, **anchors).train()
    loss = ours.loss(pf.images(B), torch.tensor([0, 3, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    trained = [ours.text.ctx, ours.text.deep_prompts, ours.proj.weight, *[p.weight for p in ours.compound_prompt_projections]]
    if template == "anchoropt":
        trained.append(ours.text.learner.position.logits)
    for p in trained:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", ["bf16", "amp"])
def test_bf16_and_autocast(mode) -> None:
    model = _open_clip(vision_layers=3)
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    ours = MaPLe(model, pf.BASE, template="anchoropt", n_ctx=M, prompt_depth=3, anchors=torch.randn(1, 64)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "amp"):
        loss = ours.loss(pf.images(B), torch.tensor([0, 1, 2]))
    loss.backward()
    assert torch.isfinite(loss) and ours.proj.weight.grad.abs().sum() > 0
    assert ours.proj.weight.dtype == torch.float32 and ours.text.ctx.dtype == torch.float32


def test_dept_over_maple() -> None:
    ours = DePT(_open_clip(vision_layers=3), pf.BASE, n_ctx=M, base="maple", base_options={"prompt_depth": 3}).train()
    assert ours.takes_images
    loss = ours.loss(pf.images(B), torch.tensor([0, 1, 2]))
    loss.backward()
    assert ours.linear_probe_proj.weight.grad.abs().sum() > 0 and ours.base.proj.weight.grad.abs().sum() > 0
    assert ours.heads(pf.images(B))["normal"].shape == (B, len(pf.BASE))


def test_refusals() -> None:
    with pytest.raises(UnsupportedTowerError, match="VisionTransformer"):
        MaPLe(testing.tiny_openai_clip(fp16=False), pf.BASE)
    with pytest.raises(ValueError, match="vision blocks"):
        MaPLe(_open_clip(), pf.BASE, prompt_depth=9)
    ours = MaPLe(_open_clip(), pf.BASE, prompt_depth=2)
    with pytest.raises(ValueError, match="images"):
        ours(torch.randn(B, 32))

