"""anchoropt.methods.CoCoOp: logits equal the peer's CoCoOp (and the CoCoOp+AnchorOPT shim) for the same weights;
every tower layout, bf16 and autocast; the meta-net and position logits train; bad input is refused."""

from __future__ import annotations

import pytest
import torch

import peer_fakes as pf
from anchoropt import testing
from anchoropt.adapters import cocoop as cocoop_shim
from anchoropt.adapters import find
from anchoropt.methods import CoCoOp

M, B = 4, 3


def _copy_peer(ours: CoCoOp, learner) -> None:
    """Give our module the peer learner's context and meta-net."""
    with torch.no_grad():
        ours.text.ctx.copy_(learner.ctx.float())
        ours.meta_net.load_state_dict({k: v.float() for k, v in learner.meta_net.state_dict().items()})


def _image_features(clip_model, batch=B):
    with torch.no_grad():
        return clip_model.visual(pf.images(batch)).float()


def test_logits_equal_the_peers_cocoop() -> None:
    clip_model = pf.tiny_clip("fp32").requires_grad_(False)
    peer = pf.cocoop.CustomCLIP(pf.make_cfg("cocoop", n_ctx=M), pf.BASE, clip_model).eval()
    ours = CoCoOp(clip_model, pf.BASE, n_ctx=M, tokenizer=pf.tokenize).eval()
    _copy_peer(ours, peer.prompt_learner)
    with torch.no_grad():
        expected = peer(pf.images(B))
        logits, anchor = ours(_image_features(clip_model))
    assert anchor is None
    torch.testing.assert_close(logits, expected.float(), atol=1e-4, rtol=1e-4)
    # and the comparison can fail: another context gives other logits
    with torch.no_grad():
        ours.text.ctx.add_(torch.randn_like(ours.text.ctx))
        assert not torch.allclose(ours(_image_features(clip_model))[0], expected.float(), atol=1e-3)


def test_anchoropt_logits_equal_the_cocoop_shim() -> None:
    clip_model = pf.tiny_clip("fp32").requires_grad_(False)
    peer = pf.cocoop.CustomCLIP(pf.make_cfg("cocoop", n_ctx=M), pf.BASE, clip_model).eval()
    anchors = torch.randn(1, 64) * 0.5
    handle = cocoop_shim.wrap(peer.prompt_learner, clip_model=clip_model, classnames=pf.BASE, anchors=anchors,
                              owner=peer)
    ours = CoCoOp(clip_model, pf.BASE, template="anchoropt", n_ctx=M, anchors=anchors, tokenizer=pf.tokenize).eval()
    _copy_peer(ours, peer.prompt_learner)
    with torch.no_grad():
        ours.text.learner.position.logits.copy_(handle.position.logits)
        expected = peer(pf.images(B))
        expected_anchor = handle.anchor_logits()
        logits, anchor = ours(_image_features(clip_model))
    torch.testing.assert_close(logits, expected.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(anchor, expected_anchor.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.predict(_image_features(clip_model), "novel"), (logits + anchor) / 2)


def test_one_position_matrix_per_batch_and_meta_net_before_it(open_clip_model) -> None:
    ours = CoCoOp(open_clip_model, pf.BASE, template="anchoropt", n_ctx=M, anchors=torch.randn(1, 64)).train()
    feats = torch.randn(B, 32)
    matrix = ours.text.sample_matrix()
    text = ours.text_features(feats, matrix)
    # the same features from prompts built by hand: image b's context shifted by its bias, then P @ [ctx_b; anchor]
    with torch.no_grad():
        bias = ours.meta_net(torch.nn.functional.normalize(feats, dim=-1))
        for b in range(B):
            sources = torch.cat([ours.text.ctx + bias[b], ours.text.learner.anchors])
            prompts = ours.text.template.normal_prompts(matrix @ sources)
            plain = ours.text.template.encode(ours.text.layout, prompts)
            torch.testing.assert_close(text[b], torch.nn.functional.normalize(plain, dim=-1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fixture", ["open_clip_model", "custom_text_model", "siglip_like_model", "openai_model"])
@pytest.mark.parametrize("template", ["coop", "anchoropt"])
def test_every_tower_trains_ctx_meta_net_and_position(fixture, template, request) -> None:
    model = request.getfixturevalue(fixture)
    torch.manual_seed(0)  # a meta-net whose ReLU units are not all dead for these features
    anchors = torch.randn(1, 64) if template == "anchoropt" else None
    ours = CoCoOp(model, pf.BASE, template=template, n_ctx=M, anchors=anchors).train()
    feats, labels = torch.randn(B, 32), torch.tensor([0, 3, 1])
    loss = ours.loss(feats, labels)
    loss.backward()
    assert torch.isfinite(loss)
    trained = [ours.text.ctx, ours.meta_net.linear2.weight, ours.meta_net.linear2.bias]
    if template == "anchoropt":
        trained.append(ours.text.learner.position.logits)
    for p in trained:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in model.parameters())


def test_bidirectional_tower_matches_the_full_pass(siglip_like_model) -> None:
    ours = CoCoOp(siglip_like_model, pf.BASE, n_ctx=M).eval()
    feats = torch.randn(2, 32)
    with torch.no_grad():
        text = ours.text_features(feats)
        bias = ours.meta_net(torch.nn.functional.normalize(feats, dim=-1))
        for b in range(2):
            prompts = ours.text.template.fill(ours.text.layout, ours.text.ctx + bias[b])
            plain = ours.text.tower.encode(prompts, ours.text.layout.pool_index, ours.text.layout.token_ids)
            torch.testing.assert_close(text[b], torch.nn.functional.normalize(plain, dim=-1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["bf16", "amp"])
def test_bf16_tower_and_autocast(mode) -> None:
    model = testing.tiny_open_clip().requires_grad_(False)
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    ours = CoCoOp(model, pf.BASE, template="anchoropt", n_ctx=M, anchors=torch.randn(1, 64)).train()
    feats, labels = torch.randn(B, 32), torch.tensor([0, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "amp"):
        loss = ours.loss(feats, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert ours.text.ctx.dtype == torch.float32 and ours.meta_net.linear1.weight.dtype == torch.float32
    assert ours.text.learner.position.logits.grad.abs().sum() > 0


def test_base_to_novel(open_clip_model) -> None:
    ours = CoCoOp(open_clip_model, pf.BASE, template="anchoropt", n_ctx=M, anchors=torch.randn(1, 64)).eval()
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.set_classnames(pf.NOVEL)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in state.items()}
    heads = ours.heads(torch.randn(B, 32))
    assert set(heads) == {"normal", "anchor", "ensemble"}
    assert heads["ensemble"].shape == (B, len(pf.NOVEL))


def test_bad_input_is_refused(open_clip_model) -> None:
    ours = CoCoOp(open_clip_model, pf.BASE, n_ctx=M)
    with pytest.raises(ValueError, match="32"):
        ours(torch.randn(B, 16))
    with pytest.raises(ValueError, match="anchors"):
        CoCoOp(open_clip_model, pf.BASE, template="anchoropt")
    with pytest.raises(ValueError, match="template"):
        CoCoOp(open_clip_model, pf.BASE, template="maple")
    with pytest.raises(ValueError, match="E >= 16"):
        CoCoOp(testing.tiny_open_clip(embed_dim=8), pf.BASE)
    with pytest.raises(ValueError, match="mode"):
        ours.predict(torch.randn(B, 32), "all")
