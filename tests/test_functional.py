"""AnchorOPT's loss and inference switch against references written out here."""

from __future__ import annotations

import math

import pytest
import torch

from anchoropt.functional import (
    KD_NORMALIZATIONS,
    PREDICTION_MODES,
    anchoropt_loss,
    clip_logits,
    distillation_loss,
    ensemble_logits,
    select_logits,
)

B, C = 6, 7


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(B, C, generator=g, dtype=torch.float64) * 3
    anchor = torch.randn(B, C, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, C, (B,), generator=g)
    return normal, anchor, target


def _reference_loss(normal, anchor, target, ce_weight, kd_weight, T, normalization):
    """Plain-loop reference: CE + kd_weight * T^2 * KL(softmax(ens/T) || softmax(normal/T))."""
    teacher_logits = ((normal + anchor) / 2).detach()
    ce = 0.0
    kl = 0.0
    for b in range(normal.shape[0]):
        log_z = torch.logsumexp(normal[b], dim=0)
        ce = ce + (log_z - normal[b, target[b]])
        log_q = normal[b] / T - torch.logsumexp(normal[b] / T, dim=0)
        log_p = teacher_logits[b] / T - torch.logsumexp(teacher_logits[b] / T, dim=0)
        kl = kl + (log_p.exp() * (log_p - log_q)).sum()
    ce = ce / normal.shape[0]
    denominator = normal.shape[0] if normalization == "batchmean" else normal.shape[0] * normal.shape[1]
    return ce_weight * ce + kd_weight * T**2 * kl / denominator


@pytest.mark.parametrize("normalization", ["batchmean", "released"])
@pytest.mark.parametrize(("ce_weight", "kd_weight", "T"), [(1.0, 10.0, 1.0), (0.5, 3.0, 2.0), (1.0, 1.0, 0.5)])
def test_loss_equals_reference(batch, normalization, ce_weight, kd_weight, T) -> None:
    normal, anchor, target = batch
    got = anchoropt_loss(normal, anchor, target, ce_weight, kd_weight, T, normalization)
    expected = _reference_loss(normal, anchor, target, ce_weight, kd_weight, T, normalization)
    assert got.shape == ()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_released_normalisation_is_batchmean_over_c(batch) -> None:
    normal, anchor, target = batch
    kd_b = anchoropt_loss(normal, anchor, target, ce_weight=0.0, kd_weight=1.0, kd_normalization="batchmean")
    kd_r = anchoropt_loss(normal, anchor, target, ce_weight=0.0, kd_weight=1.0, kd_normalization="released")
    assert kd_b > 0
    torch.testing.assert_close(kd_r * C, kd_b)


def test_kd_weight_zero_is_cross_entropy(batch) -> None:
    normal, anchor, target = batch
    expected = -torch.log_softmax(normal, dim=1)[torch.arange(B), target].mean()
    torch.testing.assert_close(anchoropt_loss(normal, anchor, target, kd_weight=0.0).double(), expected)
    torch.testing.assert_close(
        anchoropt_loss(normal, anchor, target, ce_weight=2.0, kd_weight=0.0).double(), 2 * expected
    )


def test_identical_prompts_give_no_distillation(batch) -> None:
    normal, _, target = batch
    ce = anchoropt_loss(normal, normal, target, kd_weight=0.0)
    torch.testing.assert_close(anchoropt_loss(normal, normal.clone(), target, kd_weight=100.0), ce)


