"""Calibration of a toy CLIP checkpoint, and the record (model card) shipped next to it.

Zero-shot top-1 with the hand prompt ``"a photo of a {}."`` on the test split of
``make(DIR, classes=100, seed=0, domain=D)`` for every domain ``D``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .render import DOMAINS

__all__ = ["CALIBRATION_CLASSES", "CALIBRATION_SEED", "calibrate", "check_card_scope", "model_card_for"]

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


def _coverage(part: dict | None) -> tuple[set, set]:
    """(datasets, seeds) a card's ``properties`` or ``baselines`` figures cover (empty sets: none)."""
    if not part:
        return set(), set()
    return set(part.get("datasets") or ()), set(part.get("seeds") or ())


def _narrower_suite_figures(new: dict, old: dict | None) -> str | None:
    """Why ``new`` suite figures would replace broader ones in ``old`` (a part of ``old`` covering datasets or
    seeds that the same part of ``new`` lacks), or ``None``.  A part ``new`` lacks is kept, not replaced."""
    if old is None:
        return None
    for part in ("properties", "baselines"):
        if part not in old or part not in new:
            continue
        for kind, mine, theirs in zip(("datasets", "seeds"), _coverage(new[part]), _coverage(old[part])):
            missing = sorted(theirs - mine)
            if missing:
                return f"its {part} cover {kind} {missing} that this run does not"
    return None


def _refuse_narrower(new: dict, old: dict | None) -> None:
    narrower = _narrower_suite_figures(new, old)
    if narrower:
        raise ValueError(f"not writing the card: {narrower}; the card keeps its broader figures (write this "
                         "run's to another --card file; finished grid runs are kept, so rerunning is quick)")


def check_card_scope(card: str | os.PathLike, weights: str | os.PathLike | None, scope: dict) -> None:
    """Refuse, before any run, a ``calibrate --suite --card`` whose figures could not be written.

    ``scope``: what the run will cover, ``{"properties": {"datasets": [...]}, "baselines": {"datasets": [...],
    "seeds": [...]}}`` (only the parts it writes).  A card at ``card`` for the same checkpoint whose suite
    figures cover more is refused as :func:`model_card_for` would refuse it after the runs.

    Raises:
        ValueError: no ``weights`` (the card describes a checkpoint file), or a broader card.
    """
    from .model import sha256_file

    if weights is None:
        raise ValueError("--card needs --weights (the checkpoint the card describes)")
    card = Path(card)
    if not card.is_file():
        return
    earlier = json.loads(card.read_text(encoding="utf-8"))
    if earlier.get("sha256") == sha256_file(weights):
        _refuse_narrower(scope, earlier.get("calibration", {}).get("suite"))


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
        _refuse_narrower(figures["suite"], card["calibration"].get("suite"))
        card["calibration"]["suite"] = {**card["calibration"].get("suite", {}), **figures["suite"]}
    else:
        card["calibration"].update({
            "datasets": f"anchoropt toyworld make DIR --classes {CALIBRATION_CLASSES} --seed {CALIBRATION_SEED} "
                        "--domain D (test split)",
            "prompt": "a photo of a {}.", "zero_shot": figures})
    if rerun is not None:
        card["rerun"] = rerun
    return card
