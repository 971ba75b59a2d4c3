"""The one-stage alternating variant of AnchorOPT (paper §3.2.4, Fig. S1).

Each :meth:`OneStageTrainer.step` runs (1) an anchor update on the Stage I description loss, then
(2) copies the anchors into the prompt learner (frozen there) and updates soft tokens + position logits
with cross-entropy only: the paper drops distillation here because the ensemble is still unstable.

Axes: ``B`` images, ``E`` feature width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import functional
from ..anchors import AnchorLearner, DescriptionTargets
from ..prompts import AnchorOPTPromptLearner

__all__ = ["OneStageTrainer"]


class OneStageTrainer:
    """Alternating anchor / prompt optimisation with SGD (the released code's optimiser settings).

    Args:
        anchor_learner: owns the trainable anchors (its classes should be the training classes).
        prompt_learner: owns soft tokens and the position matrix; receives the anchors each step.
        targets: description features for the anchor learner's classes (``anchor_learner.targets(...)``).
        mse_weight: scale of the anchor loss.
        ce_weight: scale of the prompt loss.
    """

    def __init__(
        self,
        anchor_learner: AnchorLearner,
        prompt_learner: AnchorOPTPromptLearner,
        targets: DescriptionTargets,
        lr: float = 0.002,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        mse_weight: float = 1000.0,
        ce_weight: float = 1.0,
    ):
        if anchor_learner.anchors.shape != prompt_learner.anchors.shape:
            raise ValueError(
                f"anchor learner holds anchors {tuple(anchor_learner.anchors.shape)} but the prompt learner "
                f"expects {tuple(prompt_learner.anchors.shape)}"
            )
        self.anchor_learner, self.prompt_learner, self.targets = anchor_learner, prompt_learner, targets
        self.mse_weight, self.ce_weight = mse_weight, ce_weight
        sgd = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.anchor_optimizer = torch.optim.SGD([anchor_learner.anchors], **sgd)
        prompt_params = [p for p in prompt_learner.parameters() if p.requires_grad]
        self.prompt_optimizer = torch.optim.SGD(prompt_params, **sgd)
        prompt_learner.set_anchors(anchor_learner.anchors)

    def step(
        self, image_features: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor | float | None = None
    ) -> dict[str, float]:
        """One anchor update, then one prompt update on the batch ``image_features`` ``(B, E)``, ``labels`` ``(B,)``."""
        anchor_loss = self.anchor_learner.loss(self.targets, self.mse_weight)
        self.anchor_optimizer.zero_grad(set_to_none=True)
        anchor_loss.backward()
        self.anchor_optimizer.step()

        self.prompt_learner.set_anchors(self.anchor_learner.anchors)
        scale = self.prompt_learner.logit_scale() if logit_scale is None else logit_scale
        logits = functional.clip_logits(image_features, self.prompt_learner.normal_features(), scale)
        prompt_loss = self.ce_weight * F.cross_entropy(logits, labels)
        self.prompt_optimizer.zero_grad(set_to_none=True)
        prompt_loss.backward()
        self.prompt_optimizer.step()
        return {"anchor_loss": anchor_loss.item(), "prompt_loss": prompt_loss.item()}
