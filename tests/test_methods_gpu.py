"""The method modules on CUDA: fp32, a bf16 tower, and fp16 autocast with a GradScaler; built on a CPU model that is
then moved, and built on a CUDA model.  Skipped without a CUDA device (no GPU was lent when this was written)."""

from __future__ import annotations

import pytest
import torch

from anchoropt import testing
from anchoropt.methods import CoCoOp, DePT, MaPLe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
NAMES = ["dog", "cat", "golden retriever", "aircraft carrier"]


@pytest.mark.parametrize("method", ["cocoop", "maple", "dept", "maple_timm_eva", "maple_timm_siglip"])
@pytest.mark.parametrize("prec", ["fp32", "bf16", "amp"])
def test_one_step_on_cuda(method, prec) -> None:
    if method.startswith("maple_timm"):  # MaPLe on a timm image tower (EVA02 rope / SigLIP MAP)
        model, method = testing.tiny_timm_clip(method.rsplit("_", 1)[1], embed_dim=64), "maple"
    else:
        model = testing.tiny_open_clip(layers=3, vision_layers=3)
    model = model.requires_grad_(False).to(CUDA)
    if prec == "bf16":
        model = model.to(torch.bfloat16)
    anchors = torch.randn(1, 64, device=CUDA)
    build = {"cocoop": CoCoOp, "maple": MaPLe, "dept": DePT}[method]
    options = {"prompt_depth": 3} if method == "maple" else {}
    learner = build(model, NAMES, template="anchoropt", n_ctx=2, anchors=anchors, **options).train()
    assert learner.text.ctx.device.type == "cuda" and learner.text.ctx.dtype == torch.float32
    x = torch.randn(2, 3, 32, 32, device=CUDA) if learner.takes_images else torch.randn(2, 32, device=CUDA)
    optim = torch.optim.SGD(learner.optimizer_groups(0.01), lr=0.01)
    scaler = torch.amp.GradScaler("cuda", enabled=prec == "amp")
    with torch.autocast("cuda", dtype=torch.float16, enabled=prec == "amp"):
        loss = learner(x).loss(torch.tensor([0, 3], device=CUDA))
    scaler.scale(loss).backward()
    scaler.step(optim)
    scaler.update()
    assert torch.isfinite(loss)
    learner.eval()
    heads = learner.heads(x)
    assert heads["ensemble"].device.type == "cuda" and torch.isfinite(heads["ensemble"]).all()
