"""Dassl glue: the ``TRAINER.ANCHOROPT`` config node, options from a config, optimizer rebuild after wrapping.

Nothing here imports Dassl or yacs: the config node is created with the type of the user's own node
(a yacs ``CfgNode`` in the peers' ``train.py``; ``types.SimpleNamespace`` works too).

Config keys (``TRAINER.ANCHOROPT.*``), added by :func:`extend_cfg`::

    ANCHORS           ""          path to Stage I anchors (.safetensors, or the authors' model.pth.tar)
    GUMBEL_TEMP       1.0         position-matrix Gumbel temperature
    POSITION_INIT     "randn"     position-logit init: randn | identity | zeros
    ARRANGEMENT       "learned"   learned | anchor_before | anchor_middle | anchor_after (paper Table 8)
    SAMPLE_IN_EVAL    False       sample the position matrix at test time (the released code's behaviour)
    PREPOSITION       "of"        word between anchors and class name in the anchor prompt ("" for none)
    PROMPT_CE_WEIGHT  1.0         CE weight (or weight of the peer's own loss, see ``loss(base_loss=)``)
    KD_WEIGHT         -1.0        KD weight; < 0 = the method's default (10.0; DePT: 0.0, as the authors)
    KD_TEMPERATURE    1.0         KD temperature
    KD_NORMALIZATION  "batchmean" batchmean | released (the authors' sum / (B*C); use with their tables)
    MODE              "auto"      base | novel | auto (from DATASET.SUBSAMPLE_CLASSES: base -> base, else novel)
    ANCHOR_IMAGE      "auto"      MaPLe only: vanilla | model image features for the anchor logits
    DEEP              True        MaPLe only: deep variant (anchors carried across the PROMPT_DEPTH layers)
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

__all__ = ["DEFAULTS", "extend_cfg", "options_from_cfg", "resolve_options", "mode_from_cfg", "rebuild_optimizer"]

DEFAULTS: dict[str, Any] = {
    "ANCHORS": "",
    "GUMBEL_TEMP": 1.0,
    "POSITION_INIT": "randn",
    "ARRANGEMENT": "learned",
    "SAMPLE_IN_EVAL": False,
    "PREPOSITION": "of",
    "PROMPT_CE_WEIGHT": 1.0,
    "KD_WEIGHT": -1.0,
    "KD_TEMPERATURE": 1.0,
    "KD_NORMALIZATION": "batchmean",
    "MODE": "auto",
    "ANCHOR_IMAGE": "auto",
    "DEEP": True,
}

_KEY_TO_OPTION = {
    "ANCHORS": "anchors",
    "GUMBEL_TEMP": "tau",
    "POSITION_INIT": "position_init",
    "ARRANGEMENT": "arrangement",
    "SAMPLE_IN_EVAL": "sample_in_eval",
    "PREPOSITION": "preposition",
    "PROMPT_CE_WEIGHT": "ce_weight",
    "KD_WEIGHT": "kd_weight",
    "KD_TEMPERATURE": "kd_temperature",
    "KD_NORMALIZATION": "kd_normalization",
    "MODE": "mode",
    "ANCHOR_IMAGE": "anchor_image",
    "DEEP": "deep",
}

_METHOD_ONLY = ("anchor_image", "deep")  # options only some shims take (MaPLe)


def extend_cfg(cfg: Any) -> Any:
    """Add ``cfg.TRAINER.ANCHOROPT`` with :data:`DEFAULTS` (keys already there are kept); returns ``cfg``.

    Call it in your ``train.py``'s ``extend_cfg(cfg)`` so ``--opts TRAINER.ANCHOROPT.ANCHORS path`` works.
    """
    trainer = getattr(cfg, "TRAINER", None)
    if trainer is None:
        raise AttributeError("cfg has no TRAINER node: call this from the peers' extend_cfg(cfg)")
    node = getattr(trainer, "ANCHOROPT", None)
    if node is None:
        node = type(trainer)()
        setattr(trainer, "ANCHOROPT", node)
    for key, value in DEFAULTS.items():
        if not hasattr(node, key):
            setattr(node, key, value)
    return cfg


def options_from_cfg(cfg: Any) -> dict[str, Any]:
    """The shim options set in ``cfg.TRAINER.ANCHOROPT`` (empty when the node is absent).

    "Method default" values (``KD_WEIGHT < 0``, ``MODE``/``ANCHOR_IMAGE`` ``"auto"``, empty ``ANCHORS``) are left out.
    """
    node = getattr(getattr(cfg, "TRAINER", None), "ANCHOROPT", None)
    if node is None:
        return {}
    options = {}
    for key, option in _KEY_TO_OPTION.items():
        if not hasattr(node, key):
            continue
        value = getattr(node, key)
        if key == "KD_WEIGHT" and float(value) < 0:
            continue
        if key in ("MODE", "ANCHOR_IMAGE") and value == "auto":
            continue
        if key == "ANCHORS" and not value:
            continue
        if key == "PREPOSITION":
            value = value or None
        options[option] = value
    return options


def mode_from_cfg(cfg: Any, default: str = "base") -> str:
    """``"base"`` for ``DATASET.SUBSAMPLE_CLASSES == "base"``; ``"novel"`` for ``"new"`` and ``"all"``
    (cross-dataset targets are unseen classes); ``default`` when the key is absent."""
    subsample = getattr(getattr(cfg, "DATASET", None), "SUBSAMPLE_CLASSES", None)
    if subsample is None:
        return default
    return "base" if subsample == "base" else "novel"


def resolve_options(cfg: Any, explicit: dict[str, Any], method_defaults: dict[str, Any] | None = None) -> dict:
    """Options for one injection: ``method_defaults`` < ``cfg.TRAINER.ANCHOROPT`` < ``explicit`` keyword arguments.

    ``anchors=None`` in ``explicit`` means "from the config"; ``mode="auto"`` (or no mode anywhere) becomes
    :func:`mode_from_cfg`; ``anchor_image`` and ``deep`` are kept only for methods that default them (MaPLe).
    """
    method_defaults = dict(method_defaults or {})
    options = dict(method_defaults)
    if cfg is not None:
        options.update(options_from_cfg(cfg))
    options.update({k: v for k, v in explicit.items() if not (k == "anchors" and v is None)})
    if options.get("mode", "auto") == "auto":
        options["mode"] = mode_from_cfg(cfg)
    for key in _METHOD_ONLY:
        if key not in method_defaults:
            options.pop(key, None)
        elif options.get(key) == "auto":
            options[key] = method_defaults[key]
    return options


def rebuild_optimizer(
    trainer: Any,
    build_optimizer: Callable[..., Any],
    build_lr_scheduler: Callable[..., Any],
    name: str | None = None,
) -> None:
    """Rebuild a Dassl trainer's optimizer and scheduler after ``wrap()`` added parameters post ``build_model()``.

    Pass Dassl's own ``build_optimizer`` / ``build_lr_scheduler`` (DePT's ``trainers.optim.build_optimizer``,
    which returns ``(optim, infos)``, works too).  Updates ``trainer._optims[name]``, ``trainer._scheds[name]``
    and ``trainer.optim`` / ``trainer.sched``.  Not needed when ``wrap()`` runs inside ``build_model()``
    before the optimizer is built.
    """
    models = getattr(trainer, "_models", None)
    if not models:
        raise AttributeError("the trainer has no registered models (trainer._models): call build_model() first")
    names = [name] if name is not None else list(models)
    for key in names:
        if key not in models:
            raise KeyError(f"no model registered as {key!r}; registered: {list(models)}")
        module: nn.Module = models[key]
        optim = build_optimizer(module, trainer.cfg.OPTIM)
        if isinstance(optim, tuple):  # DePT's build_optimizer returns (optim, infos)
            optim = optim[0]
        sched = build_lr_scheduler(optim, trainer.cfg.OPTIM)
        trainer._optims[key], trainer._scheds[key] = optim, sched
        if len(names) == 1 or getattr(trainer, "optim", None) is None:
            trainer.optim, trainer.sched = optim, sched
