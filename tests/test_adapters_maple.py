"""MaPLe shim (shallow part): proj(ctx) before the position matrix, the 4-tuple kept, the list-protocol tower for
the anchor prompt, vanilla image features for the anchor logits, MaPLe's proj.half() survived in fp32 / amp,
whole-model checkpoints reloaded on novel classes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import peer_fakes as pf
from anchoropt.adapters import CHILD_NAME, find, maple

pytestmark = pytest.mark.filterwarnings("ignore:MaPLe PROMPT_DEPTH")

M, N, B = 2, 1, 2


def _build(prec="fp32", classnames=pf.BASE, depth=3, **opts):
    clip_model = pf.tiny_maple_clip(prec, n_ctx=M)
    cfg = pf.make_cfg("maple", n_ctx=M, prec=prec, depth=depth, subsample=opts.pop("subsample", "base"))
    with maple.patch(pf.maple, anchors=pf.word_embedding(clip_model, "a")[:1], **opts):
        model, optim, _ = pf.build_model("maple", cfg, classnames, clip_model)
    return model, optim, clip_model


def test_four_tuple_kept_and_visual_tokens_from_the_unarranged_ctx() -> None:
    model, _, _ = _build()
    pl, h = model.prompt_learner, find(model)
    with torch.no_grad():
        h.position.logits.copy_(torch.tensor([[0.0, 0, 9], [9, 0, 0], [0, 9, 0]]))  # [anchor, ctx1, ctx2]
    model.eval()
    with torch.no_grad():
        prompts, shared_ctx, deep_text, deep_vision = pl()
    assert prompts.shape == (len(pf.BASE), 77, 64)
    assert torch.equal(prompts[:, 1], h.anchors.expand(len(pf.BASE), -1))
    assert torch.equal(prompts[:, 2 : 2 + M], pl.ctx.expand(len(pf.BASE), -1, -1))
    assert torch.equal(shared_ctx, pl.proj(pl.ctx))  # paper S2.2.4: proj(ctx) before the position matrix
    assert deep_text is pl.compound_prompts_text and len(deep_vision) == 2


def test_training_step_reaches_all_maple_parameters_and_position_logits() -> None:
    model, optim, _ = _build()
    pl, h = model.prompt_learner, find(model)
    params = {id(p) for g in optim.param_groups for p in g["params"]}
    assert id(h.position.logits) in params  # MaPLe's optimizer is built over the whole model
    model.train()
    labels = torch.tensor([0, 2])
    loss = h.loss(labels, base_loss=model(pf.images(B), labels))
    optim.zero_grad()
    loss.backward()
    for p in (pl.ctx, h.position.logits, pl.proj.weight, pl.compound_prompts_text[0], pl.compound_prompt_projections[0].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    optim.step()
    assert torch.isfinite(loss)


def test_proj_half_is_survived_and_restored() -> None:
    clip_model = pf.tiny_maple_clip("fp32", n_ctx=M)
    model = pf.maple.CustomCLIP(pf.make_cfg("maple", n_ctx=M), pf.BASE, clip_model)
    pl = model.prompt_learner
    with pytest.raises(RuntimeError):  # the peer bug: proj.half() vs fp32 ctx
        pl()
    h = maple.wrap(pl, clip_model=clip_model, classnames=pf.BASE, anchors=torch.zeros(1, 64), owner=model)
    assert pl.proj.weight.dtype == torch.float32
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(pf.images(B))).all()
    h.remove()
    assert pl.proj.weight.dtype == torch.float16  # the original module, as it was


@pytest.mark.parametrize("prec", ["fp16", "amp"])
def test_fp16_and_amp(prec) -> None:
    model, optim, _ = _build(prec)
    h = find(model)
    model.train()
    labels = torch.tensor([1, 0])
    # fp16 autocast: MaPLe's own `.half()` on prompts does not mix with bf16 autocast (autocast's cat refuses it);
    # on CUDA its amp is fp16 autocast, and on CPU the peer's torch.cuda.amp.autocast is a no-op (= fp32 above)
    with torch.autocast("cpu", dtype=torch.float16, enabled=prec == "amp"):
        loss = h.loss(labels, base_loss=model(pf.images(B), labels))
    optim.zero_grad()
    loss.backward()
    optim.step()
    assert torch.isfinite(loss) and torch.isfinite(h.position.logits).all()
    assert h.position.logits.dtype == torch.float32 and h.anchors.dtype == torch.float32


def test_anchor_prompt_runs_through_the_vanilla_list_protocol_tower() -> None:
    model, _, clip_model = _build()
    h = find(model)
    prompts = h.template.anchor_prompts(h.anchors)  # (C, L', D), truncated to the last EOT
    full = torch.cat([prompts, prompts.new_zeros(prompts.shape[0], 77 - prompts.shape[1], 64)], dim=1)
    ids = h.template.anchor_token_ids
    ids = torch.cat([ids, ids.new_zeros(ids.shape[0], 77 - ids.shape[1])], dim=1)
    with torch.no_grad():
        reference = model.text_encoder(full, ids, [])  # MaPLe's own TextEncoder, no deep prompts
    torch.testing.assert_close(h.anchor_text_features(), F.normalize(reference.float(), dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("anchor_image", ["vanilla", "model"])
def test_anchor_logits_image_features(anchor_image) -> None:
    model, _, clip_model = _build(anchor_image=anchor_image)
    h = find(model)
    model.eval()
    image = pf.images(B)
    with torch.no_grad():
        reference = clip_model.visual(image, torch.zeros(0, clip_model.visual.width), [])  # vanilla CLIP image tower
        logits = model(image)
        prompted = h.captured_image_features()
        anchor_features = h.anchor_image_features()
    assert h.anchor_image == anchor_image
    torch.testing.assert_close(anchor_features, reference if anchor_image == "vanilla" else prompted)
    assert not torch.allclose(reference, prompted)
    torch.testing.assert_close(h.normal_logits(), logits.float(), atol=1e-5, rtol=1e-5)  # prompted features
    assert h.captured_image_features() is prompted  # our own vanilla pass is not captured


def test_shallow_only_warns() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _build(depth=3, deep=False)
        _build(depth=1, deep=False)
        _build(depth=3)
    messages = [str(w.message) for w in caught if "PROMPT_DEPTH" in str(w.message)]
    assert len(messages) == 1 and "PROMPT_DEPTH=3 with deep=False" in messages[0]


def _record_block_inputs(model):
    """Inputs each text block really receives (registered after the shim's hooks, so it sees their result)."""
    seen = {}
    for i, block in enumerate(model.text_encoder.transformer.resblocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0]))
        block.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(f"out{i}", out[0]))
    return seen


