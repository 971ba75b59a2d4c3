"""What a toy CLIP must show for the benchmark to mean something, measured on a suite (no training):

* **temperature**: the learned logit scale (CLIP's is 100; target >= :data:`MIN_LOGIT_SCALE`);
* **a context matters**: zero-shot top-1 under each of :data:`TEMPLATES` on every dataset; the spread
  (best - worst template) must reach :data:`MIN_TEMPLATE_SPREAD` points on at least half of the datasets.
  Reported beside it: the gain of the prompt that names the dataset's style (:data:`STYLE_PROMPTS`) over the
  hand prompt - the caption-to-task gap a learned context can close;
* **descriptions carry what names lack**: a CuPL-style classifier (the mean of each class's description
  features) against the name-only hand prompt, averaged over the suite: a gain of at least
  :data:`MIN_CUPL_GAIN` points.

Axes: ``N`` test images, ``C`` classes, ``E`` joint-embedding width.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .zeroshot import PROMPT, accuracy, class_text_features, image_features

__all__ = ["TEMPLATES", "MIN_LOGIT_SCALE", "MIN_TEMPLATE_SPREAD", "MIN_CUPL_GAIN", "description_features",
           "dataset_properties", "suite_properties", "property_targets"]

TEMPLATES = (
    PROMPT, "a {}.", "a picture of a {}.", "a sketch of a {}.", "a blurry photo of a {}.", "a dark photo of a {}.",
    "a painting of a {}.", "the texture of a {}.", "a scene with a {}.", "a photo of the {}, a type of object.",
)
"""The hand prompt first, then generic and style-naming prompts a user might try."""

STYLE_PROMPTS = {"sketch": "a sketch of a {}.", "blurry": "a blurry photo of a {}.", "dark": "a dark photo of a {}.",
                 "painting": "a painting of a {}.", "texture": "the texture of a {}.", "scene": "a scene with a {}."}
"""The prompt naming each pretrained style (a dataset in that style: how much naming it is worth)."""

MIN_LOGIT_SCALE = 50.0
MIN_TEMPLATE_SPREAD = 3.0
MIN_CUPL_GAIN = 2.0


@torch.no_grad()
def description_features(model: nn.Module, tokenizer: Callable, descriptions: dict[str, list[str]],
                         classnames: Sequence[str]) -> torch.Tensor:
    """CuPL's classifier ``(C, E)``: the normalised mean of each class's normalised description features."""
    from .model import encode_text

    device = next(model.parameters()).device
    rows = []
    for name in classnames:
        sentences = descriptions.get(name)
        if not sentences:
            raise ValueError(f"descriptions hold no sentence for class {name!r}")
        feats = F.normalize(encode_text(model, tokenizer(sentences).to(device)).float(), dim=-1)
        rows.append(F.normalize(feats.mean(dim=0), dim=-1))
    return torch.stack(rows)


def dataset_properties(root: str | os.PathLike, model: nn.Module, preprocess: Callable, tokenizer: Callable,
                       templates: Sequence[str] = TEMPLATES) -> dict:
    """Zero-shot top-1 (points) of every template and of CuPL's classifier on ``root``'s test split."""
    from ..datasets.folders import ImageDataset, open_dataset

    dataset = open_dataset(root)
    records = dataset.split("test")
    loader = torch.utils.data.DataLoader(ImageDataset(records, preprocess), batch_size=512)
    feats = torch.cat([image_features(model, images) for images, _, _ in loader])
    labels = [r.label for r in records]
    by_template = {t: round(100 * accuracy(feats, class_text_features(model, tokenizer, dataset.classnames, t),
                                           labels), 2) for t in templates}
    descriptions = json.loads((Path(root) / "descriptions.json").read_text(encoding="utf-8"))
    cupl = 100 * accuracy(feats, description_features(model, tokenizer, descriptions, dataset.classnames), labels)
    values = list(by_template.values())
    out = {"templates": by_template, "template_spread": round(max(values) - min(values), 2),
           "hand_prompt": by_template[templates[0]], "cupl": round(cupl, 2),
           "cupl_gain": round(cupl - by_template[templates[0]], 2), "test_images": len(records)}
    world_file = Path(root) / "world.json"
    style = json.loads(world_file.read_text(encoding="utf-8")).get("domain") if world_file.is_file() else None
    if style in STYLE_PROMPTS:
        own = 100 * accuracy(feats, class_text_features(model, tokenizer, dataset.classnames, STYLE_PROMPTS[style]),
                             labels)
        out.update(style=style, style_prompt_gain=round(own - by_template[templates[0]], 2))
    return out


def suite_properties(suite_root: str | os.PathLike, model: nn.Module, preprocess: Callable, tokenizer: Callable,
                     names: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """:func:`dataset_properties` for each base-to-novel dataset of the suite, the logit scale, and
    :func:`property_targets`."""
    from .suite import read_suite, suite_scope

    names, _ = suite_scope(read_suite(suite_root), names, ())
    per_dataset = {}
    for name in names:
        per_dataset[name] = dataset_properties(Path(suite_root) / name, model, preprocess, tokenizer)
        p = per_dataset[name]
        own = f", naming its style ({p['style']}) {p['style_prompt_gain']:+.1f}" if "style" in p else ""
        log(f"{name}: hand prompt {p['hand_prompt']:.1f}, templates {min(p['templates'].values()):.1f}.."
            f"{max(p['templates'].values()):.1f} (spread {p['template_spread']:.1f}){own}, CuPL {p['cupl']:.1f} "
            f"({p['cupl_gain']:+.1f})")
    figures = {"logit_scale": round(float(model.logit_scale.exp()), 2), "datasets": per_dataset}
    figures["targets"] = property_targets(figures)
    return figures


def property_targets(figures: dict) -> dict:
    """Which of the world's targets hold: ``{target: {"value": .., "holds": bool}}``."""
    datasets = figures["datasets"].values()
    spread_share = sum(d["template_spread"] >= MIN_TEMPLATE_SPREAD for d in datasets) / max(1, len(datasets))
    cupl_gain = sum(d["cupl_gain"] for d in datasets) / max(1, len(datasets))
    return {
        f"logit scale >= {MIN_LOGIT_SCALE:g}": {"value": figures["logit_scale"],
                                                "holds": figures["logit_scale"] >= MIN_LOGIT_SCALE},
        f"template spread >= {MIN_TEMPLATE_SPREAD:g} pts on >= half the datasets": {
            "value": round(spread_share, 3), "holds": spread_share >= 0.5},
        f"CuPL - hand prompt >= {MIN_CUPL_GAIN:g} pts (suite mean)": {
            "value": round(cupl_gain, 2), "holds": cupl_gain >= MIN_CUPL_GAIN},
    }
