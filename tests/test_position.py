"""PositionMatrix and its functional twin: hard rows forward, soft gradients back, deterministic eval."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anchoropt import ARRANGEMENTS, PositionMatrix
from anchoropt.functional import gumbel_softmax_st, hard_argmax


def _gumbel(shape, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, dtype=dtype).clamp_(1e-6, 1 - 1e-6)
    return -(-u.log()).log()


def _torch_gumbel_noise(logits: torch.Tensor) -> torch.Tensor:
    """The noise ``F.gumbel_softmax`` draws next from the global RNG (same recipe as its source)."""
    return -torch.empty_like(logits).exponential_().log()


def _is_one_hot_rows(m: torch.Tensor) -> bool:
    return bool(((m == 0) | (m == 1)).all() and (m.sum(dim=-1) == 1).all())


# ---------------------------------------------------------------- training: straight-through


def test_training_rows_are_one_hot_and_gradients_reach_logits() -> None:
    torch.manual_seed(0)
    pm = PositionMatrix(4, 1).train()
    m = pm.matrix()
    assert m.shape == (5, 5) and _is_one_hot_rows(m)
    tokens = torch.randn(5, 8)
    out = pm(tokens)
    assert out.shape == (5, 8)
    (out * torch.randn(5, 8)).sum().backward()
    assert pm.logits.grad is not None and pm.logits.grad.abs().sum() > 0
    assert pm.logits.grad.abs().amax(dim=1).gt(0).all()  # every row learns


def test_training_forward_picks_rows_of_tokens() -> None:
    torch.manual_seed(1)
    pm = PositionMatrix(3, 2).train()
    tokens = torch.randn(2, 5, 6)  # leading batch axis
    m = pm.matrix()
    out = pm(tokens, matrix=m)
    picked = m.argmax(dim=1)
    torch.testing.assert_close(out, tokens[:, picked])


def test_training_matrix_is_gumbel_argmax_and_st_gradient() -> None:
    """The sampled matrix is one-hot(argmax(logits + g)); its gradient is softmax((logits + g)/tau)'s."""
    torch.manual_seed(2)
    pm = PositionMatrix(4, 1, tau=0.7, init="randn").train()
    w = torch.randn(5, 5)
    state = torch.random.get_rng_state()
    (pm.matrix() * w).sum().backward()
    torch.random.set_rng_state(state)
    noise = _torch_gumbel_noise(pm.logits.detach())

    logits = pm.logits.detach().clone().requires_grad_(True)
    ref = gumbel_softmax_st(logits, noise, tau=0.7)
    (ref * w).sum().backward()
    torch.random.set_rng_state(state)
    torch.testing.assert_close(pm.matrix(), hard_argmax(pm.logits.detach() + noise))
    torch.testing.assert_close(pm.logits.grad, logits.grad)


def test_tau_scales_the_gradient() -> None:
    """For large tau the softmax is near uniform and the gradient shrinks like 1/tau."""
    w = torch.randn(5, 5, generator=torch.Generator().manual_seed(3))
    grads = {}
    for tau in (100.0, 1000.0):
        torch.manual_seed(4)
        pm = PositionMatrix(4, 1, tau=tau).train()
        (pm.matrix() * w).sum().backward()
        grads[tau] = pm.logits.grad.norm().item()
    assert grads[100.0] / grads[1000.0] == pytest.approx(10.0, rel=0.05)


# ---------------------------------------------------------------- functional twin


def test_gumbel_softmax_st_forward_is_hard_argmax() -> None:
    g = torch.Generator().manual_seed(5)
    logits, noise = torch.randn(6, 6, generator=g), _gumbel((6, 6), g, torch.float32)
    out = gumbel_softmax_st(logits, noise, tau=0.5)
    assert _is_one_hot_rows(out)
    assert torch.equal(out.argmax(dim=1), (logits + noise).argmax(dim=1))


def test_soft_relaxation_gradcheck() -> None:
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    noise, w = _gumbel((5, 5), g), torch.randn(5, 5, dtype=torch.float64, generator=g)
    for tau in (0.5, 1.0, 3.0):
        assert torch.autograd.gradcheck(lambda l: ((l + noise) / tau).softmax(dim=-1) * w, (logits,))


@pytest.mark.parametrize("tau", [0.3, 1.0, 2.5])
def test_straight_through_gradient_equals_softmax_gradient(tau) -> None:
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(5, 5, dtype=torch.float64, generator=g)
    noise, w = _gumbel((5, 5), g), torch.randn(5, 5, dtype=torch.float64, generator=g)
    st_in = logits.clone().requires_grad_(True)
    (st_grad,) = torch.autograd.grad((gumbel_softmax_st(st_in, noise, tau) * w).sum(), st_in)
    # Independent reference: the softmax Jacobian written out, J = diag(p) - p p^T, divided by tau.
    p = ((logits + noise) / tau).softmax(dim=-1)
    expected = torch.stack([(torch.diag(p[i]) - torch.outer(p[i], p[i])) @ w[i] for i in range(5)]) / tau
    torch.testing.assert_close(st_grad, expected)
    # and it is exactly what a numerically checked soft relaxation gives
    soft_in = logits.clone().requires_grad_(True)
    (soft_grad,) = torch.autograd.grad((((soft_in + noise) / tau).softmax(dim=-1) * w).sum(), soft_in)
    torch.testing.assert_close(st_grad, soft_grad)


def test_hard_argmax() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    torch.testing.assert_close(hard_argmax(logits), torch.eye(3)[[1, 0, 2]])