def test_deep_layers_carry_the_anchor_and_re_place_maples_compound_prompts() -> None:
    model, _, _ = _build(depth=3)
    pl, h = model.prompt_learner, find(model)
    assert h.deep
    order = [1, M, 0]  # slot 0 <- soft 2, slot 1 <- the anchor, slot 2 <- soft 1
    with torch.no_grad():
        h.position.logits.fill_(-9.0)
        h.position.logits[torch.arange(3), torch.tensor(order)] = 9.0
    seen = _record_block_inputs(model)
    model.eval()
    with torch.no_grad():
        model(pf.images(B))
    for block in (1, 2):
        x, prompts, counter = seen[block]
        assert len(prompts) == 0  # MaPLe's own overwrite suppressed, our rows kept
        previous = seen[f"out{block - 1}"]  # (L, C, D) the previous block's output
        layer = pl.compound_prompts_text[block - 1].half().to(x.dtype)  # rounded to fp16 as MaPLe's block does
        assert torch.equal(x[1], layer[1].expand_as(x[1]))
        assert torch.equal(x[2], previous[2])  # the anchor's own hidden state, at its own slot
        assert torch.equal(x[3], layer[0].expand_as(x[3]))
        assert torch.equal(x[0], previous[0]) and torch.equal(x[4:], previous[4:])
    with torch.no_grad():  # outside the model's forward the hooks do nothing (e.g. the anchor prompt)
        features = h.anchor_text_features()
    assert torch.isfinite(features).all()


