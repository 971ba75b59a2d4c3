"""DePT shim: CoOp's prompt construction under DePT's ELP CustomCLIP (FiLM + linear probe untouched),
NAMES_TO_UPDATE freezing, no KD by default, novel classes by the ensemble with the anchor prompt."""

from __future__ import annotations

import pytest
import torch

import peer_fakes as pf
from anchoropt.adapters import cocoop, coop, dept, find, maple

B = 2


def _build(subsample="base", classnames=pf.BASE, **opts):
    clip_model = pf.tiny_clip("fp32")
    cfg = pf.make_cfg("dept", subsample=subsample)
    with dept.patch(pf.coop, anchors=pf.word_embedding(clip_model, "a")[:1], **opts):  # DePT's ELP inherits coop's
        model, optim, registered = pf.build_model("dept", cfg, classnames, clip_model)
    return model, optim, registered


def test_patching_trainers_coop_covers_the_elp_customclip() -> None:
    model, optim, _ = _build()
    h = find(model)
    assert isinstance(h, coop.CoOpInjection) and h.loss_config.kd_weight == 0.0  # DePT+AnchorOPT: no KD
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "prompt_learner.anchoropt.position.logits" in trainable  # NAMES_TO_UPDATE substring match
    assert {"film_lp_img.scale", "linear_probe_proj.weight", "prompt_learner.ctx"} <= trainable
    assert not any("anchors" in n for n in trainable)  # a buffer: NAMES_TO_UPDATE cannot unfreeze it
    assert id(h.position.logits) in {id(p) for g in optim.param_groups for p in g["params"]}


def test_training_keeps_depts_loss_and_heads() -> None:
    model, optim, _ = _build()
    h = find(model)
    model.train()
    labels = torch.tensor([0, 3])
    dept_loss = model(pf.images(B), labels)  # (1 - w) CE(similarity) + w CE(linear probe)
    loss = h.loss(labels, base_loss=dept_loss)
    assert torch.equal(loss, dept_loss.float())  # ce_weight 1, kd_weight 0
    film_before = model.film_lp_img.scale.detach().clone()
    optim.zero_grad()
    loss.backward()
    assert model.linear_probe_proj.weight.grad.abs().sum() > 0 and model.film_lp_text.scale.grad is not None
    assert h.position.logits.grad.abs().sum() > 0
    optim.step()
    assert not torch.equal(model.film_lp_img.scale, film_before)  # DePT's heads train as before
    h.loss_config.ce_weight = 10.0  # the authors' DePT "CE" column weights DePT's own loss
    torch.testing.assert_close(h.loss(labels, base_loss=dept_loss.detach()), 10.0 * dept_loss.detach().float())


def test_kd_can_be_switched_on() -> None:
    model, _, _ = _build(kd_weight=1.0)
    h = find(model)
    model.train()
    labels = torch.tensor([1, 2])
    dept_loss = model(pf.images(B), labels)
    assert h.loss(labels, base_loss=dept_loss) > dept_loss  # + KD on the rebuilt similarity logits


def test_base_keeps_fused_logits_and_novel_uses_the_ensemble() -> None:
    model, _, registered = _build()
    model.eval()
    with torch.no_grad():
        fused = model(pf.images(B))
    assert find(model).mode == "base" and find(model).predict(fused) is fused

    saved = registered.state_dict()  # DePT registers the whole model
    novel, _, _ = _build(subsample="new", classnames=pf.NOVEL)
    result = pf.dassl_load(novel, saved, prefix_keys=True)
    assert "linear_probe_proj.weight" in result.unexpected_keys  # base-class head: ignored, as in DePT
    hn = find(novel)
    assert hn.mode == "novel"
    novel.eval()
    with torch.no_grad():
        similarity = novel(pf.images(B))
        logits = hn.predict(similarity)
    torch.testing.assert_close(logits, (similarity.float() + hn.anchor_logits()) / 2)
    assert torch.equal(novel.state_dict()["prompt_learner.anchoropt.position.logits"],
                       saved["prompt_learner.anchoropt.position.logits"])


@pytest.mark.filterwarnings("ignore:MaPLe PROMPT_DEPTH")
def test_method_detection_for_elp_cocoop_and_elp_maple() -> None:
    with dept.patch(pf.cocoop, anchors=torch.zeros(1, 64)) as patch:
        assert patch.attr == "PromptLearner"
        model = pf.cocoop.CustomCLIP(pf.make_cfg("cocoop"), pf.BASE, pf.tiny_clip("fp32"))
    assert isinstance(find(model), cocoop.CoCoOpInjection) and find(model).loss_config.kd_weight == 0.0
    with dept.patch(pf.maple, anchors=torch.zeros(1, 64)) as patch:
        assert patch.attr == "MultiModalPromptLearner"
        model = pf.maple.CustomCLIP(pf.make_cfg("maple", n_ctx=2), pf.BASE, pf.tiny_maple_clip("fp32", n_ctx=2))
    assert isinstance(find(model), maple.MaPLeInjection)
    clip_model = pf.tiny_clip("fp32")
    plain = pf.coop.CustomCLIP(pf.make_cfg("coop"), pf.BASE, clip_model)
    h = dept.wrap(plain.prompt_learner, clip_model=clip_model, classnames=pf.BASE, anchors=torch.zeros(1, 64))
    assert isinstance(h, coop.CoOpInjection) and h.loss_config.kd_weight == 0.0
