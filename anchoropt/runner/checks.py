"""Checks of a run's input files before any model is built or any stage runs (errors in seconds, not after
Stage I): descriptions, anchors, images, and the shots each class can give."""

from __future__ import annotations

from typing import Sequence

import torch

from ..datasets import folders as D
from .config import RunConfig


def check_descriptions(cfg: RunConfig, classnames: Sequence[str]) -> None:
    """The descriptions file parses and covers every class Stage I will learn from."""
    from ..descriptions import load_descriptions

    if cfg.descriptions:
        load_descriptions(cfg.descriptions, list(classnames), cfg.max_descriptions)


def check_anchor_file(cfg: RunConfig) -> torch.Tensor | None:
    """The ``--anchors`` file's anchors ``(N, D)`` (read, finite, checked; the width is checked on the model)."""
    from ..io import load_anchors

    return load_anchors(cfg.anchors) if cfg.anchors else None


def check_images(records: Sequence[D.Record], what: str, decode: bool) -> None:
    """Every image of ``records`` opens (``decode``: is read whole, as training will).

    Raises one ``ValueError`` naming up to five unreadable files and their count.
    """
    from PIL import Image

    bad = []
    for record in records:
        try:
            with Image.open(record.path) as image:
                if decode:
                    image.convert("RGB")
        except (OSError, ValueError, SyntaxError) as err:  # PIL raises SyntaxError for some corrupt headers
            bad.append(f"{record.path} ({type(err).__name__}: {err})")
    if bad:
        raise ValueError(f"{len(bad)} {what} image(s) cannot be read, e.g. " + "; ".join(bad[:5])
                         + ": fix or remove them before training")


def short_class_report(source: D.DatasetSplits, cfg: RunConfig) -> dict[str, dict[str, int]]:
    """``{split: {class: images}}`` of the classes with fewer images than the shots asked (sampled with
    replacement, as Dassl); recorded in results.json.  Only the training split: the runner never uses the
    validation split, so its shortage is not reported."""
    report = {"train": D.short_classes(source.train, cfg.shots)}
    return {split: classes for split, classes in report.items() if classes}

