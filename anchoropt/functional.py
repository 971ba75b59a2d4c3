"""Pure functions behind AnchorOPT's modules (torchmetrics-style functional twins).

Axes: ``B`` images, ``C`` classes, ``E`` feature width, ``K`` position-matrix size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "hard_argmax",
    "gumbel_softmax_st",
    "clip_logits",
    "ensemble_logits",
    "distillation_loss",
    "anchoropt_loss",
    "select_logits",
    "check_features",
    "KD_NORMALIZATIONS",
    "PREDICTION_MODES",
]

KD_NORMALIZATIONS = ("batchmean", "released")
PREDICTION_MODES = ("base", "novel", "both")


def hard_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise one-hot of the argmax: ``(K, K) -> (K, K)`` float."""
    return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)


def gumbel_softmax_st(logits: torch.Tensor, gumbel_noise: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Straight-through Gumbel-softmax with explicit noise (reproducible; ``F.gumbel_softmax`` draws its own).

    Forward value is the hard one-hot of ``logits + noise``; the gradient is that of
    ``softmax((logits + noise) / tau)`` (paper eqs. 6-7).
    """
    soft = ((logits + gumbel_noise) / tau).softmax(dim=-1)
    return hard_argmax(soft) - soft.detach() + soft


def check_features(features: torch.Tensor, name: str, width: int | None = None) -> None:
    """Refuse features that are not a finite ``(B, width)`` tensor, naming ``name`` (e.g. ``"image_features"``)."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape (B, E), got {type(features).__name__}")
    if features.dim() != 2 or (width is not None and features.shape[1] != width):
        expected = f"(B, {width})" if width is not None else "(B, E)"
        raise ValueError(
            f"{name} has shape {tuple(features.shape)}, expected {expected}"
            + (": features of another CLIP model, or not yet projected?" if width is not None else "")
        )
    _check_finite(features, name)


def _check_finite(tensor: torch.Tensor, name: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        rows = (~torch.isfinite(tensor)).reshape(tensor.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"{name} holds NaN / inf values (rows {rows[:10]}{' ...' if len(rows) > 10 else ''})")


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float):
    """CLIP logits ``(B, C)`` from image ``(B, E)`` and text ``(C, E)`` features (normalised here).

    ``logit_scale`` is the already-exponentiated scale (100 for CLIP), computed in float32.
    """
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    return torch.as_tensor(logit_scale, dtype=torch.float32, device=image.device) * image @ text.t()


def ensemble_logits(logits_normal: torch.Tensor, logits_anchor: torch.Tensor) -> torch.Tensor:
    """The normal / anchor-prompt ensemble ``(normal + anchor) / 2`` used for novel classes and as KD teacher."""
    return (logits_normal + logits_anchor) / 2


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    normalization: str = "batchmean",
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` with the teacher detached.

    ``normalization``: ``"batchmean"`` divides the summed KL by ``B`` (per-sample KL, the textbook choice);
    ``"released"`` divides by ``B * C`` as the authors' code does (its KD weights are ~C times larger).
    """
    if normalization not in KD_NORMALIZATIONS:
        raise ValueError(f"unknown KD normalization {normalization!r}; choose one of {KD_NORMALIZATIONS}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"the distillation temperature must be > 0, got {temperature} (a finite number)")
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_student, teacher, reduction="sum")
    denominator = student_logits.shape[0] if normalization == "batchmean" else student_logits.numel()
    return kl * temperature**2 / denominator


def anchoropt_loss(
    logits_normal: torch.Tensor,
    logits_anchor: torch.Tensor,
    target: torch.Tensor,
    ce_weight: float = 1.0,
    kd_weight: float = 10.0,
    temperature: float = 1.0,
    kd_normalization: str = "batchmean",
) -> torch.Tensor:
    """Stage II loss ``ce_weight * CE(normal, y) + kd_weight * T^2 * KL(ensemble || normal)``.

    Args:
        logits_normal: ``(B, C)`` logits of the trainable normal prompt.
        logits_anchor: ``(B, C)`` logits of the frozen anchor prompt.
        target: ``(B,)`` class indices.
    """
    if logits_normal.shape != logits_anchor.shape:
        raise ValueError(
            f"normal and anchor logits differ in shape: {tuple(logits_normal.shape)} vs {tuple(logits_anchor.shape)}"
        )
    if target.shape != logits_normal.shape[:1]:
        raise ValueError(f"target must have shape ({logits_normal.shape[0]},), got {tuple(target.shape)}")
    if logits_normal.dim() != 2 or logits_normal.shape[0] == 0:
        raise ValueError(f"the loss needs a non-empty batch of (B, C) logits, got shape {tuple(logits_normal.shape)}")
    _check_finite(logits_normal, "logits_normal")
    _check_finite(logits_anchor, "logits_anchor")
    for name, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be >= 0, got {value} (a finite number)")
    n_classes = logits_normal.shape[1]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= n_classes):
        raise ValueError(f"target holds class indices outside [0, {n_classes}): {target.tolist()[:10]}")
    if kd_normalization not in KD_NORMALIZATIONS:
        raise ValueError(f"unknown KD normalization {kd_normalization!r}; choose one of {KD_NORMALIZATIONS}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"the distillation temperature must be > 0, got {temperature} (a finite number)")
    loss = ce_weight * F.cross_entropy(logits_normal.float(), target)
    if kd_weight:
        teacher = ensemble_logits(logits_normal, logits_anchor)
        loss = loss + kd_weight * distillation_loss(logits_normal, teacher, temperature, kd_normalization)
    return loss


def select_logits(logits_normal: torch.Tensor, logits_anchor: torch.Tensor, mode: str):
    """Inference switch: ``"base"`` -> normal prompt, ``"novel"`` -> ensemble, ``"both"`` -> ``(base, novel)``."""
    if mode == "base":
        return logits_normal
    if mode == "novel":
        return ensemble_logits(logits_normal, logits_anchor)
    if mode == "both":
        return logits_normal, ensemble_logits(logits_normal, logits_anchor)
    raise ValueError(f"unknown prediction mode {mode!r}; choose one of {PREDICTION_MODES}")
