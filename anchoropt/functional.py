"""Pure functions behind AnchorOPT's modules (torchmetrics-style functional twins).

Axes: ``B`` images, ``C`` classes, ``E`` feature width, ``K`` position-matrix size; PAE section:
``J`` layers in a prompt chain, ``T`` prompts per layer, ``Z`` Koopman (lifted) width.
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
    "PAE_READINGS",
    "koopman_loss",
    "lyapunov_energy",
    "lyapunov_loss",
    "soft_cap",
    "stable_q",
]

KD_NORMALIZATIONS = ("batchmean", "released")
PREDICTION_MODES = ("base", "novel", "both")
PAE_READINGS = ("released", "paper")


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
    _check_rows(features, name)


def _check_rows(features: torch.Tensor, name: str) -> None:
    """Refuse rows with NaN / inf, and all-zero rows (L2 normalisation leaves them zero, every logit is 0 and
    argmax says class 0).  One device sync when the features are fine (this runs on every forward)."""
    if not (features.is_floating_point() and features.numel()):
        return
    nonfinite = ~torch.isfinite(features).all(dim=1)
    zero = (features == 0).all(dim=1)
    if not bool((nonfinite | zero).any()):
        return
    _check_finite(features, name)
    rows = zero.nonzero().flatten().tolist()
    raise ValueError(f"{name} has all-zero rows {rows[:10]}{' ...' if len(rows) > 10 else ''}: a zero "
                     "feature has no direction to score (every class would get logit 0); check the images "
                     "or the feature file they came from")


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


# ---------------------------------------------------------------------- PAE (Koopman-Lyapunov)
def _check_reading(reading: str) -> None:
    if reading not in PAE_READINGS:
        raise ValueError(f"unknown PAE reading {reading!r}; choose one of {PAE_READINGS}")


def _pair_operators(operators: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """``(Z, Z)`` (shared) or ``(J-1, Z, Z)`` (one per pair) -> ``(J-1, Z, Z)``."""
    if operators.dim() == 2:
        return operators.expand(n_pairs, *operators.shape)
    if operators.dim() != 3 or operators.shape[0] != n_pairs:
        raise ValueError(
            f"Koopman operators must be (Z, Z) or ({n_pairs}, Z, Z) for {n_pairs} layer pairs, got {tuple(operators.shape)}"
        )
    return operators


def _check_lifted(lifted: torch.Tensor) -> None:
    if lifted.dim() != 3 or lifted.shape[0] < 2:
        got = tuple(lifted.shape)
        raise ValueError(f"lifted prompts must be (J, T, Z) with J >= 2 layers (at least one pair), got {got}")


def koopman_loss(lifted: torch.Tensor, operators: torch.Tensor, reading: str = "released") -> torch.Tensor:
    """Koopman consistency over consecutive layers: ``sum_i d(z_i K_i, z_{i+1})`` (unweighted).

    Args:
        lifted: ``(J, T, Z)`` lifted prompts ``z_i = P_i U``.
        operators: ``(Z, Z)`` shared operator or ``(J-1, Z, Z)`` one per pair.
        reading: ``"released"``: ``d`` is the mean squared error over the ``T x Z`` entries (PAE's code);
            ``"paper"``: the squared Frobenius norm (the paper's formula).

    Example:
        >>> z = torch.ones(3, 2, 4)
        >>> float(koopman_loss(z, torch.eye(4)))
        0.0
    """
    _check_reading(reading)
    _check_lifted(lifted)
    ops = _pair_operators(operators, lifted.shape[0] - 1)
    error = (lifted[:-1] @ ops - lifted[1:]).pow(2)  # (J-1, T, Z)
    per_pair = error.mean(dim=(1, 2)) if reading == "released" else error.sum(dim=(1, 2))
    return per_pair.sum()


def stable_q(l_matrix: torch.Tensor) -> torch.Tensor:
    """``Q = L^T L / ||L^T L||_2``: symmetric positive semi-definite with spectral norm 1 (``(Z, Z)``; a stack
    ``(J-1, Z, Z)`` of per-pair ``L_i`` gives one ``Q_i`` each)."""
    q = l_matrix.transpose(-2, -1) @ l_matrix
    return q / torch.linalg.matrix_norm(q, ord=2, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)


def lyapunov_energy(states: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``V(z) = z Q z^T`` per row: ``(..., T, Z) -> (..., T)``."""
    return ((states @ q) * states).sum(dim=-1)


def soft_cap(x: torch.Tensor, cap: float = 10.0) -> torch.Tensor:
    """``cap * tanh(x / cap)``: close to ``x`` for small values, never above ``cap`` (PAE's saturation)."""
    return cap * torch.tanh(x / cap)


def _row_normalised(z: torch.Tensor) -> torch.Tensor:
    return z / z.norm(dim=-1, keepdim=True).clamp_min(1.0)


def lyapunov_loss(
    lifted: torch.Tensor, operators: torch.Tensor, q: torch.Tensor, reading: str = "released", cap: float = 10.0
) -> torch.Tensor:
    """Lyapunov-inspired stability penalty over consecutive layers (unweighted, summed over pairs).

    ``"released"`` (PAE's code): rows of ``z_i`` and of the **predicted** ``z_i K_i`` are divided by
    ``max(||row||, 1)``; per pair ``soft_cap(mean_t softplus(V(z_i K_i) - V(z_i)))`` - it constrains the
    operator, is smooth, and is never exactly zero (``softplus > 0``).  ``"paper"``: the hinge on the actual
    consecutive states, ``sum_t max(0, V(z_{i+1}) - V(z_i))`` per pair (``V(z) = tr(z Q z^T)``), no cap.

    Args:
        lifted: ``(J, T, Z)`` lifted prompts.
        operators: ``(Z, Z)`` or ``(J-1, Z, Z)``.
        q: ``(Z, Z)`` energy matrix (:func:`stable_q`), or ``(J-1, Z, Z)``: pair ``i`` measured with ``Q_i``.
        cap: the released reading's soft saturation (``cap * tanh(x / cap)``).
    """
    _check_reading(reading)
    _check_lifted(lifted)
    if q.dim() == 3 and q.shape[0] != lifted.shape[0] - 1:
        raise ValueError(f"per-pair energy matrices must be ({lifted.shape[0] - 1}, Z, Z), got {tuple(q.shape)}")
    if reading == "paper":
        increase = lyapunov_energy(lifted[1:], q) - lyapunov_energy(lifted[:-1], q)  # (J-1, T)
        return increase.clamp_min(0).sum()
    ops = _pair_operators(operators, lifted.shape[0] - 1)
    current = _row_normalised(lifted[:-1])
    predicted = _row_normalised(lifted[:-1] @ ops)
    increase = lyapunov_energy(predicted, q) - lyapunov_energy(current, q)  # (J-1, T)
    return soft_cap(F.softplus(increase).mean(dim=-1), cap).sum()
