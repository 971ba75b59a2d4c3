"""Calibration of a toy CLIP checkpoint, and the record (model card) shipped next to it.

Zero-shot top-1 with the hand prompt ``"a photo of a {}."`` on the test split of
``make(DIR, classes=100, seed=0, domain=D)`` for every domain ``D``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .render import DOMAINS

__all__ = ["CALIBRATION_CLASSES", "CALIBRATION_SEED", "calibrate", "model_card_for"]

CALIBRATION_CLASSES = 100
CALIBRATION_SEED = 0


def calibrate(weights: str | os.PathLike | None, workdir: str | os.PathLike, domains=DOMAINS) -> dict[str, float]:
    """``{domain: zero-shot top-1 (a fraction)}`` of ``weights`` (the shipped checkpoint for ``None``).

    The datasets are written to ``workdir/<domain>`` unless a toy world is there already.
    """
    from .make import make
    from .model import load_model
    from .zeroshot import dataset_accuracy

    model, preprocess, tokenizer = load_model(weights)
    figures = {}
    for domain in domains:
        root = Path(workdir) / domain
        if not (root / "world.json").is_file():
            make(root, seed=CALIBRATION_SEED, classes=CALIBRATION_CLASSES, domain=domain)
        world = json.loads((root / "world.json").read_text(encoding="utf-8"))
        if (world["seed"], world["classes"], world["domain"]) != (CALIBRATION_SEED, CALIBRATION_CLASSES, domain):
            raise ValueError(f"{root} is not the calibration world (seed {CALIBRATION_SEED}, "
                             f"{CALIBRATION_CLASSES} classes, domain {domain})")
        figures[domain] = round(dataset_accuracy(root, model, preprocess, tokenizer), 4)
    return figures


def model_card_for(weights: str | os.PathLike, figures: dict, rerun: dict | None = None,
                   earlier: dict | None = None) -> dict:
    """The card of a checkpoint written by ``toyworld pretrain``: its sha256, the pretraining record beside
    it (command, recipe, wall time, threads) and the calibration ``figures`` - ``{domain: top-1}`` of the
    per-domain worlds, or ``{"suite": {...}}`` from ``calibrate --suite``; ``rerun``: another run's figures;
    ``earlier``: a card of the same file written before, whose other calibration figures are kept."""
    from .model import sha256_file

    weights = Path(weights)
    record = json.loads(weights.with_suffix(".json").read_text(encoding="utf-8"))
    card = {
        "model": "toy-clip", "file": weights.name, "sha256": sha256_file(weights), "bytes": weights.stat().st_size,
        "storage": "fp16 safetensors, loaded as fp32", "command": record.get("command"),
        "recipe": record["config"], "wall_seconds": record["wall_seconds"], "threads": record["threads"],
        "torch": record["torch"], "probe": record["probe"],
        "calibration": {},
    }
    if earlier and earlier.get("sha256") == card["sha256"]:
        card["calibration"].update(earlier.get("calibration", {}))
        if "rerun" in earlier:
            card["rerun"] = earlier["rerun"]
    if "suite" in figures:
        card["calibration"]["suite"] = figures["suite"]
    else:
        card["calibration"].update({
            "datasets": f"anchoropt toyworld make DIR --classes {CALIBRATION_CLASSES} --seed {CALIBRATION_SEED} "
                        "--domain D (test split)",
            "prompt": "a photo of a {}.", "zero_shot": figures})
    if rerun is not None:
        card["rerun"] = rerun
    return card
