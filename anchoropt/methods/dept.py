"""DePT (Zhang et al., CVPR 2024): a channel-wise transformation + linear-probe head on the base classes, fused
with a base method's similarity logits.  Base method CoOp (default), CoCoOp or MaPLe; AnchorOPT as an option.

    base method          image (B, E), text (C, E) or per image (B, C, E)   (raw features, not normalised)
    similarity logits    sim = scale * cos(image, text)                                          (B, C)
    CwT (FiLM)           x * scale + bias, one per modality (ones / zeros at init)                  (E,)
    linear probe         lp = Linear(E, C_base)(CwT_img(image))                                  (B, C_base)
    training loss        ce_weight * [(1 - w) CE(sim, y) + w CE(Linear(cat[CwT_text(text[y]), CwT_img(image)]), [y, y])]
    inference, base      (1 - w) sim + w lp    (test-time fusion)
    inference, novel     sim; with anchors the ensemble (sim + anchor) / 2 (paper Fig. S5, no KD)

As DePT's ``ExtrasLinearProbe*`` models: the head sees the *raw* image and text features (the runner gives
DePT the image tower's raw output: its registry entries ask for ``image_input="raw_features"``), the linear
probe exists for the classes the model was built with and applies only to them, and the head trains at
``head_lr_scale`` (DePT's ``LR_EXP``, 6.5) times the prompt's learning rate (:meth:`optimizer_groups`, which
the runner's optimiser uses).
DePT+AnchorOPT uses no distillation (``kd_weight`` 0 in the released tables); a non-zero ``kd_weight`` adds
AnchorOPT's KD on the similarity logits.

Axes: ``B`` images, ``C`` classes, ``E`` joint-embedding width.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional
from ..losses import StageIILossConfig
from .base import MethodOutput, PromptMethod, check_mode
from .text import ContextPrompt

__all__ = ["DePT", "FiLM", "BASES"]

BASES = ("coop", "cocoop", "maple")


class FiLM(nn.Module):
    """DePT's channel-wise transformation: ``x * scale + bias`` per channel (``scale`` ones, ``bias`` zeros)."""

    def __init__(self, dim: int, device=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, device=device))
        self.bias = nn.Parameter(torch.zeros(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.bias.to(x.dtype)


class DePT(PromptMethod):
    """DePT over a base method: ``forward(x) -> (logits (B, C), logits_anchor | None)``; ``loss`` is DePT's.

    Args:
        model: the frozen CLIP (open_clip ``CLIP`` / ``CustomTextCLIP``, OpenAI-``clip``).
        classnames: the base classes (the linear probe is built for them).
        template: ``"coop"`` (DePT) or ``"anchoropt"`` (DePT + AnchorOPT; needs ``anchors``).
        n_ctx: ``M`` context tokens.
        base: the base method, ``"coop"`` (default), ``"cocoop"`` or ``"maple"`` (then ``x`` is images).
        lp_weight: DePT's fusion weight ``w`` (0.7 as released; the AnchorOPT tables use 0.5-0.9).
        head_lr_scale: the head's learning-rate multiplier in :meth:`optimizer_groups` (6.5 as released).
        fusion: fuse the linear probe into the base-class logits at test time (DePT's ``TEST_TIME_FUSION``).
        loss: CE weight (the AnchorOPT tables' "CE" column, 10); ``kd_weight`` 0 by default here.
        base_options: keyword arguments of the base method (e.g. MaPLe's ``prompt_depth``).
        text_options: :class:`~anchoropt.methods.text.ContextPrompt`'s ``anchors``, ``tau``, ``tokenizer`` ...
    """

    name = "dept"

    def __init__(
        self,
        model: nn.Module,
        classnames: Sequence[str],
        template: str = "coop",
        n_ctx: int = 4,
        *,
        base: str = "coop",
        lp_weight: float = 0.7,
        head_lr_scale: float = 6.5,
        fusion: bool = True,
        loss: StageIILossConfig | None = None,
        base_options: dict | None = None,
        **text_options,
    ):
        if base not in BASES:
            raise ValueError(f"unknown base method {base!r}; choose one of {BASES}")
        if not 0.0 <= lp_weight <= 1.0:
            raise ValueError(f"lp_weight must be in [0, 1], got {lp_weight}")
        if head_lr_scale <= 0:
            raise ValueError(f"head_lr_scale must be > 0, got {head_lr_scale}")
        loss = loss or StageIILossConfig(kd_weight=0.0)
        super().__init__(None, loss)
        self.base = _base_method(base, model, classnames, template, n_ctx, loss, base_options or {}, text_options)
        self.takes_images = self.base.takes_images
        self.lp_weight, self.head_lr_scale, self.fusion = float(lp_weight), float(head_lr_scale), bool(fusion)
        tower = self.base.text.tower
        dim, device = tower.output_dim, tower.device
        self.film_lp_img, self.film_lp_text = FiLM(dim, device), FiLM(dim, device)
        self.trained_classnames = list(self.base.text.classnames)
        self.linear_probe_proj = nn.Linear(dim, len(self.trained_classnames), device=device)

    @property
    def text(self) -> ContextPrompt:
        return self.base.text

    @property
    def head_active(self) -> bool:
        """Whether the linear probe scores the current classes (the ones it was built for)."""
        return self.text.classnames == self.trained_classnames

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.features(x)

    def probe(self, image: torch.Tensor) -> torch.Tensor:
        """Linear-probe logits ``(B, C_base)`` of raw image features ``(B, E)``."""
        return self.linear_probe_proj(self.film_lp_img(image.float()))

    def forward(self, x: torch.Tensor) -> MethodOutput:
        """``(logits, logits_anchor)``: the fused base-class logits (similarity alone for other classes);
        ``output.loss(labels)`` is DePT's objective."""
        image, text = self.features(x)
        sim = self.similarity(image, text)
        logits = sim
        if self.head_active and self.fusion:
            logits = (1 - self.lp_weight) * sim + self.lp_weight * self.probe(image).to(sim.device)
        anchor = self.base.anchor_from(x, image)
        return MethodOutput(logits, anchor, lambda labels: self._objective(image, text, sim, anchor, labels))

    def _objective(self, image, text, sim, anchor, labels: torch.Tensor) -> torch.Tensor:
        """``ce_weight * [(1 - w) CE(sim, y) + w CE(probe on [text_y; image], [y; y])]`` (+ KD on ``sim``)."""
        if not self.head_active:
            raise RuntimeError("DePT trains on the classes it was built with; set_classnames() changed them")
        labels = labels.to(sim.device)
        chosen = text[labels] if text.dim() == 2 else text[torch.arange(len(labels), device=text.device), labels]
        inputs = torch.cat([self.film_lp_text(chosen.float()), self.film_lp_img(image.float()).to(chosen.device)])
        probe = self.linear_probe_proj(inputs)
        w, cfg = self.lp_weight, self.loss_config
        total = cfg.ce_weight * ((1 - w) * F.cross_entropy(sim, labels) + w * F.cross_entropy(probe, labels.repeat(2)))
        if anchor is not None and cfg.kd_weight:
            teacher = functional.ensemble_logits(sim, anchor)
            total = total + cfg.kd_weight * functional.distillation_loss(sim, teacher, cfg.temperature,
                                                                         cfg.kd_normalization)
        return total

    @torch.no_grad()
    def heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``normal`` (fused on the trained classes), ``similarity``, and with anchors ``anchor`` and
        ``ensemble`` = (similarity + anchor) / 2."""
        image, text = self.features(x)
        sim = self.similarity(image, text)
        out = {"similarity": sim, "normal": sim}
        if self.head_active and self.fusion:
            out["normal"] = (1 - self.lp_weight) * sim + self.lp_weight * self.probe(image).to(sim.device)
        anchor = self.base.anchor_from(x, image)
        if anchor is not None:
            out.update(anchor=anchor, ensemble=functional.ensemble_logits(sim, anchor))
        return out

    @torch.no_grad()
    def predict(self, x: torch.Tensor, mode: str = "base") -> torch.Tensor:
        """``"base"``: fused logits; ``"novel"``: the anchor ensemble with anchors, else the similarity logits."""
        check_mode(mode)
        heads = self.heads(x)
        return heads.get("ensemble", heads["similarity"]) if mode == "novel" else heads["normal"]

    def optimizer_groups(self, lr: float) -> list[dict]:
        """Two SGD groups: the base method's parameters at ``lr``, the CwT + linear probe at ``lr * head_lr_scale``."""
        head = [*self.film_lp_img.parameters(), *self.film_lp_text.parameters(), *self.linear_probe_proj.parameters()]
        ids = {id(p) for p in head}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest, "lr": lr, "name": "prompt"},
                {"params": head, "lr": lr * self.head_lr_scale, "name": "head"}]


def _base_method(base, model, classnames, template, n_ctx, loss, base_options, text_options) -> PromptMethod:
    if base == "coop":
        if base_options:
            raise ValueError(f"the CoOp base takes no base_options, got {sorted(base_options)}")
        return PromptMethod(ContextPrompt(model, classnames, template, n_ctx, **text_options), loss)
    if base == "cocoop":
        from .cocoop import CoCoOp

        return CoCoOp(model, classnames, template, n_ctx, loss=loss, **base_options, **text_options)
    from .maple import MaPLe

    return MaPLe(model, classnames, template, n_ctx, loss=loss, **base_options, **text_options)
