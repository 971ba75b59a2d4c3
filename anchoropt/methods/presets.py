"""Per-dataset hyperparameters from the authors' released tables (ATPrompt repository, ``docs/AnchorOPT.md``).

``preset("caltech101")`` gives the CoOp+AnchorOPT settings the authors list for Caltech101: soft-token
count, epochs, CE / KD weights and KD temperature, with ``kd_normalization="released"`` (KL summed and
divided by batch x classes, which is what those weights were tuned for).  The CoCoOp, MaPLe and DePT tables
are here too (``method=``) for the adapter shims and for reference; the experiment runner trains the
CoOp-style shallow learner.

Shared settings of the released configs: SGD lr 0.002 (MaPLe / DePT 0.0035), momentum 0.9, weight decay 5e-4,
cosine schedule after one warm-up epoch at a constant 1e-5, 16 shots, one anchor token, Gumbel tau 1.
Stage I: SGD lr 0.002, batch 32 (its loss ignores the images: an epoch is ``floor(shots * classes / 32)``
identical full-batch steps), MSE weight 1000 (StanfordCars 100), the first 10 descriptions per class
(ImageNet 5).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

__all__ = [
    "Preset", "preset", "available_presets", "canonical_name", "METHODS", "DATASETS",
    "atprompt_attributes", "atprompt_attribute_bases", "zeroshot_template",
]

METHODS = ("coop", "cocoop", "maple", "dept")

DATASETS = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
)

# Spellings users meet: Dassl dataset class names, CoOp folder names, the descriptions files' names.
_ALIASES = {
    "imagenet": "imagenet", "caltech101": "caltech101", "caltech-101": "caltech101",
    "oxfordpets": "oxford_pets", "oxford_pets": "oxford_pets", "pets": "oxford_pets",
    "stanfordcars": "stanford_cars", "stanford_cars": "stanford_cars", "cars": "stanford_cars",
    "oxfordflowers": "oxford_flowers", "oxford_flowers": "oxford_flowers", "flowers102": "oxford_flowers",
    "flowers": "oxford_flowers", "food101": "food101", "food-101": "food101", "fgvcaircraft": "fgvc_aircraft",
    "fgvc_aircraft": "fgvc_aircraft", "fgvc": "fgvc_aircraft", "aircraft": "fgvc_aircraft", "sun397": "sun397",
    "dtd": "dtd", "describabletextures": "dtd", "eurosat": "eurosat", "ucf101": "ucf101", "ucf-101": "ucf101",
    # domain-generalisation targets reuse ImageNet's settings (and its anchors) in the released code
    "imagenetv2": "imagenet", "imagenet_sketch": "imagenet", "imagenet-sketch": "imagenet",
    "imagenetsketch": "imagenet", "imagenet_a": "imagenet", "imagenet-a": "imagenet", "imageneta": "imagenet",
    "imagenet_r": "imagenet", "imagenet-r": "imagenet", "imagenetr": "imagenet",
}

# (n_soft, epochs, ce_weight, kd_weight, kd_temperature) - official_implementation.md §2 (docs/AnchorOPT.md:133-146)
_COOP = {
    "imagenet": (6, 20, 100, 1000, 1.0),
    "caltech101": (4, 100, 100, 1000, 2.0),
    "oxford_pets": (4, 100, 100, 1000, 1.0),
    "stanford_cars": (8, 100, 100, 100, 4.0),
    "oxford_flowers": (4, 100, 100, 100, 2.0),
    "food101": (4, 20, 100, 1000, 4.0),
    "fgvc_aircraft": (4, 100, 100, 1, 4.0),
    "sun397": (8, 20, 100, 1, 2.0),
    "dtd": (4, 100, 100, 10, 4.0),
    "eurosat": (4, 100, 1, 0, 1.0),
    "ucf101": (8, 100, 100, 1000, 1.0),
}
# CoCoOp (batch 1) - §3 (docs/AnchorOPT.md:149-162)
_COCOOP = {
    "imagenet": (4, 10, 100, 100, 4.0), "caltech101": (4, 20, 10, 1000, 4.0), "oxford_pets": (4, 20, 10, 100, 2.0),
    "stanford_cars": (4, 20, 100, 100, 4.0), "oxford_flowers": (4, 20, 10, 100, 4.0),
    "food101": (4, 20, 10, 100, 4.0), "fgvc_aircraft": (4, 20, 10, 100, 0.5), "sun397": (8, 10, 10, 1000, 2.0),
    "dtd": (4, 20, 10, 100, 4.0), "eurosat": (4, 20, 100, 100, 0.5), "ucf101": (4, 20, 10, 100, 0.1),
}
# MaPLe (batch 4, lr 0.0035, prompt depth 9) - §4 (docs/AnchorOPT.md:164-177).  Cars: KD weight 0 with
# KD_T 0.0 in the table; T = 0 would divide by zero, KD is off anyway, so 1.0 is stored.
_MAPLE = {
    "imagenet": (8, 5, 1, 100, 1.0), "caltech101": (8, 10, 10, 1000, 2.0), "oxford_pets": (8, 10, 1, 10, 0.5),
    "stanford_cars": (4, 20, 10, 0, 1.0), "oxford_flowers": (4, 20, 10, 100, 2.0),
    "food101": (8, 10, 1, 100, 1.0), "fgvc_aircraft": (4, 10, 1, 10, 4.0), "sun397": (4, 20, 10, 1000, 4.0),
    "dtd": (4, 20, 1, 10, 4.0), "eurosat": (4, 20, 1, 1, 2.0), "ucf101": (8, 10, 1, 1, 2.0),
}
# DePT (batch 4, lr 0.0035, no KD) - §5 (docs/AnchorOPT.md:179-192): (n_soft, epochs, ce_weight, linear-probe weight)
_DEPT = {
    "imagenet": (4, 10, 10, 0.5), "caltech101": (4, 10, 10, 0.5), "oxford_pets": (4, 10, 10, 0.5),
    "stanford_cars": (8, 20, 10, 0.6), "oxford_flowers": (8, 10, 10, 0.9), "food101": (4, 10, 10, 0.5),
    "fgvc_aircraft": (4, 20, 10, 0.6), "sun397": (8, 10, 10, 0.6), "dtd": (8, 10, 10, 0.8),
    "eurosat": (8, 20, 10, 0.9), "ucf101": (8, 10, 10, 0.8),
}
# "default": each method's base-to-novel script's own values (n_soft, epochs, ce_weight, kd_weight, kd_temperature;
# DePT: n_soft, epochs, ce_weight, linear-probe weight) - scripts/{coop,cocoop,maple,dept}/anchoropt_base2new_train.sh
# (coop :13-17, cocoop :14-18, maple :14-18, dept :14-17; DePT's script sets no KD)
_DEFAULT = {"coop": (4, 100, 100, 1000, 1.0), "cocoop": (4, 20, 100, 1000, 1.0), "maple": (4, 10, 100, 1000, 1.0),
            "dept": (4, 10, 1, 0.7)}
# Stage I: (epochs, MSE weight) - §1 (docs/AnchorOPT.md:118-131)
_STAGE1 = {
    "imagenet": (10, 1000), "caltech101": (100, 1000), "oxford_pets": (100, 1000), "stanford_cars": (40, 100),
    "oxford_flowers": (100, 1000), "food101": (20, 1000), "fgvc_aircraft": (20, 1000), "sun397": (20, 1000),
    "dtd": (100, 1000), "eurosat": (100, 1000), "ucf101": (100, 1000),
}

# ATPrompt (pae_atprompt.md §2.3; docs/ATPrompt.md and train.py of the released code): the five LLM attribute
# bases per dataset and the searched attributes its results use.  "playfulness" is two CLIP tokens (play +
# fulness): anchoropt keeps it whole; the released one-token slice (legacy_single_token) does not.
_ATPROMPT = {
    "imagenet": (("color", "size", "shape", "habitat", "behavior"), ("color", "shape")),
    "caltech101": (("shape", "color", "material", "function", "size"), ("shape", "size")),
    "oxford_pets": (("loyalty", "affection", "playfulness", "energy", "intelligence"), ("playfulness", "energy")),
    "stanford_cars": (("design", "engine", "performance", "luxury", "color"), ("luxury",)),
    "oxford_flowers": (("color", "flower", "habitat", "growth", "season"), ("color", "habitat", "growth")),
    "food101": (("flavor", "texture", "origin", "ingredients", "preparation"), ("flavor", "preparation")),
    "fgvc_aircraft": (("design", "capacity", "range", "engines", "liveries"), ("design", "range")),
    "sun397": (("architecture", "environment", "structure", "design", "function"), ("function",)),
    "dtd": (("pattern", "texture", "color", "design", "structure"), ("pattern", "color", "design")),
    "eurosat": (("habitat", "foliage", "infrastructure", "terrain", "watercourse"), ("habitat",)),
    "ucf101": (("precision", "coordination", "technique", "strength", "control"), ("precision",)),
}
# Zero-shot CLIP's hand-written per-dataset templates, as the CoOp family's zero-shot baseline uses them.
_ZEROSHOT = {
    "oxford_pets": "a photo of a {}, a type of pet.", "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.", "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.", "food101": "a photo of {}, a type of food.",
    "ucf101": "a photo of a person doing {}.",
}


def atprompt_attributes(name: str) -> tuple[str, ...]:
    """ATPrompt's searched attribute words for dataset ``name`` (e.g. ``("playfulness", "energy")`` for Pets)."""
    return _ATPROMPT[_dataset_key(name, "ATPrompt attributes")][1]


