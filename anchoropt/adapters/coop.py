"""CoOp + AnchorOPT: inject AnchorOPT into CoOp's ``PromptLearner`` (``trainers/coop.py``).

The learner's output ``(C, 77, D)`` becomes ``[SOS] P @ [ctx; anchors] class . [EOT]`` (length still 77) and
its ``tokenized_prompts`` is shifted in place, so ``TextEncoder``'s argmax pooling reads the true EOT.
Class-specific contexts (``CSC=True``) work; ``CLASS_TOKEN_POSITION`` must be ``"end"``.

Two ways in (both return a removable handle)::

    import anchoropt.adapters.coop as aoc
    aoc.patch(trainers.coop, anchors="anchors.safetensors")           # before trainer.build_model()
    handle = aoc.wrap(custom_clip.prompt_learner, clip_model=clip_model,
                      classnames=classnames, anchors=anchors, owner=custom_clip)   # an existing model

In ``forward_backward``: ``loss = handle.loss(label, logits=output)``; at test time
``handle.predict(logits)`` (``handle.set_mode("novel")`` for novel classes).  Docs: ``docs/integrations/coop.md``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn

from . import dassl
from .base import AnchorOPTInjection, ClassPatch, patch_class

__all__ = ["CoOpInjection", "patch", "wrap"]


class CoOpInjection(AnchorOPTInjection):
    """AnchorOPT on a CoOp ``PromptLearner`` (output ``(n_cls, 77, D)``)."""

    kind = "coop"
    _peer_name = "CoOp PromptLearner"

    def check_learner(self, learner: nn.Module) -> None:
        position = getattr(learner, "class_token_position", "end")
        if position != "end":
            raise ValueError(
                f"CLASS_TOKEN_POSITION={position!r} is not supported: AnchorOPT arranges [soft tokens; anchors] "
                "right after SOS and puts the class name after them (paper eq. 8); set "
                "TRAINER.COOP.CLASS_TOKEN_POSITION to 'end'"
            )

    def prompts_of(self, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.dim() != 3:
            raise TypeError(f"expected the CoOp prompt learner to return (n_cls, L, D) prompts, got {_shape(output)}")
        return output


def wrap(
    prompt_learner: nn.Module,
    *,
    clip_model: nn.Module,
    classnames: Sequence[str],
    anchors: torch.Tensor | str | os.PathLike | None = None,
    owner: nn.Module | None = None,
    cfg: Any = None,
    **options: Any,
) -> CoOpInjection:
    """Attach AnchorOPT to a built CoOp ``PromptLearner``; returns the handle (``handle.remove()`` undoes it).

    Call it before the optimizer is built (right after ``CustomCLIP(...)`` in ``build_model``), or rebuild the
    optimizer afterwards (:func:`anchoropt.adapters.dassl.rebuild_optimizer`).  ``options``: see
    :class:`~anchoropt.adapters.base.AnchorOPTInjection` (``mode``, ``tau``, ``ce_weight``, ``kd_weight``, ...).
    """
    options = dassl.resolve_options(cfg, {"anchors": anchors, **options}, _DEFAULTS)
    return CoOpInjection(prompt_learner, clip_model=clip_model, classnames=classnames, owner=owner, **options)


def patch(module: Any, *, anchors: torch.Tensor | str | os.PathLike | None = None, attr: str = "PromptLearner",
          **options: Any) -> ClassPatch:
    """Replace ``module.PromptLearner`` (e.g. ``trainers.coop``) so every learner built afterwards carries AnchorOPT.

    Options come from (later wins) the defaults, ``cfg.TRAINER.ANCHOROPT`` (see :mod:`anchoropt.adapters.dassl`)
    and these keyword arguments; ``mode`` defaults to the config's ``DATASET.SUBSAMPLE_CLASSES``.  Patching
    ``trainers.coop`` also covers DePT's ``ExtrasLinearProbeCoOp`` (its CustomCLIP inherits CoOp's).
    """
    explicit = {"anchors": anchors, **options}
    return patch_class(module, attr, CoOpInjection, explicit,
                       lambda cfg, opts: dassl.resolve_options(cfg, opts, _DEFAULTS))


_DEFAULTS = {"kd_weight": 10.0}


def _shape(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    return f"a {type(output).__name__}"
