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


def _shape(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    return f"a {type(output).__name__}"
