"""MaPLe's vision prompts on timm image towers (open_clip ``TimmModel``: SigLIP-style timm ViT, EVA02-style timm Eva
with rope) and on non-CLS-pooled open_clip ViTs: the hooked forward equals a block-by-block reference written here,
Eva's rope extension is the identity, class-token pooling stays bit-identical to MaPLe's (no strip), training,
grad checkpointing, the registry, refusals."""

from __future__ import annotations

import pytest
import torch

import anchoropt.methods  # noqa: F401  (registers the entries)
import peer_fakes as pf
from anchoropt.methods import registry
from anchoropt import testing
from anchoropt.methods import MaPLe
from anchoropt.methods.image_towers import identity_rope_rows
from anchoropt.towers import UnsupportedTowerError

M, B = 2, 3

# (kind, trunk overrides): SigLIP (no class token, MAP head), SigLIP-like ViT with a class token + token pooling,
# with a register token + avg pooling; EVA02 (class token, rope 'cat'), EVA02 averaged, EVA02 with rotate_half
TOWERS = {
    "siglip_map": ("siglip", {}),
    "vit_token": ("siglip", {"class_token": True, "global_pool": "token"}),
    "vit_reg_avg": ("siglip", {"class_token": True, "reg_tokens": 1, "no_embed_class": True, "global_pool": "avg"}),
    "eva_token": ("eva", {}),
    "eva_avg": ("eva", {"global_pool": "avg"}),
    "eva_rotate_half": ("eva", {"rope_rotate_half": True}),
}


def _tower(case: str, **extra) -> torch.nn.Module:
    kind, overrides = TOWERS[case]
    model = testing.tiny_timm_clip(kind, vision_layers=3, **overrides, **extra).requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # timm's init (std 0.02) gives near-uniform attention, where rope barely matters
        for name, p in model.visual.trunk.named_parameters():
            if ".attn." in name and name.endswith("weight") and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _randomise(ours: MaPLe, seed: int = 0) -> None:
    """Prompts / projections large enough that a wrong placement shows (the 0.02 init barely moves features)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))


def _assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Close relative to the features' scale (random timm heads give features of ~1e-4)."""
    scale = expected.abs().max()
    torch.testing.assert_close(actual / scale, expected / scale, atol=1e-5, rtol=1e-4)


def _differs(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-3) -> bool:
    return bool((a - b).abs().max() > tol * b.abs().max())


def _reference_timm(visual, images, shared, deep, prompt_rope=None) -> torch.Tensor:
    """MaPLe's prompted forward of a timm trunk, written out: embed, append, blocks (deep rows replaced, rope extended
    with unrotated rows for the prompts), strip, norm, the trunk's pooling / head, open_clip's head."""
    trunk = visual.trunk
    x = trunk.patch_embed(images)
    rope = None
    if hasattr(trunk, "rope"):  # Eva: (tokens, rope)
        x, rope = trunk._pos_embed(x)
    else:
        x = trunk._pos_embed(x)
    n_tokens = x.shape[1]
    x = torch.cat([x, shared.expand(x.shape[0], -1, -1)], dim=1)
    x = trunk.norm_pre(x)
    kwargs = {}
    if rope is not None:
        half = rope.shape[-1] // 2
        extended = torch.zeros(rope.shape[0] + M, rope.shape[1])
        extended[: rope.shape[0]] = rope
        extended[rope.shape[0]:, half:] = 1.0  # sin 0, cos 1
        if prompt_rope is not None:
            extended[rope.shape[0]:] = prompt_rope
        kwargs["rope"] = extended
    for i, block in enumerate(trunk.blocks):
        if 1 <= i <= deep.shape[0]:
            x = torch.cat([x[:, :n_tokens], deep[i - 1].expand(x.shape[0], -1, -1)], dim=1)
        x = block(x, **kwargs)
    x = trunk.norm(x[:, :n_tokens])
    return visual.head(trunk.forward_head(x))


@pytest.mark.parametrize("case", list(TOWERS))
def test_hooked_forward_equals_the_written_out_reference(case) -> None:
    model = _tower(case)
    ours = MaPLe(model, pf.BASE, n_ctx=M, prompt_depth=3)
    _randomise(ours)
    images = pf.images(B)
    with torch.no_grad():
        shared, deep = ours.vision_prompts()
        expected = _reference_timm(model.visual, images, shared, deep)
        prompted, plain = ours.encode_images(images), model.encode_image(images)
    _assert_same(prompted, expected)
    assert _differs(prompted, plain)  # the prompts act
    with torch.no_grad():  # ... at the deep blocks too
        changed = _reference_timm(model.visual, images, shared, torch.zeros_like(deep))
    assert _differs(prompted, changed)


