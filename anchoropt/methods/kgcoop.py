"""KgCoOp (Yao et al., CVPR 2023): CoOp whose learned class features are kept near the hand prompt's.

The loss is ``CE + w * (1 - mean_c cos(t_c, h_c))``: ``t_c`` the learned prompt's text feature of class ``c``,
``h_c`` the frozen hand-written prompt's (the dataset's zero-shot template; the released code's
``CUSTOM_TEMPLATES``), ``w`` 8 in the released base-to-novel scripts.  Everything else is CoOp's
(:class:`~anchoropt.methods.baselines.SoftPromptLearner`; released: M 4 initialised from ``"a photo of a"``).
It is the field's reference for "a learned context forgets what the hand prompt knew" and sits beside CoOp in
the toy benchmark's calibration; it takes no part in AnchorOPT.

Axes: ``B`` images, ``C`` classes, ``E`` feature width.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .. import functional
from ..prompts import model_logit_scale
from .baselines import DEFAULT_TEMPLATE, SoftPromptLearner, ZeroShotClassifier

__all__ = ["KgCoOpLearner", "KgCoOpOutput", "kgcoop_loss"]


class KgCoOpOutput(NamedTuple):
    """What :meth:`KgCoOpLearner.forward` returns: ``logits`` ``(B, C)`` and the scalar knowledge distance
    ``1 - mean_c cos(learned_c, hand_c)`` (0 when the learned prompt's features equal the hand prompt's)."""

    logits: torch.Tensor
    distance: torch.Tensor


class KgCoOpLearner(SoftPromptLearner):
    """CoOp's soft prompt plus the frozen hand-prompt features its loss pulls towards.

    Args:
        tower, classnames, n_soft, soft_init, tokenizer: as :class:`SoftPromptLearner` (CoOp's generic context).
        hand_templates: the hand-written prompt(s) giving the reference features ``(C, E)`` (several: their
            normalised mean, as zero-shot CLIP's ensemble).
    """

    def __init__(self, tower, classnames: Sequence[str], n_soft: int = 4, soft_init: str | None = "a photo of a",
                 hand_templates: str | Sequence[str] = DEFAULT_TEMPLATE, tokenizer=None):
        self._hand_templates = hand_templates
        super().__init__(tower, classnames, n_soft=n_soft, soft_init=soft_init, tokenizer=tokenizer)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """CoOp's prompts for another class list, and the hand prompt's features for it."""
        super().set_classnames(classnames)
        hand = ZeroShotClassifier(self.tower, self.classnames, self._hand_templates, self._tokenizer)
        # derived from the frozen tower: follows the learner across devices, never saved with it
        self.register_buffer("_hand_features", hand.text_features(), persistent=False)

    def hand_features(self) -> torch.Tensor:
        """The hand prompt's text features ``(C, E)``, float32, L2-normalised, frozen."""
        return self._hand_features

    def forward(self, image_features: torch.Tensor,
                logit_scale: torch.Tensor | float | None = None) -> KgCoOpOutput:
        """Logits ``(B, C)`` for image features ``(B, E)`` and the knowledge distance (scalar)."""
        functional.check_features(image_features, "image_features", self.tower.output_dim)
        scale = model_logit_scale(self.tower) if logit_scale is None else logit_scale
        learned = self.text_features()
        distance = 1.0 - (learned * self.hand_features()).sum(dim=-1).mean()
        return KgCoOpOutput(functional.clip_logits(image_features, learned, scale), distance)

    @torch.no_grad()
    def heads(self, image_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"prompt": (B, C)}`` (CoOp's prediction; the hand prompt only shapes training)."""
        return {"prompt": self(image_features).logits}


def kgcoop_loss(weight: float):
    """``fn(KgCoOpOutput, labels) -> CE + weight * distance`` (the released ``W``: 8)."""
    if not weight >= 0:
        raise ValueError(f"KgCoOp's weight must be >= 0, got {weight!r}")
    return lambda outputs, labels: F.cross_entropy(outputs.logits.float(), labels) + weight * outputs.distance
