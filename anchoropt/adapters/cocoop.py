"""CoCoOp + AnchorOPT: inject AnchorOPT into CoCoOp's ``PromptLearner`` (``trainers/cocoop.py``).

Paper Fig. S3: the soft tokens are first shifted by the meta-net (``ctx + meta_net(image)``, CoCoOp's own
forward), then arranged with the anchors by the position matrix - one matrix for the whole batch.  The
learner's output stays ``(B, n_cls, 77, D)``.  The position logits **and** the meta-net are trained (the
released code froze both by accident).

CoCoOp's ``CustomCLIP`` returns its CE loss in training, so the shim rebuilds the normal logits from the
features captured during that forward::

    loss = model(image, label)                        # unchanged
    loss = handle.loss(label, base_loss=loss)         # + AnchorOPT's distillation term

Docs: ``docs/integrations/cocoop.md``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import AnchorOPTInjection

__all__ = ["CoCoOpInjection", "patch", "wrap"]


class CoCoOpInjection(AnchorOPTInjection):
    """AnchorOPT on a CoCoOp ``PromptLearner`` (output ``(B, n_cls, 77, D)``)."""

    peer_class_attr = "PromptLearner"
    defaults = {"kd_weight": 10.0}
    kind = "cocoop"
    _peer_name = "CoCoOp PromptLearner"

    def check_learner(self, learner: nn.Module) -> None:
        if not isinstance(getattr(learner, "meta_net", None), nn.Module):
            raise TypeError(
                f"{type(learner).__name__} has no meta_net: not a CoCoOp prompt learner "
                "(use anchoropt.adapters.coop for CoOp)"
            )

    def peer_forward_for_check(self, learner: nn.Module) -> torch.Tensor:
        first = next((m for m in learner.meta_net.modules() if isinstance(m, nn.Linear)), None)
        if first is None:
            raise TypeError("CoCoOp's meta_net has no nn.Linear to read the image-feature width from")
        dummy = torch.zeros(1, first.in_features, dtype=first.weight.dtype, device=first.weight.device)
        return self.prompts_of(learner(dummy))[0]

    def prompts_of(self, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise TypeError(f"expected the CoCoOp prompt learner to return (B, n_cls, L, D) prompts, got {got}")
        return output


wrap = CoCoOpInjection.wrap
"""Attach AnchorOPT to a built CoCoOp ``PromptLearner`` (see :meth:`AnchorOPTInjection.wrap`)."""

patch = CoCoOpInjection.patch
"""Replace ``module.PromptLearner`` (e.g. ``trainers.cocoop``); also covers DePT's ELP-CoCoOp."""
