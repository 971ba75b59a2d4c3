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

import os
from typing import Any, Sequence

import torch
from torch import nn

from . import dassl
from .base import AnchorOPTInjection, ClassPatch, patch_class

__all__ = ["CoCoOpInjection", "patch", "wrap"]


class CoCoOpInjection(AnchorOPTInjection):
    """AnchorOPT on a CoCoOp ``PromptLearner`` (output ``(B, n_cls, 77, D)``)."""

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


def wrap(
    prompt_learner: nn.Module,
    *,
    clip_model: nn.Module,
    classnames: Sequence[str],
    anchors: torch.Tensor | str | os.PathLike | None = None,
    owner: nn.Module | None = None,
    cfg: Any = None,
    **options: Any,
) -> CoCoOpInjection:
    """Attach AnchorOPT to a built CoCoOp ``PromptLearner``; see :func:`anchoropt.adapters.coop.wrap`."""
    options = dassl.resolve_options(cfg, {"anchors": anchors, **options}, _DEFAULTS)
    return CoCoOpInjection(prompt_learner, clip_model=clip_model, classnames=classnames, owner=owner, **options)


def patch(module: Any, *, anchors: torch.Tensor | str | os.PathLike | None = None, attr: str = "PromptLearner",
          **options: Any) -> ClassPatch:
    """Replace ``module.PromptLearner`` (e.g. ``trainers.cocoop``); also covers DePT's ELP-CoCoOp."""
    explicit = {"anchors": anchors, **options}
    return patch_class(module, attr, CoCoOpInjection, explicit,
                       lambda cfg, opts: dassl.resolve_options(cfg, opts, _DEFAULTS))


_DEFAULTS = {"kd_weight": 10.0}