def test_deep_gradients_and_removal() -> None:
    clip_model = pf.tiny_maple_clip("fp32", n_ctx=M)
    model = pf.maple.CustomCLIP(pf.make_cfg("maple", n_ctx=M, depth=3), pf.BASE, clip_model)
    model.prompt_learner.proj.float()  # the peer bug, fixed by hand to compare outputs before / after
    image, labels = pf.images(B), torch.tensor([0, 1])
    model.eval()
    with torch.no_grad():
        before = model(image)
    h = maple.wrap(model.prompt_learner, clip_model=clip_model, classnames=pf.BASE, anchors=torch.randn(1, 64),
                   owner=model)
    with torch.no_grad():  # a clear permutation, so that the Gumbel sample keeps both soft tokens
        h.position.logits.copy_(torch.eye(3) * 20.0)
    model.train()
    loss = h.loss(labels, base_loss=model(image, labels))
    loss.backward()
    for p in (h.position.logits, model.prompt_learner.compound_prompts_text[1]):
        assert p.grad is not None and p.grad.abs().sum() > 0
    h.remove()
    blocks = model.text_encoder.transformer.resblocks
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in blocks)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(image), before)


def test_whole_model_checkpoint_reloads_on_novel_classes() -> None:
    model, _, _ = _build()
    saved = model.state_dict()  # MaPLe registers the whole CustomCLIP
    novel, _, _ = _build(classnames=pf.NOVEL, subsample="new")
    pf.dassl_load(novel, saved, prefix_keys=True)
    for key in ("prompt_learner.ctx", "prompt_learner.anchoropt.position.logits", "prompt_learner.proj.weight"):
        assert torch.equal(novel.state_dict()[key], saved[key])
    novel.eval()
    with torch.no_grad():
        out = find(novel).predict(novel(pf.images(B)))
    assert out.shape == (B, len(pf.NOVEL))


def test_remove_restores_outputs() -> None:
    clip_model = pf.tiny_maple_clip("fp16", n_ctx=M)
    model = pf.maple.CustomCLIP(pf.make_cfg("maple", n_ctx=M, prec="fp16", depth=1), pf.BASE, clip_model).eval()
    with torch.no_grad():
        before = model(pf.images(B))
    h = maple.wrap(model.prompt_learner, clip_model=clip_model, classnames=pf.BASE, anchors=torch.randn(1, 64))
    with torch.no_grad():
        assert not torch.equal(model(pf.images(B)), before)
    h.remove()
    with torch.no_grad():
        assert torch.equal(model(pf.images(B)), before)
    assert not hasattr(model.prompt_learner, CHILD_NAME)


def test_deep_compound_prompts_are_rounded_like_maples_own_blocks() -> None:
    """In fp32 MaPLe inserts compound_prompts_text[i].half(): the shim's soft slots hold the same values."""
    model, _, _ = _build(depth=3)
    pl, h = model.prompt_learner, find(model)
    with torch.no_grad():
        h.position.logits.copy_(torch.eye(M + N) * 20.0)  # identity: slots [soft1, soft2, anchor]
        pl.compound_prompts_text[0].add_(1e-3 * torch.rand_like(pl.compound_prompts_text[0]))  # not fp16 values
    seen = _record_block_inputs(model)
    model.eval()
    with torch.no_grad():
        model(pf.images(B))
    x = seen[1][0]  # (L, C, D) entering block 1
    rounded = pl.compound_prompts_text[0].half().float()
    assert torch.equal(x[1 : 1 + M], rounded[:, None].expand(-1, x.shape[1], -1))
    assert not torch.equal(rounded, pl.compound_prompts_text[0])


def test_bare_prompt_learner_call_leaves_the_next_unrelated_text_pass_alone() -> None:
    model, _, clip_model = _build(depth=3)
    h = find(model)
    tower = maple.ListProtocolTextTower(clip_model)
    ids = pf.tokenize(["a photo of a dog.", "a cat."]).long()
    with torch.no_grad():
        want = tower.encode_text(ids)
        model.prompt_learner()  # arms the deep hooks for a text pass that never comes
        got = tower.encode_text(ids)  # [x, [], 0] through the same blocks: no compound prompt, not ours
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        seen = _record_block_inputs(model)
        model.eval()
        logits = model(pf.images(B))  # the model's own pass still gets the deep variant
    assert torch.isfinite(logits).all() and h.deep
    assert len(seen[1][1]) == 0  # MaPLe's overwrite suppressed: our slot rows were placed
