"""What the method modules share: the loss, the inference switch and the class-set change.

Every method module is an ``nn.Module`` with the same surface (so a runner or a notebook treats them alike):

* ``takes_images``: ``False`` when ``forward`` takes frozen image features ``(B, E)`` (CoCoOp, DePT over
  CoOp / CoCoOp), ``True`` when it takes images ``(B, 3, H, W)`` because it prompts the image tower (MaPLe);
* ``forward(x) -> (logits, logits_anchor)``, each ``(B, C)``; ``logits_anchor`` is ``None`` without anchors
  (the pair is what :class:`~anchoropt.StageIILoss` and the runner's Stage II loop take);
* ``loss(x, labels)``: the method's training objective (CE; with anchors AnchorOPT's CE + KD);
* ``heads(x)``: every way the module scores ``x`` - ``{"normal", "anchor", "ensemble"}`` -> ``(B, C)``;
* ``predict(x, mode)``: ``"base"`` (the learned prompt) or ``"novel"`` (the anchor ensemble when there are
  anchors, else the learned prompt) - the paper's inference switch;
* ``set_classnames(names)``: rebuild the class-dependent prompts (base -> novel, another dataset).

Axes: ``B`` images, ``C`` classes, ``E`` joint-embedding width.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import functional
from ..losses import StageIILossConfig
from .text import ContextPrompt

__all__ = ["PromptMethod", "MODES"]

MODES = ("base", "novel")


class PromptMethod(nn.Module):
    """Base class of the method modules (see the module docstring for the shared surface).

    Subclasses set :attr:`name`, build ``self.text`` (a :class:`ContextPrompt`) and implement :meth:`forward`.

    Args:
        loss: AnchorOPT's Stage II loss settings (used only with anchors; CE weight also without).
    """

    name = "method"
    takes_images = False
    text: ContextPrompt

    def __init__(self, loss: StageIILossConfig | None = None):
        super().__init__()
        self.loss_config = loss or StageIILossConfig()

    @property
    def classnames(self) -> list[str]:
        return self.text.classnames

    @property
    def has_anchors(self) -> bool:
        return self.text.has_anchors

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.text.set_classnames(classnames)

    def logit_scale(self) -> torch.Tensor:
        return self.text.logit_scale()

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training objective for a batch: ``ce_weight * CE`` (+ ``kd_weight * KD`` toward the anchor ensemble)."""
        logits, anchor = self(x)
        return self.objective(logits, anchor, labels)

    def objective(self, logits: torch.Tensor, anchor: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """The loss from this batch's ``(logits, logits_anchor)``."""
        cfg = self.loss_config
        if anchor is None:
            return cfg.ce_weight * torch.nn.functional.cross_entropy(logits.float(), labels)
        return functional.anchoropt_loss(logits, anchor, labels, cfg.ce_weight, cfg.kd_weight, cfg.temperature,
                                         cfg.kd_normalization)

    @torch.no_grad()
    def heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"normal": (B, C)}``, plus ``"anchor"`` and ``"ensemble"`` with anchors."""
        logits, anchor = self(x)
        out = {"normal": logits.float()}
        if anchor is not None:
            out.update(anchor=anchor, ensemble=functional.ensemble_logits(logits.float(), anchor))
        return out

    @torch.no_grad()
    def predict(self, x: torch.Tensor, mode: str = "base") -> torch.Tensor:
        """Inference switch: ``"base"`` -> the learned prompt, ``"novel"`` -> the anchor ensemble (if anchors)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        heads = self.heads(x)
        return heads["ensemble"] if mode == "novel" and "ensemble" in heads else heads["normal"]

    def anchor_logits(self, image_features: torch.Tensor) -> torch.Tensor | None:
        """Frozen anchor-prompt logits ``(B, C)`` for image features ``(B, E)`` (``None`` without anchors)."""
        anchor = self.text.anchor_features()
        if anchor is None:
            return None
        return functional.clip_logits(image_features, anchor, self.logit_scale().to(image_features.device))
