"""Checks of a run's input files before any model is built or any stage runs (errors in seconds, not after
Stage I): descriptions, anchors, images, and the shots each class can give."""

from __future__ import annotations

import os
import warnings
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
    """Every image of ``records`` opens (``decode``: is read whole and converted to RGB, as training and
    evaluation will: a truncated file or an unsupported mode is found here, not after training).

    Each file is checked once per process while its size, mtime and ctime stay the same; the files are
    read by a few threads (Pillow's decoders release the GIL).  Raises one ``ValueError`` naming up to five
    unreadable files and their count.
    """
    from concurrent.futures import ThreadPoolExecutor

    unique = list(dict.fromkeys(str(record.path) for record in records))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = list(pool.map(lambda path: _image_problem(path, decode), unique))
    bad = [f"{path} ({problem})" for path, problem in zip(unique, problems) if problem]
    if bad:
        raise ValueError(f"{len(bad)} {what} image(s) cannot be read, e.g. " + "; ".join(bad[:5])
                         + ": fix or remove them before training")


_CHECKED: set[tuple] = set()  # (path, decode, size, mtime_ns, ctime_ns) of the images this process found readable


def _image_problem(path: str, decode: bool) -> str | None:
    """``None`` when the image at ``path`` opens (``decode``: and reads whole as RGB), else what is wrong."""
    from PIL import Image

    try:
        stat = os.stat(path)
        key = (path, decode, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        if key in _CHECKED or (path, True, *key[2:]) in _CHECKED:
            return None
        if decode:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a clipping warning is given again when the image is used
                D.load_rgb(path)
        else:
            with Image.open(path):
                pass
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {str(err).replace(f'{path}: ', '', 1)}"
    _CHECKED.add(key)
    return None


def short_class_report(source: D.DatasetSplits, cfg: RunConfig) -> dict[str, dict[str, int]]:
    """``{split: {class: images}}`` of the classes with fewer images than the shots asked (sampled with
    replacement, as Dassl); recorded in results.json.  Only the training split: the runner never uses the
    validation split, so its shortage is not reported."""
    report = {"train": D.short_classes(source.train, cfg.shots)}
    return {split: classes for split, classes in report.items() if classes}


def check_class_specific(choice, trained: Sequence[str], targets: Sequence[D.DatasetSplits]) -> None:
    """A class-specific context (``csc=true``) scores only its trained classes: refuse targets of other classes
    before training (base-to-novel is refused with the run's options, :meth:`RunConfig.validate`)."""
    if not choice.options.get("csc"):
        return
    for target in targets:
        if list(target.classnames) != list(trained):
            raise ValueError(f"{choice.label!r}: a class-specific context (csc=true) has one context per trained "
                             f"class and cannot score target {target.name!r} (other classes); drop csc=true or "
                             "the target")


def check_pretrained(cfg: RunConfig) -> None:
    """The toy CLIP's ``--pretrained FILE``: a safetensors checkpoint of its architecture (read from the file's
    header only), so another architecture's file is refused before any model is built."""
    from pathlib import Path

    from .models import TOY_MODEL

    if cfg.model == TOY_MODEL and cfg.pretrained and Path(cfg.pretrained).is_file():
        from ..toyworld.model import check_weights

        try:
            check_weights(cfg.pretrained)
        except ValueError as err:
            raise ValueError(f"--pretrained: {err}") from None
