"""A run's learner from its method spec (:mod:`anchoropt.methods.registry`): settings, building, saving, loading.

AnchorOPT learners are saved as ``prompt_learner/`` (:mod:`anchoropt.io`, as before); every other method's
learner as ``learner/`` (:func:`anchoropt.methods.registry.save_learner`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..methods.baselines import DEFAULT_TEMPLATE
from ..prompts import AnchorOPTPromptLearner
from ..methods.registry import MethodChoice, MethodSettings, load_learner, save_learner
from .config import RunConfig
from .models import ModelBundle

PROMPT_LEARNER_DIR = "prompt_learner"
LEARNER_DIR = "learner"


def method_settings(cfg: RunConfig, anchors: torch.Tensor | None, tokenizer) -> MethodSettings:
    """The run's :class:`MethodSettings` (run options; the run's ``--recipe`` method settings with ``--preset``'s
    released ones over them; then the method spec's own options on top)."""
    from ..methods.entries import preset_method_settings
    from ..methods.recipes import recipe_method_settings

    released = recipe_method_settings(cfg.recipe, cfg.method)
    if cfg.preset:  # a dataset's released row wins (KgCoOp has none: its recipe's init and weight stay)
        released.update(preset_method_settings(cfg.method, cfg.preset))
    base = MethodSettings(
        n_soft=cfg.n_soft, attributes=tuple(cfg.attributes), n_attr_soft=cfg.n_attr_soft, anchors=anchors,
        tau=cfg.tau, preposition=cfg.preposition, deep_depth=cfg.deep_depth, pooling=cfg.pooling,
        templates=tuple(cfg.templates) or (DEFAULT_TEMPLATE,), ce_weight=cfg.ce_weight, kd_weight=cfg.kd_weight,
        kd_temperature=cfg.kd_temperature, kd_normalization=cfg.kd_normalization, tokenizer=tokenizer, **released,
    )
    return cfg.method_choice().settings(base)


def build_learner(choice: MethodChoice, bundle: ModelBundle, classnames: Sequence[str],
                  settings: MethodSettings) -> nn.Module:
    return choice.method.build(bundle.model, list(classnames), settings)


def save_run_learner(learner: nn.Module, choice: MethodChoice, settings: MethodSettings, out: Path,
                     run_id: str | None = None) -> Path:
    """Save into the run directory ``out``; returns the learner's directory."""
    if isinstance(learner, AnchorOPTPromptLearner):
        from ..io import save_prompt_learner

        return save_prompt_learner(learner, out / PROMPT_LEARNER_DIR, run_id=run_id)
    return save_learner(learner, choice, settings, out / LEARNER_DIR, run_id=run_id)


def trained_classnames(run_dir: Path) -> list[str]:
    """The classes a finished run's learner was trained on (refuses a run whose training did not finish)."""
    from .._jsonfile import read_json
    from ..io import read_config
    from ..methods.registry import LEARNER_CONFIG
    from .rundir import RunDirectoryError

    if (run_dir / PROMPT_LEARNER_DIR).is_dir():
        return read_config(run_dir / PROMPT_LEARNER_DIR, "prompt_learner")["trained_classnames"]
    if (run_dir / LEARNER_DIR / LEARNER_CONFIG).is_file():
        return read_json(run_dir / LEARNER_DIR / LEARNER_CONFIG, "")["trained_classnames"]
    raise RunDirectoryError(f"{run_dir} has no {PROMPT_LEARNER_DIR}/ or {LEARNER_DIR}/: its training did not "
                            "finish; continue it with `anchoropt train ... --resume`")


def load_run_learner(run_dir: Path, bundle: ModelBundle, classnames: Sequence[str]) -> nn.Module:
    """A finished run's learner rebuilt for ``classnames``."""
    from ..prompts import load_prompt_learner

    if (run_dir / PROMPT_LEARNER_DIR).is_dir():
        return load_prompt_learner(run_dir / PROMPT_LEARNER_DIR, bundle.model, classnames, tokenizer=bundle.tokenizer)
    learner, _ = load_learner(run_dir / LEARNER_DIR, bundle.model, classnames, tokenizer=bundle.tokenizer)
    return learner