# ---------------------------------------------------------------- evaluation: deterministic


def test_eval_is_deterministic_and_consumes_no_randomness() -> None:
    torch.manual_seed(8)
    pm = PositionMatrix(4, 1).eval()
    tokens = torch.randn(5, 8)
    state = torch.random.get_rng_state()
    a, b = pm(tokens), pm(tokens)
    m = pm.matrix()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b)
    torch.testing.assert_close(m, F.one_hot(pm.logits.detach().argmax(dim=1), 5).float())
    torch.testing.assert_close(a, tokens[pm.assignment()])


def test_eval_matrix_follows_the_logits() -> None:
    pm = PositionMatrix(2, 1, init="zeros").eval()
    with torch.no_grad():
        pm.logits.copy_(torch.tensor([[0.0, 0.0, 9.0], [0.0, 9.0, 0.0], [0.0, 9.0, 0.0]]))
    assert pm.assignment().tolist() == [2, 1, 1]  # a token may repeat (source 1) or vanish (source 0)
    assert pm.describe() == ["anchor1", "soft2", "soft2"]
    tokens = torch.arange(3.0)[:, None].expand(3, 4)
    assert pm(tokens)[:, 0].tolist() == [2.0, 1.0, 1.0]


def test_sample_in_eval_samples() -> None:
    torch.manual_seed(9)
    pm = PositionMatrix(4, 1, init="zeros", sample_in_eval=True).eval()
    state = torch.random.get_rng_state()
    draws = {tuple(pm.matrix().argmax(dim=1).tolist()) for _ in range(10)}
    assert not torch.equal(torch.random.get_rng_state(), state)
    assert len(draws) > 1
    assert all(_is_one_hot_rows(pm.matrix()) for _ in range(3))


def test_train_samples_but_eval_does_not() -> None:
    torch.manual_seed(10)
    pm = PositionMatrix(4, 1, init="zeros").train()
    assert len({tuple(pm.matrix().argmax(dim=1).tolist()) for _ in range(10)}) > 1
    pm.eval()
    assert len({tuple(pm.matrix().argmax(dim=1).tolist()) for _ in range(10)}) == 1


# ---------------------------------------------------------------- fixed arrangements


@pytest.mark.parametrize(
    ("arrangement", "order"),
    [
        ("anchor_before", [4, 0, 1, 2, 3]),
        ("anchor_middle", [0, 1, 4, 2, 3]),
        ("anchor_after", [0, 1, 2, 3, 4]),
    ],
)
def test_fixed_arrangements(arrangement, order) -> None:
    pm = PositionMatrix(4, 1, arrangement=arrangement)
    assert pm.is_fixed and [p for p in pm.parameters() if p.requires_grad] == []
    tokens = torch.randn(3, 5, 8)
    for mode in (True, False):
        pm.train(mode)
        assert pm.assignment().tolist() == order
        torch.testing.assert_close(pm.matrix(), torch.eye(5)[order])
        torch.testing.assert_close(pm(tokens), tokens[:, order])


def test_fixed_arrangement_with_two_anchors() -> None:
    assert PositionMatrix(3, 2, arrangement="anchor_before").assignment().tolist() == [3, 4, 0, 1, 2]
    assert PositionMatrix(3, 2, arrangement="anchor_middle").assignment().tolist() == [0, 3, 4, 1, 2]
    assert PositionMatrix(3, 2, arrangement="anchor_after").describe() == [
        "soft1", "soft2", "soft3", "anchor1", "anchor2"
    ]


def test_describe_names() -> None:
    pm = PositionMatrix(4, 1, arrangement="anchor_before")
    assert pm.describe() == ["anchor1", "soft1", "soft2", "soft3", "soft4"]
    assert "learned" in ARRANGEMENTS and set(ARRANGEMENTS) >= {"anchor_before", "anchor_middle", "anchor_after"}


def test_learned_logits_trainable_and_in_state_dict() -> None:
    pm = PositionMatrix(4, 1, init="identity", init_scale=3.0)
    assert pm.logits.requires_grad and pm.logits.shape == (5, 5)
    torch.testing.assert_close(pm.state_dict()["logits"], torch.eye(5) * 3.0)
    assert pm.eval().assignment().tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(pm.probabilities().sum(dim=1), torch.ones(5))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_bad_tau(tau) -> None:
    with pytest.raises(ValueError, match=rf"temperature tau must be > 0, got {tau}"):
        PositionMatrix(4, 1, tau=tau)


def test_unknown_arrangement() -> None:
    with pytest.raises(ValueError, match=r"unknown arrangement 'anchor_last'; choose one of"):
        PositionMatrix(4, 1, arrangement="anchor_last")


def test_unknown_init() -> None:
    with pytest.raises(ValueError, match=r"unknown init 'xavier'"):
        PositionMatrix(4, 1, init="xavier")


@pytest.mark.parametrize(("n_soft", "n_anchor"), [(0, 0), (-1, 2), (3, -1)])
def test_nothing_to_arrange(n_soft, n_anchor) -> None:
    with pytest.raises(ValueError, match=rf"need at least one token to arrange, got n_soft={n_soft}"):
        PositionMatrix(n_soft, n_anchor)


@pytest.mark.parametrize("shape", [(4, 8), (2, 6, 8), (5,)])
def test_wrong_token_count(shape) -> None:
    pm = PositionMatrix(4, 1)
    with pytest.raises(ValueError, match=r"expected tokens of shape \(\.\.\., 5, D\), got"):
        pm(torch.zeros(shape))
