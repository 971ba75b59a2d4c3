"""Scoring a trained learner: top-1 accuracy of the normal, anchor and ensemble prompts."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import data as D
from .. import distributed as dist_utils
from ..functional import clip_logits, ensemble_logits
from .config import RunConfig
from .console import _bar
from .models import ModelBundle, encode_images


@torch.no_grad()
def evaluate(
    learner: nn.Module,
    bundle: ModelBundle,
    records: Sequence[D.Record],
    classnames: Sequence[str],
    cfg: RunConfig,
    ctx: dist_utils.DistContext | None = None,
    headline: str = "base",
    description: str = "eval",
) -> dict:
    """Top-1 accuracy (%) of the normal prompt, the anchor prompt and their ensemble on ``records``.

    Text features are computed once for ``classnames`` (deterministic position matrix); under ``torchrun``
    every process scores its own slice of the images.  ``headline`` picks ``accuracy``: ``"base"``
    (normal prompt), ``"novel"`` (ensemble) or ``"anchor"``.
    """
    from torch.utils.data import DataLoader

    ctx = ctx or dist_utils.DistContext()
    learner = dist_utils.unwrap(learner)
    learner.set_classnames(list(classnames))
    learner.eval()
    with torch.no_grad():
        text_normal, text_anchor = learner.normal_features(), learner.anchor_features()
    scale = learner.logit_scale()
    mine = dist_utils.shard(list(records), ctx)
    loader = DataLoader(D.ImageDataset(mine, bundle.test_transform), batch_size=cfg.eval_batch_size,
                        num_workers=cfg.workers, generator=torch.Generator())
    counts = [0.0, 0.0, 0.0, 0.0]  # normal, anchor, ensemble, total
    bar = _bar(len(loader), description, cfg.progress and ctx.is_main)
    for images, labels, _ in loader:
        features = encode_images(bundle.model, images.to(ctx.device))
        labels = labels.to(ctx.device)
        normal = clip_logits(features, text_normal, scale)
        anchor = clip_logits(features, text_anchor, scale)
        for i, logits in enumerate((normal, anchor, ensemble_logits(normal, anchor))):
            counts[i] += float((logits.argmax(dim=-1) == labels).sum())
        counts[3] += len(labels)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    normal_ok, anchor_ok, ensemble_ok, total = dist_utils.all_reduce_sum(counts, ctx)
    pct = (lambda ok: round(100.0 * ok / total, 4) if total else float("nan"))
    result = {
        "n_images": int(total),
        "n_classes": len(classnames),
        "accuracy_normal": pct(normal_ok),
        "accuracy_anchor": pct(anchor_ok),
        "accuracy_ensemble": pct(ensemble_ok),
        "mode": headline,
    }
    result["accuracy"] = result[{"base": "accuracy_normal", "novel": "accuracy_ensemble",
                                 "anchor": "accuracy_anchor"}[headline]]
    return result


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0
