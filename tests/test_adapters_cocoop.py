"""CoCoOp shim: meta-net-shifted soft tokens, then one position matrix for the batch; meta-net and position
logits trained; (B, n_cls, 77, D) output; the loss from a model that returns CE in training."""

from __future__ import annotations

import pytest
import torch

import peer_fakes as pf
from anchoropt.adapters import CHILD_NAME, cocoop, find

M, N, B = 4, 1, 3


def _build(prec="fp32", classnames=pf.BASE, **opts):
    clip_model = pf.tiny_clip(prec)
    cfg = pf.make_cfg("cocoop", prec=prec, subsample=opts.pop("subsample", "base"))
    with cocoop.patch(pf.cocoop, anchors=pf.word_embedding(clip_model, "a")[:1], **opts):
        model, optim, _ = pf.build_model("cocoop", cfg, classnames, clip_model)
    return model, optim, clip_model


def _sources(pl, image_features):
    with torch.no_grad():
        shifted = pl.ctx[None] + pl.meta_net(image_features)[:, None]  # (B, M, D): CoCoOp's own shift
    anchors = find(pl).anchors.to(shifted.dtype).expand(shifted.shape[0], N, -1)
    return torch.cat([shifted, anchors], dim=1)  # (B, M+N, D)


def test_output_shape_and_one_matrix_for_the_batch() -> None:
    model, _, clip_model = _build()
    pl = model.prompt_learner
    feats = clip_model.visual(pf.images(B)).detach()
    feats = feats / feats.norm(dim=-1, keepdim=True)
    sources = _sources(pl, feats)
    model.train()
    for _ in range(3):
        prompts = pl(feats).detach()
        assert prompts.shape == (B, len(pf.BASE), 77, 64)
        slots = prompts[:, :, 1 : 1 + M + N]  # (B, C, K, D)
        same = (slots[:, :, :, None] == sources[:, None, None]).all(-1)  # (B, C, slot, source)
        assert bool((same.sum(-1) >= 1).all())  # every slot is one meta-net-shifted soft token or the anchor
        assert bool((same == same[:1, :1]).all())  # one arrangement for every image and class
    assert torch.equal(prompts[:, :, 1 + M + N :], pl.token_suffix[None, :, :-N].expand(B, -1, -1, -1))


def test_gradients_reach_ctx_position_logits_and_meta_net() -> None:
    model, optim, _ = _build()
    pl, h = model.prompt_learner, find(model)
    params = {id(p) for g in optim.param_groups for p in g["params"]}
    assert {id(h.position.logits), id(pl.meta_net.linear1.weight), id(pl.ctx)} <= params
    model.train()
    labels = torch.tensor([0, 3, 1])
    base_loss = model(pf.images(B), labels)  # CoCoOp's CustomCLIP returns its CE in training
    loss = h.loss(labels, base_loss=base_loss)
    optim.zero_grad()
    loss.backward()
    for p in (pl.ctx, h.position.logits, pl.meta_net.linear1.weight, pl.meta_net.linear2.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the CE term equals the peer's own CE on the rebuilt logits
    torch.testing.assert_close(
        torch.nn.functional.cross_entropy(h.normal_logits(), labels), base_loss.float(), atol=1e-5, rtol=1e-5
    )


def test_rebuilt_logits_equal_the_models_and_predict_ensembles() -> None:
    model, _, _ = _build(subsample="new")
    h = find(model)
    assert h.mode == "novel"
    model.eval()
    with torch.no_grad():
        logits = model(pf.images(B))
        torch.testing.assert_close(h.normal_logits(), logits.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h.predict(logits), (logits.float() + h.anchor_logits()) / 2)


def test_remove_restores_the_original_outputs_exactly() -> None:
    clip_model = pf.tiny_clip("fp32")
    model = pf.cocoop.CustomCLIP(pf.make_cfg("cocoop"), pf.BASE, clip_model).eval()
    image = pf.images(B)
    with torch.no_grad():
        before = model(image)
    h = cocoop.wrap(model.prompt_learner, clip_model=clip_model, classnames=pf.BASE, anchors=torch.randn(1, 64),
                    owner=model)
    with torch.no_grad():
        assert not torch.equal(model(image), before)
    h.remove()
    with torch.no_grad():
        assert torch.equal(model(image), before)
    assert not hasattr(model.prompt_learner, CHILD_NAME)


@pytest.mark.parametrize("prec", ["fp16", "amp"])
def test_half_meta_net_and_autocast(prec) -> None:
    model, optim, _ = _build(prec)
    pl, h = model.prompt_learner, find(model)
    assert pl.meta_net.linear1.weight.dtype == (torch.float16 if prec == "fp16" else torch.float32)
    model.train()
    labels = torch.tensor([0, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "amp"):
        loss = h.loss(labels, base_loss=model(pf.images(B), labels))
    optim.zero_grad()
    loss.backward()
    optim.step()
    assert torch.isfinite(loss) and h.position.logits.grad.abs().sum() > 0
    assert h.position.logits.dtype == torch.float32


def test_base_to_novel_reload() -> None:
    model, _, _ = _build()
    saved = model.prompt_learner.state_dict()
    novel, _, _ = _build(classnames=pf.NOVEL, subsample="new")
    pf.dassl_load(novel.prompt_learner, saved)
    for key in ("ctx", "meta_net.linear1.weight", "anchoropt.position.logits", "anchoropt.anchors"):
        assert torch.equal(novel.prompt_learner.state_dict()[key], saved[key])
    novel.eval()
    with torch.no_grad():
        out = find(novel).predict(novel(pf.images(B)))
    assert out.shape == (B, len(pf.NOVEL))


def test_a_coop_learner_is_refused() -> None:
    clip_model = pf.tiny_clip("fp32")
    model = pf.coop.CustomCLIP(pf.make_cfg("coop"), pf.BASE, clip_model)
    with pytest.raises(TypeError, match="meta_net"):
        cocoop.wrap(model.prompt_learner, clip_model=clip_model, classnames=pf.BASE, anchors=torch.zeros(1, 64))