def test_rotating_the_prompts_would_show() -> None:
    """The reference's unrotated prompt rows are what the hooks give: rotating them (like the last patch; patch 0 sits at the origin, unrotated) gives other features."""
    model = _tower("eva_token")
    ours = MaPLe(model, pf.BASE, n_ctx=M, prompt_depth=3)
    _randomise(ours)
    images = pf.images(B)
    with torch.no_grad():
        shared, deep = ours.vision_prompts()
        rope = model.visual.trunk.rope.get_embed()
        rotated = _reference_timm(model.visual, images, shared, deep, prompt_rope=rope[-1:].expand(M, -1))
        assert _differs(ours.encode_images(images), rotated)


@pytest.mark.parametrize("half", [False, True])
def test_identity_rope_rows_leave_tokens_unrotated_exactly(half) -> None:
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    rope = torch.randn(5, 16)
    extended = identity_rope_rows(rope, 3)
    assert extended.shape == (8, 16) and torch.equal(extended[:5], rope)
    q = torch.randn(2, 2, 8, 8)  # (B, heads, N, d): rope rows are [sin (d), cos (d)]
    out = apply_rot_embed_cat(q, extended, half=half)
    assert torch.equal(out[..., 5:, :], q[..., 5:, :])
    torch.testing.assert_close(out[..., :5, :], apply_rot_embed_cat(q[..., :5, :], rope, half=half), atol=0, rtol=0)
    assert identity_rope_rows(torch.randn(2, 1, 5, 16), 3).shape == (2, 1, 8, 16)
    with pytest.raises(ValueError, match="sin, cos"):
        identity_rope_rows(torch.randn(5, 15), 1)


