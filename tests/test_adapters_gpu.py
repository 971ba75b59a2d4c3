"""The shims on CUDA: the peers' fp16 (half CLIP, half SGD) and amp (fp32 weights, fp16 autocast, GradScaler),
with the model moved after patching, as Dassl's build_model does.  Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch

import peer_fakes as pf
from anchoropt.adapters import coop, find, maple

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore:MaPLe PROMPT_DEPTH"),
]

CUDA = torch.device("cuda")


def _step(method, model, optim, h, prec):
    labels = torch.tensor([0, 3], device=CUDA)
    image = pf.images(2).to(CUDA)
    scaler = torch.amp.GradScaler("cuda", enabled=prec == "amp")
    model.train()
    with torch.autocast("cuda", dtype=torch.float16, enabled=prec == "amp"):
        if method == "coop":
            loss = h.loss(labels, logits=model(image))
        else:
            loss = h.loss(labels, base_loss=model(image, labels))
    optim.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(optim)
    scaler.update()
    model.eval()
    with torch.no_grad():
        logits = h.set_mode("novel").predict(model(image))
    return loss, logits


@pytest.mark.parametrize("prec", ["fp16", "fp32", "amp"])
def test_coop_on_cuda(prec) -> None:
    clip_model = pf.tiny_clip(prec)
    with coop.patch(pf.coop, anchors=torch.randn(1, 64)):
        model, optim, _ = pf.build_model("coop", pf.make_cfg("coop", prec=prec), pf.BASE, clip_model)
    model.to(CUDA)  # tokenized_prompts stays on the CPU, as in CoOp
    h = find(model)
    loss, logits = _step("coop", model, optim, h, prec)
    assert torch.isfinite(loss) and torch.isfinite(logits).all() and logits.device.type == "cuda"
    assert h.position.logits.is_cuda and h.position.logits.dtype == torch.float32
    assert h.anchor_text_features().is_cuda and h.template.anchor_embeddings.is_cuda


@pytest.mark.parametrize("prec", ["fp16", "amp", "fp32"])
def test_maple_on_cuda(prec) -> None:
    clip_model = pf.tiny_maple_clip(prec, n_ctx=2)
    with maple.patch(pf.maple, anchors=torch.randn(1, 64)):
        model, optim, _ = pf.build_model("maple", pf.make_cfg("maple", n_ctx=2, prec=prec), pf.BASE, clip_model)
    model.to(CUDA)
    loss, logits = _step("maple", model, optim, find(model), prec)
    assert torch.isfinite(loss) and torch.isfinite(logits).all()
