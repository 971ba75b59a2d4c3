"""CoOp + AnchorOPT: inject AnchorOPT into CoOp's ``PromptLearner`` (``trainers/coop.py``).

The learner's output ``(C, 77, D)`` becomes ``[SOS] P @ [ctx; anchors] class . [EOT]`` (length still 77) and
its ``tokenized_prompts`` is shifted in place, so ``TextEncoder``'s argmax pooling reads the true EOT.
Class-specific contexts (``CSC=True``) work; ``CLASS_TOKEN_POSITION`` must be ``"end"``.  A CSC context
belongs to its classes: loading it into a learner with another class count (base -> novel) raises a
``ValueError`` naming CSC instead of torch's bare ``size mismatch for ctx``.

Two ways in (both return a removable handle)::

    import anchoropt.adapters.coop as aoc
    aoc.patch(trainers.coop, anchors="anchors.safetensors")           # before trainer.build_model()
    handle = aoc.wrap(custom_clip.prompt_learner, clip_model=clip_model,
                      classnames=classnames, anchors=anchors, owner=custom_clip)   # an existing model

In ``forward_backward``: ``loss = handle.loss(label, logits=output)``; at test time
``handle.predict(logits)`` (``handle.set_mode("novel")`` for novel classes).  Docs: ``docs/integrations/coop.md``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import AnchorOPTInjection

__all__ = ["CoOpInjection", "patch", "wrap"]


class CoOpInjection(AnchorOPTInjection):
    """AnchorOPT on a CoOp ``PromptLearner`` (output ``(n_cls, 77, D)``)."""

    peer_class_attr = "PromptLearner"
    defaults = {"kd_weight": 10.0}
    kind = "coop"
    _peer_name = "CoOp PromptLearner"

    def __init__(self, prompt_learner: nn.Module, **kwargs: Any):
        super().__init__(prompt_learner, **kwargs)
        if prompt_learner.ctx.dim() == 3:  # CSC: one context per class
            self._hooks.append(prompt_learner.register_load_state_dict_pre_hook(_check_csc_checkpoint))

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


wrap = CoOpInjection.wrap
"""Attach AnchorOPT to a built CoOp ``PromptLearner`` (see :meth:`AnchorOPTInjection.wrap`)."""

patch = CoOpInjection.patch
"""Replace ``module.PromptLearner`` (e.g. ``trainers.coop``); patching ``trainers.coop`` also covers DePT's ``ExtrasLinearProbeCoOp``."""


def _check_csc_checkpoint(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load pre-hook of a CSC learner: a checkpoint's ``ctx`` learned for another number of classes is refused
    with a message naming CSC (CoOp's own ``load_state_dict`` would only report a ``size mismatch for ctx``)."""
    saved = state_dict.get(prefix + "ctx")
    if not isinstance(saved, torch.Tensor) or tuple(saved.shape) == tuple(module.ctx.shape):
        return
    if saved.dim() == 3 and saved.shape[1:] == module.ctx.shape[1:]:
        raise ValueError(
            f"cannot load this checkpoint's class-specific context (TRAINER.COOP.CSC=True): its ctx holds one "
            f"context per class for {saved.shape[0]} classes, this CoOp learner has {module.ctx.shape[0]} classes. "
            "CSC contexts belong to the classes they were trained on, so they cannot move to other classes "
            "(base -> novel, cross-dataset) - CoOp's own limit, with or without AnchorOPT; train with CSC=False "
            "(one shared context) for base-to-novel evaluation"
        )
    raise ValueError(
        f"this checkpoint's ctx has shape {tuple(saved.shape)} but the CSC learner's ctx is {tuple(module.ctx.shape)} "
        "(TRAINER.COOP.CSC=True, one context per class): N_CTX, CSC or the CLIP width differ from training"
    )


def _shape(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    return f"a {type(output).__name__}"