def _reference_open_clip(visual, images, shared, deep, strip: bool) -> torch.Tensor:
    """An open_clip VisionTransformer's MaPLe forward, written out; ``strip=False`` is the released MaPLe (and our
    implementation before the strip): the prompts go through ``ln_post``, the class token is pooled."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    n_tokens = x.shape[1]
    x = visual.ln_pre(torch.cat([x, shared.expand(x.shape[0], -1, -1)], dim=1))
    for i, block in enumerate(visual.transformer.resblocks):
        if 1 <= i <= deep.shape[0]:
            x = torch.cat([x[:, :n_tokens], deep[i - 1].expand(x.shape[0], -1, -1)], dim=1)
        x = block(x)
    x = visual.ln_post(x[:, :n_tokens] if strip else x)
    pooled = x[:, 0] if visual.pool_type == "tok" else x[:, 1:].mean(dim=1)  # (unstripped: prompts included)
    return pooled @ visual.proj


@pytest.mark.parametrize("pool", ["tok", "avg"])
def test_open_clip_vit(pool) -> None:
    """Class-token pooling: bit-identical to MaPLe's unstripped forward.  Average pooling (our extension): the tower's
    own tokens, the prompts stripped."""
    model = testing.tiny_open_clip(layers=3, vision_layers=3).requires_grad_(False)
    model.visual.pool_type = pool
    ours = MaPLe(model, pf.BASE, n_ctx=M, prompt_depth=3)
    _randomise(ours)
    images = pf.images(B)
    with torch.no_grad():
        shared, deep = ours.vision_prompts()
        prompted = ours.encode_images(images)
        if pool == "tok":
            assert torch.equal(prompted, _reference_open_clip(model.visual, images, shared, deep, strip=False))
        else:
            expected = _reference_open_clip(model.visual, images, shared, deep, strip=True)
            torch.testing.assert_close(prompted, expected, atol=1e-5, rtol=1e-5)
            unstripped = _reference_open_clip(model.visual, images, shared, deep, strip=False)
            assert _differs(prompted, unstripped)  # (what averaging the prompts in would give)


def test_open_clip_attention_pooling_sees_only_the_towers_tokens() -> None:
    from open_clip.transformer import AttentionalPooler

    model = testing.tiny_open_clip(layers=3, vision_layers=3).requires_grad_(False)
    visual = model.visual
    visual.attn_pool, visual.attn_pool_contrastive = AttentionalPooler(64, 64, n_head=2, n_queries=1), None
    visual.pool_type = "tok"
    ours = MaPLe(model, pf.BASE, n_ctx=M, prompt_depth=2)
    _randomise(ours)
    seen = []
    handle = visual.attn_pool.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        ours.encode_images(pf.images(B))
    handle.remove()
    assert seen == [visual.positional_embedding.shape[0]]


@pytest.mark.parametrize("case", ["siglip_map", "eva_token"])
@pytest.mark.parametrize("template", ["coop", "anchoropt"])
def test_trains_on_timm_towers(case, template) -> None:
    model = _tower(case)
    width = model.text.transformer.width
    anchors = {"anchors": torch.randn(1, width)} if template == "anchoropt" else {}
    ours = MaPLe(model, pf.BASE, template=template, n_ctx=M, prompt_depth=3, **anchors).train()
    loss = ours.loss(pf.images(B), torch.tensor([0, 3, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    trained = [ours.text.ctx, ours.text.deep_prompts, ours.proj.weight, *[p.weight for p in ours.compound_prompt_projections]]
    for p in trained:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("case", ["siglip_map", "eva_token"])
@pytest.mark.parametrize("mode", ["bf16", "amp"])
def test_bf16_and_autocast(case, mode) -> None:
    model = _tower(case)
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    ours = MaPLe(model, pf.BASE, n_ctx=M, prompt_depth=3).train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "amp"):
        loss = ours.loss(pf.images(B), torch.tensor([0, 1, 2]))
    loss.backward()
    assert torch.isfinite(loss) and ours.proj.weight.grad.abs().sum() > 0
    assert ours.proj.weight.dtype == torch.float32


@pytest.mark.parametrize("case", ["siglip_map", "eva_token"])
def test_gradient_checkpointing_replays_the_prompts(case) -> None:
    grads = []
    for checkpointing in (False, True):
        model = _tower(case)
        model.visual.set_grad_checkpointing(checkpointing)
        ours = MaPLe(model, pf.BASE, n_ctx=M, prompt_depth=3).train()
        _randomise(ours)
        ours.loss(pf.images(B), torch.tensor([0, 3, 1])).backward()
        grads.append([ours.proj.weight.grad, ours.compound_prompt_projections[1].weight.grad])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["siglip_map", "eva_token"])
def test_hooks_act_only_inside_maples_passes(case) -> None:
    model = _tower(case)
    images = pf.images(B)
    with torch.no_grad():
        before = model.encode_image(images)
    ours = MaPLe(model, pf.BASE, n_ctx=M, prompt_depth=3)
    _randomise(ours)
    with torch.no_grad():
        assert _differs(ours.encode_images(images), before)
        assert torch.equal(model.encode_image(images), before)
        assert torch.equal(ours.encode_images(images, prompted=False), before)
    ours.remove_hooks()
    assert not ours.vision.installed
    trunk = model.visual.trunk
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in [trunk.norm_pre, trunk.norm, *trunk.blocks])
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), before)


@pytest.mark.parametrize("name", ["maple", "maple+anchoropt"])
def test_the_registry_builds_maple_on_a_timm_tower(name, tmp_path) -> None:
    model = _tower("eva_token")
    extra = {"anchors": torch.randn(1, 64)} if name.endswith("+anchoropt") else {}
    settings = registry.MethodSettings(n_soft=2, tokenizer=pf.tokenize, **extra)  # deep_depth 0: from the towers
    method = registry.get_method(name)
    learner = method.build(model, pf.BASE, settings).train()
    assert learner.prompt_depth == 3  # min(9, 3 text blocks, 3 timm blocks)
    loss = method.loss(settings)(learner(pf.images(B)), torch.tensor([0, 3, 1]))
    loss.backward()
    assert torch.isfinite(loss) and learner.proj.weight.grad.abs().sum() > 0
    learner.eval()
    assert method.head(seen=False) in learner.heads(pf.images(B))
    registry.save_learner(learner, registry.parse_method(name), settings, tmp_path / "learner")
    again, _ = registry.load_learner(tmp_path / "learner", model, pf.BASE, tokenizer=pf.tokenize)
    again.eval()
    torch.manual_seed(0)
    expected = learner.heads(pf.images(B))[method.head(seen=True)]
    torch.manual_seed(0)
    torch.testing.assert_close(again.heads(pf.images(B))[method.head(seen=True)], expected)


@pytest.mark.parametrize(
    "kind, overrides, message",
    [
        ("siglip", {"dynamic_img_size": True}, "dynamic_img_size"),
        ("siglip", {"patch_drop_rate": 0.5}, "patch dropout"),
        ("eva", {"patch_drop_rate": 0.5}, "patch dropout"),
        ("eva", {"rope_type": "mixed"}, "RotaryEmbeddingMixed"),
    ],
)
def test_refusals(kind, overrides, message) -> None:
    with pytest.raises(UnsupportedTowerError, match=message):
        MaPLe(testing.tiny_timm_clip(kind, **overrides), pf.BASE, n_ctx=M, prompt_depth=2)


def test_other_timm_trunks_and_image_sizes_are_named() -> None:
    import timm

    model = testing.tiny_timm_clip("siglip")
    model.visual.trunk = timm.create_model("test_convnext", pretrained=False, num_classes=64)
    with pytest.raises(UnsupportedTowerError, match="TimmModel around a timm ConvNeXt"):
        MaPLe(model, pf.BASE, n_ctx=M, prompt_depth=2)
    ours = MaPLe(_tower("eva_token"), pf.BASE, n_ctx=M, prompt_depth=2)
    with pytest.raises(Exception, match="doesn't match model"):
        ours.encode_images(torch.randn(1, 3, 64, 64))  # not the tower's image size