@pytest.mark.parametrize("normalization", ["batchmean", "released"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_teacher_is_detached(batch, normalization, T) -> None:
    normal, anchor, target = batch
    normal = normal.clone().requires_grad_(True)
    anchor = anchor.clone().requires_grad_(True)
    loss = anchoropt_loss(normal, anchor, target, ce_weight=0.0, kd_weight=1.0, temperature=T,
                          kd_normalization=normalization)
    (grad,) = torch.autograd.grad(loss, normal)
    # Teacher a constant: d/ds T^2 KL(p || softmax(s/T)) = T (softmax(s/T) - p), per sample, / denominator.
    p = (((normal + anchor) / 2).detach() / T).softmax(dim=1)
    q = (normal.detach() / T).softmax(dim=1)
    denominator = B if normalization == "batchmean" else B * C
    torch.testing.assert_close(grad.double(), T * (q - p) / denominator)
    # A teacher that carried gradient would give a different answer: the test can tell them apart.
    attached = T**2 * torch.nn.functional.kl_div(
        torch.log_softmax(normal / T, 1), torch.softmax((normal + anchor) / 2 / T, 1), reduction="sum"
    ) / denominator
    (attached_grad,) = torch.autograd.grad(attached, normal)
    assert not torch.allclose(attached_grad.double(), grad.double(), atol=1e-4)


def test_no_gradient_to_the_anchor_logits(batch) -> None:
    normal, anchor, target = batch
    normal = normal.clone().requires_grad_(True)
    anchor = anchor.clone().requires_grad_(True)
    anchoropt_loss(normal, anchor, target).backward()
    assert anchor.grad is None
    assert normal.grad is not None and normal.grad.abs().sum() > 0


def test_fp16_logits_give_fp32_loss(batch) -> None:
    normal, anchor, target = batch
    loss = anchoropt_loss(normal.half(), anchor.half(), target)
    assert loss.dtype == torch.float32
    expected = _reference_loss(normal.half().double(), anchor.half().double(), target, 1.0, 10.0, 1.0, "batchmean")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-4)


def test_distillation_loss_direct(batch) -> None:
    normal, anchor, _ = batch
    got = distillation_loss(normal, anchor, temperature=2.0)
    p, log_p = (anchor / 2).softmax(1), (anchor / 2).log_softmax(1)
    expected = 4.0 * (p * (log_p - (normal / 2).log_softmax(1))).sum() / B
    torch.testing.assert_close(got.double(), expected)


# ---------------------------------------------------------------- inference helpers


def test_select_logits_modes(batch) -> None:
    normal, anchor, _ = batch
    ensemble = (normal + anchor) / 2
    assert select_logits(normal, anchor, "base") is normal
    torch.testing.assert_close(select_logits(normal, anchor, "novel"), ensemble)
    base, novel = select_logits(normal, anchor, "both")
    assert base is normal
    torch.testing.assert_close(novel, ensemble)
    torch.testing.assert_close(ensemble_logits(normal, anchor), ensemble)
    # the pure twin is an ordinary average: differentiable in both inputs (detaching is the loss's job)
    n, a = normal.clone().requires_grad_(True), anchor.clone().requires_grad_(True)
    grads = torch.autograd.grad(ensemble_logits(n, a).sum(), (n, a))
    for g in grads:
        torch.testing.assert_close(g, torch.full_like(g, 0.5))
    assert set(PREDICTION_MODES) == {"base", "novel", "both"}


def test_clip_logits() -> None:
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(3, 8, generator=g) * 5, torch.randn(4, 8, generator=g) * 0.1
    got = clip_logits(image, text, 100.0)
    expected = torch.tensor(
        [[100.0 * torch.cosine_similarity(image[i], text[j], dim=0) for j in range(4)] for i in range(3)]
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert clip_logits(image.half(), text.half(), torch.tensor(math.log(100.0)).exp()).dtype == torch.float32


# ---------------------------------------------------------------- bad input


def test_mismatched_logit_shapes(batch) -> None:
    normal, anchor, target = batch
    with pytest.raises(ValueError, match=r"normal and anchor logits differ in shape: \(6, 7\) vs \(6, 5\)"):
        anchoropt_loss(normal, anchor[:, :5], target)


@pytest.mark.parametrize("bad", [lambda t: t[:4], lambda t: t[:, None]], ids=["short", "2d"])
def test_target_of_wrong_shape(batch, bad) -> None:
    normal, anchor, target = batch
    with pytest.raises(ValueError, match=r"target must have shape \(6,\), got"):
        anchoropt_loss(normal, anchor, bad(target))


@pytest.mark.parametrize("value", [-1, C])
def test_target_out_of_range(batch, value) -> None:
    normal, anchor, target = batch
    target = target.clone()
    target[2] = value
    with pytest.raises(ValueError, match=rf"target holds class indices outside \[0, {C}\)"):
        anchoropt_loss(normal, anchor, target)


def test_unknown_normalisation(batch) -> None:
    normal, anchor, target = batch
    with pytest.raises(ValueError, match=r"unknown KD normalization 'mean'; choose one of"):
        anchoropt_loss(normal, anchor, target, kd_normalization="mean")
    assert set(KD_NORMALIZATIONS) == {"batchmean", "released"}


@pytest.mark.parametrize("T", [0.0, -2.0])
def test_non_positive_temperature(batch, T) -> None:
    normal, anchor, target = batch
    with pytest.raises(ValueError, match=rf"distillation temperature must be > 0, got {T}"):
        anchoropt_loss(normal, anchor, target, temperature=T)


def test_unknown_prediction_mode(batch) -> None:
    normal, anchor, _ = batch
    with pytest.raises(ValueError, match=r"unknown prediction mode 'ensemble'; choose one of"):
        select_logits(normal, anchor, "ensemble")


def test_loss_options_are_checked_even_without_distillation():
    from anchoropt.functional import anchoropt_loss

    logits = torch.zeros(2, 3)
    target = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="unknown KD normalization 'sum'"):
        anchoropt_loss(logits, logits, target, kd_weight=0.0, kd_normalization="sum")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        anchoropt_loss(logits, logits, target, kd_weight=0.0, temperature=0.0)
