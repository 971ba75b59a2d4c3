"""anchoropt.methods.DePT: logits and loss equal the peer's ELP-CoOp (and DePT + the AnchorOPT shim) for the same
weights; CoCoOp base; the head only on the classes it was built for; its learning-rate group; bad input."""

from __future__ import annotations

import pytest
import torch

import peer_fakes as pf
from anchoropt.adapters import dept as dept_shim
from anchoropt.losses import StageIILossConfig
from anchoropt.methods import DePT

M, B = 4, 3
LABELS = torch.tensor([0, 3, 1])


def _peer(anchors=None):
    clip_model = pf.tiny_clip("fp32").requires_grad_(False)
    peer = pf.dept.CustomCLIP(pf.make_cfg("dept", n_ctx=M), pf.BASE, clip_model)
    handle = None
    if anchors is not None:
        handle = dept_shim.wrap(peer.prompt_learner, clip_model=clip_model, classnames=pf.BASE, anchors=anchors,
                                owner=peer)
    return clip_model, peer, handle


def _ours(clip_model, peer, **kwargs) -> DePT:
    ours = DePT(clip_model, pf.BASE, n_ctx=M, tokenizer=pf.tokenize, loss=StageIILossConfig(kd_weight=0.0), **kwargs)
    with torch.no_grad():
        ours.text.ctx.copy_(peer.prompt_learner.ctx)
        for name in ("film_lp_img", "film_lp_text", "linear_probe_proj"):
            getattr(ours, name).load_state_dict(getattr(peer, name).state_dict())
        # a trained-looking head, so the test sees it
        for p in (*ours.film_lp_img.parameters(), *ours.linear_probe_proj.parameters()):
            p.add_(torch.randn_like(p) * 0.3)
        for name in ("film_lp_img", "linear_probe_proj"):
            getattr(peer, name).load_state_dict(getattr(ours, name).state_dict())
    return ours


def _feats(clip_model):
    with torch.no_grad():
        return clip_model.visual(pf.images(B)).float()


@pytest.mark.parametrize("anchored", [False, True])
def test_logits_and_loss_equal_the_peers_dept(anchored) -> None:
    anchors = torch.randn(1, 64) * 0.5 if anchored else None
    clip_model, peer, handle = _peer(anchors)
    extra = {"template": "anchoropt", "anchors": anchors} if anchored else {}
    ours = _ours(clip_model, peer, **extra)
    if anchored:
        with torch.no_grad():
            ours.text.learner.position.logits.copy_(handle.position.logits)
    peer.eval(), ours.eval()
    with torch.no_grad():
        expected = peer(pf.images(B))  # fused (1 - w) sim + w lp
        logits, anchor = ours(_feats(clip_model))
    torch.testing.assert_close(logits, expected.float(), atol=1e-4, rtol=1e-4)
    if anchored:
        torch.testing.assert_close(anchor, handle.anchor_logits().float(), atol=1e-4, rtol=1e-4)
    peer.train(), ours.train()
    feats = _feats(clip_model)
    torch.manual_seed(0)  # the same Gumbel sample of the position matrix in both (training draws one per step)
    peer_loss = peer(pf.images(B), LABELS)  # (1 - w) CE(sim) + w CE(probe on [text_y; image])
    torch.manual_seed(0)
    torch.testing.assert_close(ours.loss(feats, LABELS), peer_loss.float(), atol=1e-5, rtol=1e-5)


def test_novel_classes_use_similarity_or_the_anchor_ensemble(open_clip_model) -> None:
    ours = DePT(open_clip_model, pf.BASE, template="anchoropt", n_ctx=M, anchors=torch.randn(1, 64)).eval()
    feats = torch.randn(B, 32)
    base = ours.heads(feats)
    assert ours.head_active and not torch.allclose(base["normal"], base["similarity"])
    ours.set_classnames(pf.NOVEL)
    assert not ours.head_active
    heads = ours.heads(feats)
    assert heads["normal"].shape == (B, len(pf.NOVEL))
    torch.testing.assert_close(heads["normal"], heads["similarity"])
    torch.testing.assert_close(ours.predict(feats, "novel"), (heads["similarity"] + heads["anchor"]) / 2)
    with pytest.raises(RuntimeError, match="classes it was built with"):
        ours.loss(feats, torch.tensor([0, 1, 2]))
    ours.set_classnames(pf.BASE)
    assert ours.head_active


@pytest.mark.parametrize("fixture", ["open_clip_model", "custom_text_model", "siglip_like_model"])
@pytest.mark.parametrize("base", ["coop", "cocoop"])
def test_trains_prompt_and_head_on_every_tower(fixture, base, request) -> None:
    ours = DePT(request.getfixturevalue(fixture), pf.BASE, template="anchoropt", n_ctx=M, base=base,
                anchors=torch.randn(1, 64)).train()
    loss = ours.loss(torch.randn(B, 32), LABELS)
    loss.backward()
    assert torch.isfinite(loss)
    for p in (ours.text.ctx, ours.linear_probe_proj.weight, ours.film_lp_img.scale, ours.film_lp_text.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    if base == "cocoop":
        assert ours.base.meta_net.linear2.bias.grad.abs().sum() > 0


def test_head_learning_rate_group(open_clip_model) -> None:
    ours = DePT(open_clip_model, pf.BASE, n_ctx=M, head_lr_scale=6.5)
    prompt, head = ours.optimizer_groups(0.0035)
    assert head["lr"] == pytest.approx(0.02275) and prompt["lr"] == 0.0035
    assert {id(p) for p in head["params"]} == {id(p) for p in (*ours.film_lp_img.parameters(),
                                                                *ours.film_lp_text.parameters(),
                                                                *ours.linear_probe_proj.parameters())}
    assert [id(p) for p in prompt["params"]] == [id(ours.text.ctx)]


@pytest.mark.parametrize("mode", ["bf16", "amp"])
def test_bf16_and_autocast(mode) -> None:
    from anchoropt import testing

    model = testing.tiny_open_clip().requires_grad_(False)
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    ours = DePT(model, pf.BASE, n_ctx=M).train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "amp"):
        loss = ours.loss(torch.randn(B, 32), LABELS)
    loss.backward()
    assert torch.isfinite(loss) and ours.linear_probe_proj.weight.grad.abs().sum() > 0


def test_bad_input_is_refused(open_clip_model) -> None:
    with pytest.raises(ValueError, match="base method"):
        DePT(open_clip_model, pf.BASE, base="kgcoop")
    with pytest.raises(ValueError, match="lp_weight"):
        DePT(open_clip_model, pf.BASE, lp_weight=1.5)
    with pytest.raises(ValueError, match="base_options"):
        DePT(open_clip_model, pf.BASE, base_options={"prompt_depth": 3})
    with pytest.raises(ValueError, match="mode"):
        DePT(open_clip_model, pf.BASE).predict(torch.randn(B, 32), "all")
