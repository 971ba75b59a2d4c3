"""Scoring a trained learner: top-1 accuracy of every head it has (AnchorOPT: normal, anchor, ensemble)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..datasets import folders as D
from . import distributed as dist_utils
from .config import RunConfig
from .console import _bar
from ..methods.registry import FEATURE_INPUTS
from .models import ModelBundle, encode_images, encode_images_raw

# the run's --eval-mode names for AnchorOPT's heads (kept for results written before the method registry)
_MODE_HEADS = {"base": "normal", "novel": "ensemble", "anchor": "anchor"}


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
    features=None,
    image_input: str = "features",
    mode: str | None = None,
) -> dict:
    """Top-1 accuracy (%) of each of the learner's heads (``learner.heads(x)``) on ``records``.

    Text features are computed once for ``classnames`` (the learners cache them in evaluation); under
    ``torchrun`` every process scores its own slice of the images.  ``headline`` names the head whose
    accuracy is ``accuracy`` (``"normal"``, ``"ensemble"``, ``"prompt"`` ...; AnchorOPT also takes the modes
    ``"base"`` / ``"novel"`` / ``"anchor"``).  ``features``: a :class:`~anchoropt.runner.features.FeatureStore`
    to read frozen image features from instead of running the image tower; ``image_input="images"`` passes
    the images themselves to a learner that runs the image tower (visual prompts), ``"raw_features"`` the
    image features without L2 normalisation (DePT).  ``mode`` is recorded
    as the result's ``mode`` (default: ``headline``).
    """
    from torch.utils.data import DataLoader

    ctx = ctx or dist_utils.DistContext()
    learner = dist_utils.unwrap(learner)
    learner.set_classnames(list(classnames))
    learner.eval()
    mine = dist_utils.shard(list(records), ctx)
    encode = encode_images if image_input == "features" else encode_images_raw
    if features is not None and image_input in FEATURE_INPUTS:
        table = features.table(mine)
        labels_all = torch.tensor([r.label for r in mine], dtype=torch.long)
        step = cfg.eval_batch_size
        batches = [(table[i:i + step], labels_all[i:i + step]) for i in range(0, len(mine), step)]
        n_batches = len(batches)
    else:
        loader = DataLoader(D.ImageDataset(mine, bundle.test_transform), batch_size=cfg.eval_batch_size,
                            num_workers=cfg.workers, generator=torch.Generator())
        batches, n_batches = ((images, labels) for images, labels, _ in loader), len(loader)
    names: list[str] | None = None
    counts: list[float] = []
    seen = 0.0
    bar = _bar(n_batches, description, cfg.progress and ctx.is_main)
    for inputs, labels in batches:
        inputs = inputs.to(ctx.device)
        if features is None and image_input in FEATURE_INPUTS:
            inputs = encode(bundle.model, inputs)
        heads = learner.heads(inputs)
        if names is None:
            names = list(heads)
            counts = [0.0] * len(names)
        labels = labels.to(ctx.device)
        for i, name in enumerate(names):
            counts[i] += float((heads[name].argmax(dim=-1) == labels).sum())
        seen += len(labels)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    if names is None:  # no image on this process: ask the learner for its head names on an empty batch
        names = list(learner.heads(torch.zeros(0, _feature_width(learner), device=ctx.device)))
        counts = [0.0] * len(names)
    *oks, total = dist_utils.all_reduce_sum([*counts, seen], ctx)
    pct = (lambda ok: round(100.0 * ok / total, 4) if total else float("nan"))
    head = headline if headline in names else _MODE_HEADS.get(headline, headline)
    if head not in names:
        raise ValueError(f"this learner has no head {headline!r} (heads: {names})")
    result = {"n_images": int(total), "n_classes": len(classnames)}
    result.update({f"accuracy_{name}": pct(ok) for name, ok in zip(names, oks)})
    result.update(mode=mode or headline, head=head, accuracy=result[f"accuracy_{head}"])
    return result


def _feature_width(learner: nn.Module) -> int:
    return int(learner.tower.output_dim)


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0
