"""DePT + AnchorOPT: DePT's prompt learners with AnchorOPT prompts, its FiLM / linear-probe heads untouched.

DePT (Koorye/DePT) changes no prompt learner: its "Extras Linear Probe" ``CustomCLIP`` classes subclass the
base ones and call ``self.prompt_learner()`` / ``self.text_encoder(...)`` as they do.  So DePT+AnchorOPT is
the CoOp shim (paper Fig. S5: "the same operations as CoOp+AnchorOPT to construct the input prompt") on
``trainers.coop`` - and the CoCoOp / MaPLe shims for DePT's ELP-CoCoOp / ELP-MaPLe - with:

* no distillation by default (``kd_weight=0``, as the authors' DePT+AnchorOPT): DePT keeps its own loss
  ``(1-w) CE(similarity) + w CE(linear probe)``; ``handle.loss(label, base_loss=loss)`` only weights it by
  ``ce_weight`` (the authors' "CE" column), or adds KD on the similarity logits if you set ``kd_weight``;
* novel classes by the ensemble of DePT's similarity logits with the anchor prompt's
  (``handle.predict(logits)`` in ``"novel"`` mode); base classes keep DePT's fused similarity + linear-probe
  logits.

Docs: ``docs/integrations/dept.md``.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Sequence

import torch
from torch import nn

from . import cocoop, coop, maple
from .base import AnchorOPTInjection
from .patching import ClassPatch

__all__ = ["patch", "wrap", "DEFAULTS"]

DEFAULTS = {"kd_weight": 0.0}
"""DePT+AnchorOPT's method defaults (overridden by ``cfg.TRAINER.ANCHOROPT`` and keyword arguments)."""


def patch(module: Any, *, anchors: torch.Tensor | str | os.PathLike | None = None, attr: str | None = None,
          **options: Any) -> ClassPatch:
    """Patch DePT's base trainer module: ``trainers.coop`` (default use), ``trainers.cocoop`` or ``trainers.maple``.

    The method is read from the module (``MultiModalPromptLearner`` -> MaPLe; a ``PromptLearner`` whose
    ``forward`` takes image features -> CoCoOp; else CoOp).  DePT's ELP trainers inherit the patched class.
    """
    shim, default_attr = _method_of(module)
    injection = _INJECTIONS[shim]
    return injection.patch(module, anchors=anchors, attr=attr or default_attr,
                           defaults={**injection.defaults, **DEFAULTS}, **options)


def wrap(
    prompt_learner: nn.Module,
    *,
    clip_model: nn.Module,
    classnames: Sequence[str],
    anchors: torch.Tensor | str | os.PathLike | None = None,
    owner: nn.Module | None = None,
    cfg: Any = None,
    **options: Any,
) -> AnchorOPTInjection:
    """Attach AnchorOPT to the prompt learner of a built DePT model (the kind is detected from the learner)."""
    if hasattr(prompt_learner, "compound_prompts_text"):
        shim = maple
    elif isinstance(getattr(prompt_learner, "meta_net", None), nn.Module):
        shim = cocoop
    else:
        shim = coop
    injection = _INJECTIONS[shim]
    return injection.wrap(prompt_learner, clip_model=clip_model, classnames=classnames, anchors=anchors,
                          owner=owner, cfg=cfg, defaults={**injection.defaults, **DEFAULTS}, **options)


_INJECTIONS = {coop: coop.CoOpInjection, cocoop: cocoop.CoCoOpInjection, maple: maple.MaPLeInjection}


def _method_of(module: Any) -> tuple[Any, str]:
    if isinstance(getattr(module, "MultiModalPromptLearner", None), type):
        return maple, "MultiModalPromptLearner"
    learner = getattr(module, "PromptLearner", None)
    if not isinstance(learner, type):
        raise AttributeError(f"{getattr(module, '__name__', module)!r} has no PromptLearner / MultiModalPromptLearner")
    takes_images = len(inspect.signature(learner.forward).parameters) > 1  # CoCoOp: forward(self, im_features)
    return (cocoop if takes_images else coop), "PromptLearner"
