"""The runner's defaults: each method's released recipe for a generic dataset, and the named alternatives.

``anchoropt train`` and ``anchoropt grid`` fill every hyperparameter that neither the command line nor
``--preset`` sets from the run's ``--recipe``:

* ``released`` (the default): what each method's own release trains a dataset it has no table row for with
  (:func:`released_recipe`). CoOp: CoOp's ViT-B/16 16-shot config (M 16, 200 epochs, batch 32, lr 0.002, random
  context). AnchorOPT: its base-to-novel scripts' defaults (CE 100, KD 1000, the released KD normalisation, T 1,
  M 4, 100 epochs for CoOp+AnchorOPT). CoCoOp, MaPLe, DePT: their released configs. ATPrompt: the values most
  datasets of its table share. ``docs/runner.md`` shows the table with the source of every value.
* ``paper-text``: the same, with the AnchorOPT loss as the paper's text reads (CE 1 + KD 10 with the KL per
  sample, ``batchmean``, T 1) for every method that distils.
* ``legacy``: the values every method got before the released recipes were the defaults (:data:`LEGACY`:
  CE 1, KD 10 per sample, M 4, 100 epochs, batch 32, lr 0.002, no method-specific settings).

A method registered outside this package has no release: it gets :data:`LEGACY` under every recipe.
"""

from __future__ import annotations

from . import presets

__all__ = ["RECIPES", "DEFAULT_RECIPE", "LEGACY", "RUN_KEYS", "METHOD_KEYS", "released_recipe", "recipe_values",
           "recipe_method_settings", "check_recipe"]

RECIPES = ("released", "paper-text", "legacy")
DEFAULT_RECIPE = "released"

LEGACY = dict(
    shots=16, n_soft=4, n_anchor=1, tau=1.0, epochs=100, batch_size=32, lr=0.002, momentum=0.9,
    weight_decay=5e-4, warmup_epochs=1, warmup_lr=1e-5, ce_weight=1.0, kd_weight=10.0, kd_temperature=1.0,
    kd_normalization="batchmean", stage1_mse_weight=1000.0, stage1_lr=0.002, max_descriptions=10,
    drop_last=False,
)
"""The runner's defaults before the released recipes (every method alike)."""

RUN_KEYS = tuple(LEGACY)
"""The run-config fields a recipe fills."""
METHOD_KEYS = ("soft_init", "lp_weight", "fp16_prompts", "kg_weight")
"""The method settings a recipe fills (:data:`anchoropt.methods.entries.PRESET_SETTINGS`)."""

PAPER_TEXT_LOSS = dict(ce_weight=1.0, kd_weight=10.0, kd_temperature=1.0, kd_normalization="batchmean")
"""The AnchorOPT loss as the paper's text reads it: CE:KD 1:10, KL per sample."""

_PLAIN_CE = dict(ce_weight=1.0, kd_weight=0.0, kd_temperature=1.0, kd_normalization="released")
"""A method trained with plain cross-entropy (no distillation; the normalisation and temperature are unused)."""

# The CoOp-module entries' own values over their family's Dassl config (CoOp's configs/trainers/CoOp/vit_b16.yaml:
# batch 32, lr 0.002): CoOp's 16-shot recipe (COOP.md, scripts/coop/main.sh: M 16, 200 epochs) and
# CoOp+ATPrompt's (docs/ATPrompt.md:183, scripts/coop/atprompt_base2new_train.sh:11-12: M 2, 100 epochs).
# KgCoOp's (htyao89/KgCoOp configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml: batch 128, lr 0.002, 100 epochs,
# CTX_INIT "a photo of a"; scripts/base2new_train.sh: NCTX 4, WEIGHT 8.0).
# The anchored entries take AnchorOPT's script defaults (presets.preset("default")); coop+atprompt+anchoropt has
# no release of its own and takes CoOp+AnchorOPT's.
_COOP_MODULE = {
    "zeroshot": {},
    "coop": dict(n_soft=16, epochs=200),
    "coop+atprompt": dict(n_soft=2, epochs=100),
    "kgcoop": dict(n_soft=4, epochs=100, batch_size=128, soft_init="a photo of a", kg_weight=8.0),
    "coop+anchoropt": {},
    "coop+atprompt+anchoropt": {},
}


def check_recipe(recipe: str) -> str:
    """``recipe`` when it is one of :data:`RECIPES`, else a ``ValueError`` naming the choices."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown --recipe {recipe!r}; choose one of {', '.join(RECIPES)} "
                         "(docs/runner.md, 'Defaults')")
    return recipe


def released_recipe(name: str) -> dict | None:
    """Registry entry ``name``'s released recipe for a generic dataset: every :data:`RUN_KEYS` field and the
    :data:`METHOD_KEYS` settings it sets (``None`` for a method without a release here)."""
    from .entries import PRESET_METHOD, released_settings
    from .registry import get_method

    method = get_method(name)  # an unknown name: a KeyError listing the methods
    if name not in PRESET_METHOD and name not in _COOP_MODULE:
        return None
    base = name.split("+")[0]
    family = presets.preset("default", base if base in presets.METHODS else "coop")
    values = {key: getattr(family, key) for key in RUN_KEYS}
    values.update(_PLAIN_CE if not method.needs_anchors else {})
    own = released_settings(name) if name in PRESET_METHOD else _COOP_MODULE[name]
    values.update({k: v for k, v in own.items() if k in RUN_KEYS or k in METHOD_KEYS})
    return values


def recipe_values(recipe: str, spec: str) -> dict:
    """The :data:`RUN_KEYS` values recipe ``recipe`` gives method spec ``spec`` (a name with options)."""
    chosen = _recipe(recipe, spec)
    return {key: chosen[key] for key in RUN_KEYS}


def recipe_method_settings(recipe: str, spec: str) -> dict:
    """The :data:`METHOD_KEYS` settings recipe ``recipe`` gives method spec ``spec``, less those its options set."""
    from .registry import parse_method

    options = parse_method(spec).options
    return {k: v for k, v in _recipe(recipe, spec).items() if k in METHOD_KEYS and k not in options}


def _recipe(recipe: str, spec: str) -> dict:
    name = spec.partition(":")[0].strip()
    released = None if check_recipe(recipe) == "legacy" else released_recipe(name)
    if released is None:
        return dict(LEGACY)
    if recipe == "paper-text" and released["kd_weight"] > 0:
        released.update(PAPER_TEXT_LOSS)
    return released
