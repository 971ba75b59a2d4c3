"""The order in which ``anchoropt grid --jobs N`` hands runs to its workers: longest first.

A pool that starts a long run last leaves the other workers idle while it finishes; starting the longest runs first
(LPT scheduling) keeps every worker busy until close to the end.  The length of a run is estimated from its resolved
configuration, without training: the number of prompts the text tower encodes, which is what a prompt-learning
step costs on a frozen CLIP (the image features are cached):

- Stage II: ``epochs x steps_per_epoch x classes`` prompts, times the batch for methods whose prompts depend on the
  image (CoCoOp: one set of class prompts per image);
- Stage I (AnchorOPT, when the anchors are learned in the run): ``steps x classes`` anchor prompts (each step is
  full-batch over the classes);
- zero-shot: nothing to train.

The estimate only orders runs; every run's result is the same in any order (each run seeds itself).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, TypeVar

from .config import RunConfig

Run = TypeVar("Run")


def estimated_work(cfg: RunConfig) -> int:
    """Prompts the run encodes while training (Stage I and II): the unit of :func:`longest_first`."""
    from .protocols import _source_dataset, _training_view

    cfg = cfg.resolve()
    method = cfg.method_choice().method
    if method.loss is None:
        return 0
    train_view, _ = _training_view(_source_dataset(cfg), cfg)
    images, classes = len(train_view.train), len(train_view.classnames)
    drop_last = bool(cfg.drop_last) and images >= cfg.batch_size
    steps = cfg.epochs * max(1, (math.floor if drop_last else math.ceil)(images / cfg.batch_size))
    work = steps * classes * (cfg.batch_size if method.text_per_image else 1)
    if method.needs_anchors and not cfg.anchors:
        work += cfg.stage1_step_count(classes) * classes
    return work


def longest_first(runs: Sequence[Run], work: Callable[[Run], float]) -> list[Run]:
    """``runs`` sorted by ``work`` (largest first); runs of equal work keep their order."""
    return sorted(runs, key=lambda run: -work(run))