def atprompt_attribute_bases(name: str) -> tuple[str, ...]:
    """The five LLM attribute bases ATPrompt's search started from for dataset ``name``."""
    return _ATPROMPT[_dataset_key(name, "ATPrompt attributes")][0]


def zeroshot_template(name: str) -> str:
    """The hand-written zero-shot template for dataset ``name`` (``"a photo of a {}."`` unless listed)."""
    return _ZEROSHOT.get(_dataset_key(name, "a zero-shot template"), "a photo of a {}.")


def _dataset_key(name: str, what: str) -> str:
    key = canonical_name(name)
    if key not in DATASETS:
        raise KeyError(f"no {what} for {name!r}; datasets with one: {', '.join(DATASETS)}")
    return key


@dataclass(frozen=True)
class Preset:
    """One dataset's training settings.  ``asdict(preset)`` gives plain keyword arguments.

    Stage II: ``n_soft`` (M), ``epochs``, ``ce_weight``, ``kd_weight``, ``kd_temperature``,
    ``kd_normalization``, ``batch_size``, ``lr``, ``momentum``, ``weight_decay``, ``warmup_epochs``,
    ``warmup_lr``, ``shots``, ``n_anchor``, ``tau``.  Stage I: ``stage1_epochs``, ``stage1_mse_weight``,
    ``stage1_lr``, ``stage1_batch_size``, ``max_descriptions``.  ``extra`` holds method-specific values
    (DePT's ``linear_probe_weight``).  ``drop_last``: Stage II's loader drops the last partial batch of an epoch,
    as every released trainer's (Dassl's ``build_data_loader``: ``drop_last=is_train and len(data) >= batch``).
    """

    name: str
    method: str = "coop"
    n_soft: int = 4
    epochs: int = 100
    ce_weight: float = 100.0
    kd_weight: float = 1000.0
    kd_temperature: float = 1.0
    kd_normalization: str = "released"
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    shots: int = 16
    n_anchor: int = 1
    tau: float = 1.0
    stage1_epochs: int = 100
    stage1_mse_weight: float = 1000.0
    stage1_lr: float = 0.002
    stage1_batch_size: int = 32
    max_descriptions: int = 10
    drop_last: bool = True
    extra: dict = field(default_factory=dict)

    def stage1_steps(self, n_classes: int, shots: int | None = None) -> int:
        """Stage I steps equivalent to the released schedule: ``epochs * floor(shots * classes / batch)``."""
        shots = self.shots if shots is None else shots
        return self.stage1_epochs * max(1, math.floor(shots * n_classes / self.stage1_batch_size))

    def to_dict(self) -> dict:
        return asdict(self)


