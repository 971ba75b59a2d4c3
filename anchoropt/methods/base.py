"""What the method modules share: the loss, the inference switch and the class-set change.

Every method module is an ``nn.Module`` with the same surface (so a runner or a notebook treats them alike):

* ``takes_images``: ``False`` when ``forward`` takes frozen image features ``(B, E)`` (CoCoOp, DePT over
  CoOp / CoCoOp), ``True`` when it takes images ``(B, 3, H, W)`` because it prompts the image tower (MaPLe);
* ``features(x) -> (image (B, E), text (C, E) or (B, C, E))``: the raw (not normalised) features the method's
  logits are cosine similarities of (CoCoOp's text features are per image);
* ``forward(x) -> MethodOutput``: unpacks as ``(logits, logits_anchor)``, each ``(B, C)`` (``logits_anchor`` is
  ``None`` without anchors), and ``output.loss(labels)`` is the method's objective on that batch (CE; with
  anchors AnchorOPT's CE + KD; DePT's fused CE) - what :mod:`anchoropt.methods.registry`'s loss functions call;
* ``loss(x, labels)``: the same in one call;
* ``heads(x)``: every way the module scores ``x`` - ``{"normal", "anchor", "ensemble"}`` -> ``(B, C)``;
* ``predict(x, mode)``: ``"base"`` (the learned prompt) or ``"novel"`` (the anchor ensemble when there are
  anchors, else the learned prompt) - the paper's inference switch;
* ``set_classnames(names)``: rebuild the class-dependent prompts (base -> novel, another dataset);
* ``optimizer_groups(lr)``: SGD parameter groups (DePT trains its head at a larger rate).

``PromptMethod(ContextPrompt(...))`` itself is CoOp (the learned prompt's features, the same for every image).

Axes: ``B`` images, ``C`` classes, ``E`` joint-embedding width.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import einsum
from torch import nn

from .. import functional
from ..losses import StageIILossConfig
from .text import ContextPrompt

__all__ = ["PromptMethod", "MethodOutput", "MODES"]

MODES = ("base", "novel")


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else a ``ValueError`` naming the choices."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    return mode


class MethodOutput(tuple):
    """A batch's ``(logits, logits_anchor)`` (a pair, so it unpacks as one) that also knows its training loss.

    Args:
        logits: ``(B, C)`` the method's logits (DePT: fused with its linear probe on the trained classes).
        anchor: ``(B, C)`` frozen anchor-prompt logits, or ``None``.
        objective: ``labels (B,) -> loss``, closed over this batch's tensors.
    """

    def __new__(cls, logits: torch.Tensor, anchor: torch.Tensor | None, objective: Callable[[torch.Tensor], torch.Tensor]):
        out = super().__new__(cls, (logits, anchor))
        out._objective = objective
        return out

    @property
    def logits(self) -> torch.Tensor:
        return self[0]

    @property
    def anchor(self) -> torch.Tensor | None:
        return self[1]

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        """The method's training objective for this batch with class indices ``labels`` ``(B,)``."""
        return self._objective(labels)


class PromptMethod(nn.Module):
    """Base class of the method modules (see the module docstring for the shared surface); on its own, CoOp.

    Subclasses set :attr:`name`, build ``self.text`` (a :class:`ContextPrompt`) and override :meth:`features`.

    Args:
        text: the learned prompt (subclasses build their own and pass ``None``).
        loss: AnchorOPT's Stage II loss settings (KD only with anchors; the CE weight always).
    """

    name = "coop"
    takes_images = False
    text: ContextPrompt

    def __init__(self, text: ContextPrompt | None = None, loss: StageIILossConfig | None = None):
        super().__init__()
        if text is not None:
            self.text = text
        self.loss_config = loss or StageIILossConfig()
        # the Stage I anchors also under the top-level key "anchors": what anchoropt.methods.registry.load_learner
        # rebuilds a learner from (a copy; loading drops it again - the learner was built with those anchors)
        self.register_state_dict_post_hook(_anchors_out)
        self.register_load_state_dict_pre_hook(_anchors_in)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image (B, E), text (C, E))``: CoOp's text features do not depend on the image."""
        return x, self.text.features()

    def forward(self, x: torch.Tensor) -> MethodOutput:
        """``(logits, logits_anchor)``, each ``(B, C)`` float32 (``logits_anchor`` ``None`` without anchors)."""
        image, text = self.features(x)
        return self.output(self.similarity(image, text), self.anchor_from(x, image))

    def output(self, logits: torch.Tensor, anchor: torch.Tensor | None) -> MethodOutput:
        """The :class:`MethodOutput` whose loss is :meth:`objective` on these logits."""
        return MethodOutput(logits, anchor, lambda labels: self.objective(logits, anchor, labels))

    def similarity(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """CLIP logits ``(B, C)`` of image ``(B, E)`` and text ``(C, E)`` or per-image ``(B, C, E)`` features."""
        image = F.normalize(image.float(), dim=-1).to(text.device)
        text = F.normalize(text.float(), dim=-1)
        scale = self.logit_scale().to(text.device)
        if text.dim() == 3:
            return scale * einsum(image, text, "b e, b c e -> b c")
        return scale * image @ text.t()

    def optimizer_groups(self, lr: float) -> list[dict]:
        """Parameter groups for ``torch.optim.SGD`` (one group at ``lr`` by default)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

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
        return self(x).loss(labels)

    def objective(self, logits: torch.Tensor, anchor: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """The loss from this batch's ``(logits, logits_anchor)``."""
        cfg = self.loss_config
        labels = labels.to(logits.device)
        if anchor is None or not cfg.kd_weight:
            return cfg.ce_weight * F.cross_entropy(logits.float(), labels)
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
        """Inference switch: ``"base"`` -> the learned prompt, ``"novel"`` -> the anchor ensemble (if anchors).

        Deterministic in any mode: scored as in evaluation (the position matrix's row-wise argmax, no Gumbel
        sample), the learner's ``train()`` / ``eval()`` state restored after.
        """
        check_mode(mode)
        was_training = self.training
        self.eval()
        try:
            heads = self.heads(x)
        finally:
            self.train(was_training)
        return heads["ensemble"] if mode == "novel" and "ensemble" in heads else heads["normal"]

    def anchor_from(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor | None:
        """Anchor logits for input ``x`` whose (raw) image features are ``image`` (MaPLe: vanilla features)."""
        return self.anchor_logits(image)

    def anchor_logits(self, image_features: torch.Tensor) -> torch.Tensor | None:
        """Frozen anchor-prompt logits ``(B, C)`` for image features ``(B, E)`` (``None`` without anchors)."""
        anchor = self.text.anchor_features()
        if anchor is None:
            return None
        return functional.clip_logits(image_features, anchor, self.logit_scale().to(image_features.device))


ANCHORS_KEY = "anchors"


def _anchors_out(module: "PromptMethod", state_dict: dict, prefix: str, local_metadata) -> None:
    text = getattr(module, "text", None)
    if text is not None and text.has_anchors:
        state_dict[prefix + ANCHORS_KEY] = text.learner.anchors.detach().clone()


def _anchors_in(module: "PromptMethod", state_dict: dict, prefix: str, *args) -> None:
    state_dict.pop(prefix + ANCHORS_KEY, None)