def canonical_name(name: str) -> str:
    """The table's key for a dataset spelling (``"OxfordPets"``, ``"oxford_pets"``, ``"pets"`` ...)."""
    key = name.strip().lower().replace(" ", "_")
    if key in ("default", "xd", "cross_dataset"):
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    key = key.replace("-", "").replace("_", "")
    if key in _ALIASES:
        return _ALIASES[key]
    raise KeyError(f"no preset for dataset {name!r}; available: {', '.join(available_presets())}")


def available_presets() -> list[str]:
    return ["default", "xd", *DATASETS]


def preset(name: str, method: str = "coop") -> Preset:
    """The released settings for dataset ``name`` and ``method`` (``coop``, ``cocoop``, ``maple``, ``dept``).

    ``"default"`` is the method's base-to-novel script's defaults (CoOp: CE 100, KD 1000, T 1, 4 soft tokens,
    100 epochs; CoCoOp 20 epochs and MaPLe 10 with the same loss; DePT CE 1, no KD, ``w`` 0.7, 10 epochs), with
    the method's batch and learning rate; ``"xd"`` the cross-dataset script's (ImageNet, all classes: CE 1, KD 1,
    T 1, 4 soft tokens, 20 epochs).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    key = canonical_name(name)
    if key in ("xd", "cross_dataset"):
        if method != "coop":
            raise ValueError("the released cross-dataset settings exist for CoOp+AnchorOPT only")
        return Preset("xd", "coop", n_soft=4, epochs=20, ce_weight=1.0, kd_weight=1.0, kd_temperature=1.0,
                      stage1_epochs=_STAGE1["imagenet"][0], max_descriptions=5)
    stage1_epochs, mse = _STAGE1.get(key, (100, 1000))  # "default": the table's most common row
    common = dict(stage1_epochs=stage1_epochs, stage1_mse_weight=float(mse),
                  max_descriptions=5 if key == "imagenet" else 10)
    if method == "dept":
        n_soft, epochs, ce, w = _DEFAULT[method] if key == "default" else _DEPT[key]
        return Preset(key, method, n_soft=n_soft, epochs=epochs, ce_weight=float(ce), kd_weight=0.0,
                      batch_size=4, lr=0.0035, extra={"linear_probe_weight": w}, **common)
    table = {"coop": _COOP, "cocoop": _COCOOP, "maple": _MAPLE}[method]
    n_soft, epochs, ce, kd, temperature = _DEFAULT[method] if key == "default" else table[key]
    preset_ = Preset(key, method, n_soft=n_soft, epochs=epochs, ce_weight=float(ce), kd_weight=float(kd),
                     kd_temperature=float(temperature), **common)
    if method == "cocoop":
        return replace(preset_, batch_size=1)
    if method == "maple":
        return replace(preset_, batch_size=4, lr=0.0035, extra={"prompt_depth": 9})
    return preset_
