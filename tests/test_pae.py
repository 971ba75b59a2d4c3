"""PAE's Koopman-Lyapunov regulariser: the terms against references written out here, gradients, plug-in
points (deep AnchorOPT learner, MaPLe, plain lists), optimiser groups, and no change at inference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from anchoropt import AnchorOPTPromptLearner, TextTower
from anchoropt import functional as Fn
from anchoropt.methods.pae import KoopmanLyapunov, optimizer_groups, pae_loss, prompt_chain
from anchoropt.testing import tiny_open_clip

W = 8  # prompt width
T, J = 3, 4  # prompts per layer, layers in the chain


def _chain(seed=0, scale=0.1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(J, T, W, generator=g, dtype=dtype) * scale


def _reg(**kwargs):
    torch.manual_seed(0)
    return KoopmanLyapunov(W, dim=kwargs.pop("dim", W), **kwargs).double()


def _following(reg, operator, first):
    """A chain whose lifted states follow ``z_{i+1} = z_i K`` exactly (square, invertible lift)."""
    u = reg.lift.weight.detach().t()  # z = P @ u, (W, Z)
    step = u @ operator @ torch.linalg.inv(u)
    chain = [first]
    for _ in range(J - 1):
        chain.append(chain[-1] @ step)
    return torch.stack(chain)


# ---------------------------------------------------------------------- Koopman term
@pytest.mark.parametrize("mode", ["global", "layerwise"])
def test_koopman_term_zero_when_lifted_prompts_follow_k_and_grows_with_deviation(mode):
    reg = _reg(mode=mode, n_layers=J)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        reg.operator.copy_(torch.eye(W, dtype=torch.float64) * 0.9 + torch.randn(reg.operator.shape, generator=g,
                                                                                 dtype=torch.float64) * 0.05)
    ops = reg.operator.detach()
    if mode == "global":
        chain = _following(reg, ops, _chain()[0])
    else:  # each pair its own operator
        u = reg.lift.weight.detach().t()
        rows = [_chain()[0]]
        for i in range(J - 1):
            rows.append(rows[-1] @ (u @ ops[i] @ torch.linalg.inv(u)))
        chain = torch.stack(rows)
    assert float(reg(chain).koopman.detach()) < 1e-20
    noise = torch.randn(chain.shape, generator=g, dtype=torch.float64)
    values = [float(reg(chain + eps * noise).koopman.detach()) for eps in (1e-3, 1e-2, 1e-1)]
    assert 0 < values[0] < values[1] < values[2]
    assert values[1] / values[0] == pytest.approx(100, rel=0.01)  # quadratic in the deviation


def test_koopman_term_is_the_released_mse_mean_and_the_papers_frobenius_sum():
    chain = _chain(scale=1.0)
    released, paper = _reg(dim=5), _reg(dim=5, reading="paper")
    paper.load_state_dict(released.state_dict())
    z = chain @ released.lift.weight.detach().t()
    k = released.operator.detach()
    reference = sum(((z[i] @ k - z[i + 1]) ** 2).mean() for i in range(J - 1))
    torch.testing.assert_close(released(chain).koopman.detach(), reference)
    torch.testing.assert_close(paper(chain).koopman.detach(), reference * T * 5)


# ---------------------------------------------------------------------- Lyapunov term
def _lyapunov_reference(z, k, q, cap=10.0):
    total = 0.0
    for i in range(z.shape[0] - 1):
        cur, pred = z[i], z[i] @ k
        cur = cur / cur.norm(dim=-1, keepdim=True).clamp_min(1)
        pred = pred / pred.norm(dim=-1, keepdim=True).clamp_min(1)
        v_pred = torch.stack([row @ q @ row for row in pred])
        v_cur = torch.stack([row @ q @ row for row in cur])
        total = total + cap * torch.tanh(F.softplus(v_pred - v_cur).mean() / cap)
    return total


def test_lyapunov_term_matches_the_released_formula():
    reg = _reg()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        reg.energy.add_(torch.randn(W, W, generator=g, dtype=torch.float64) * 0.3)
        reg.operator.mul_(1.3)
    chain = _chain(scale=0.5)
    z = chain @ reg.lift.weight.detach().t()
    q = reg.energy.detach().t() @ reg.energy.detach()
    q = q / torch.linalg.matrix_norm(q, ord=2)
    torch.testing.assert_close(reg(chain).lyapunov.detach(), _lyapunov_reference(z, reg.operator.detach(), q))


def _lyapunov_for_gains(chain):
    values = {}
    for name, factor in (("contracting", 0.5), ("identity", 1.0), ("expanding", 2.0)):
        reg = _reg()
        with torch.no_grad():
            reg.operator.mul_(factor)
        values[name] = float(reg(chain).lyapunov.detach())
    return values


def test_lyapunov_smaller_for_contracting_than_expanding_k_and_never_zero():
    values = _lyapunov_for_gains(_chain(scale=0.05))  # lifted rows of norm < 1
    assert values["contracting"] < values["identity"] < values["expanding"]
    assert values["identity"] == pytest.approx((J - 1) * 10 * math.tanh(math.log(2) / 10))  # capped softplus(0)
    # released softplus: each pair's penalty lies in [softplus(-1), softplus(1)] (row-normalised, ||Q|| = 1)
    assert values["contracting"] >= (J - 1) * F.softplus(torch.tensor(-1.0)).item() - 1e-9 > 0
    assert values["expanding"] <= (J - 1) * F.softplus(torch.tensor(1.0)).item() + 1e-9


def test_released_lyapunov_is_blind_to_the_gain_of_k_once_lifted_rows_have_norm_above_one():
    values = _lyapunov_for_gains(_chain(scale=5.0))  # every row normalised to norm 1: only directions count
    assert values["contracting"] == pytest.approx(values["expanding"]) == pytest.approx(values["identity"])


def test_lyapunov_cap_holds():
    chain = _chain(scale=3.0)
    reg = _reg(cap=0.2)
    with torch.no_grad():
        reg.operator.mul_(1e3)
    value = float(reg(chain).lyapunov.detach())
    assert value <= (J - 1) * 0.2
    uncapped = _reg(cap=1e9)
    uncapped.load_state_dict(reg.state_dict())
    assert value < float(uncapped(chain).lyapunov.detach())
    assert float(Fn.soft_cap(torch.tensor(1e6))) == pytest.approx(10.0)
    assert float(Fn.soft_cap(torch.tensor(1e-3))) == pytest.approx(1e-3, rel=1e-6)


def test_paper_reading_is_a_hinge_on_actual_consecutive_states():
    reg = _reg(reading="paper")
    shrinking = _chain()[0][None] * torch.tensor([1.0, 0.8, 0.6, 0.4], dtype=torch.float64)[:, None, None]
    assert float(reg(shrinking).lyapunov.detach()) == 0.0  # energy never increases along the actual chain
    growing = shrinking.flip(0)
    z = growing @ reg.lift.weight.detach().t()
    q = Fn.stable_q(reg.energy.detach())
    expected = sum((Fn.lyapunov_energy(z[i + 1], q) - Fn.lyapunov_energy(z[i], q)).sum() for i in range(J - 1))
    torch.testing.assert_close(reg(growing).lyapunov.detach(), expected)
    assert float(expected) > 0


def test_total_is_the_weighted_sum():
    reg = _reg(alpha=0.5, beta=0.2)
    terms = reg(_chain(scale=1.0))
    torch.testing.assert_close(terms.total, 0.5 * terms.koopman + 0.2 * terms.lyapunov)


# ---------------------------------------------------------------------- gradients
@pytest.mark.parametrize("reading", ["released", "paper"])
def test_gradients_reach_u_k_l_and_the_prompts(reading):
    reg = _reg(reading=reading)
    with torch.no_grad():
        reg.operator.mul_(1.2)  # off the identity: the Lyapunov term then depends on L
    base = _chain(scale=0.5)
    if reading == "paper":
        base = base * torch.arange(1, J + 1, dtype=base.dtype)[:, None, None]  # growing energy: the hinge is active
    prompts = [p.clone().requires_grad_(True) for p in base]
    reg(prompts).total.backward()
    for name, param in reg.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompts)


def test_functional_terms_pass_gradcheck():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = (torch.eye(4, dtype=torch.float64) + 0.1 * torch.randn(4, 4, generator=g, dtype=torch.float64)).requires_grad_()
    lmat = (torch.eye(4, dtype=torch.float64) + 0.2 * torch.randn(4, 4, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: Fn.koopman_loss(a, b), (z, k))
    assert torch.autograd.gradcheck(lambda a, b, c: Fn.lyapunov_loss(a * 0.2, b, Fn.stable_q(c)), (z, k, lmat))


# ---------------------------------------------------------------------- bad input
def test_bad_input_raises():
    with pytest.raises(ValueError, match="mode"):
        KoopmanLyapunov(W, mode="pairwise")
    with pytest.raises(ValueError, match="n_layers"):
        KoopmanLyapunov(W, mode="layerwise")
    with pytest.raises(ValueError, match="reading"):
        KoopmanLyapunov(W, reading="mine")
    with pytest.raises(ValueError, match="alpha"):
        KoopmanLyapunov(W, alpha=-1)
    reg = KoopmanLyapunov(W, dim=4)
    with pytest.raises(ValueError, match="J >= 2"):
        reg([torch.zeros(T, W)])
    with pytest.raises(ValueError, match=f"\\(J, T, {W}\\)"):
        reg([torch.zeros(T, W + 1)] * 2)
    with pytest.raises(ValueError, match="same-shape"):
        reg([torch.zeros(T, W), torch.zeros(T + 1, W)])
    with pytest.raises(ValueError, match="built for chains of 3"):
        KoopmanLyapunov(W, dim=4, mode="layerwise", n_layers=3)([torch.zeros(T, W)] * 4)


# ---------------------------------------------------------------------- training helpers
def test_own_optimizer_group_without_weight_decay_unless_asked():
    for decay_pae, expected in ((False, 1.0), (True, 1.0 - 0.1 * 0.5)):
        reg = KoopmanLyapunov(W, dim=4)
        prompts = torch.nn.Parameter(torch.ones(J, T, W))
        groups = optimizer_groups([prompts], reg, weight_decay=0.5, decay_pae=decay_pae)
        assert [len(g["params"]) for g in groups] == [1, 3]
        optimizer = torch.optim.SGD(groups, lr=0.1)
        for p in (prompts, *reg.parameters()):
            p.grad = torch.zeros_like(p)  # weight decay only
        optimizer.step()
        torch.testing.assert_close(reg.operator.detach(), torch.eye(4) * expected)
        torch.testing.assert_close(prompts.detach(), torch.full_like(prompts, 1.0 - 0.1 * 0.5))


def test_own_gradient_clipping():
    reg = KoopmanLyapunov(W, dim=4)
    for p in reg.parameters():
        p.grad = torch.full_like(p, 100.0)
    before = reg.clip_grad_(max_norm=10.0)
    assert float(before) > 10
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reg.parameters()]))
    assert float(after) == pytest.approx(10.0, rel=1e-4)


def test_spectral_radius_and_config():
    reg = KoopmanLyapunov(W, dim=4, mode="layerwise", n_layers=3)
    assert reg.spectral_radius() == pytest.approx(1.0)
    with torch.no_grad():
        reg.operator[1].mul_(3)
    assert reg.spectral_radius() == pytest.approx(3.0)
    rebuilt = KoopmanLyapunov(**reg.config())
    assert rebuilt.operator.shape == reg.operator.shape == (2, 4, 4)


# ---------------------------------------------------------------------- plug-in points
CLASSES = ["cat", "golden retriever", "sea turtle"]


@pytest.fixture(scope="module")
def model():
    return tiny_open_clip(layers=4).requires_grad_(False).eval()


def _learner(model, depth, seed=0):
    torch.manual_seed(seed)
    anchors = torch.randn(1, TextTower(model).width) * 0.02
    return AnchorOPTPromptLearner(model, CLASSES, anchors, n_soft=2, deep_depth=depth)


def test_deep_learner_chain_is_its_soft_deep_prompts_without_anchors(model):
    learner = _learner(model, 3)
    try:
        chain = prompt_chain(learner)
        assert len(chain) == 3 and all(c.shape == (2, 64) for c in chain)
        assert all(c.data_ptr() != learner.anchors.data_ptr() for c in chain)
        with_input = prompt_chain(learner, include_input=True)
        assert len(with_input) == 4 and with_input[0] is learner.soft
        reg = KoopmanLyapunov(64, dim=16)
        pae_loss(learner, reg).backward()
        assert learner.deep.prompts.grad is not None and learner.deep.prompts.grad.abs().sum() > 0
        assert learner.soft.grad is None and learner.anchors.grad is None  # input layer / anchors: not in the chain
    finally:
        learner.deep_hooks.remove()


def test_shallow_learner_and_unknown_objects_are_refused(model):
    with pytest.raises(ValueError, match="deep_depth"):
        prompt_chain(_learner(model, 0))
    with pytest.raises(TypeError, match="per-layer prompts"):
        prompt_chain(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="side"):
        prompt_chain([torch.zeros(2, 3)] * 2, side="image")


def test_inference_unchanged_with_and_without_pae(model):
    plain, regularised = _learner(model, 3), _learner(model, 3)
    try:
        regularised.train()
        reg = KoopmanLyapunov(64, dim=16)
        pae_loss(regularised, reg).backward()  # PAE touched the prompts' graph and gradients, not their values
        images = F.normalize(torch.randn(5, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
        for learner in (plain, regularised):
            learner.eval()
        torch.testing.assert_close(regularised.predict(images, "both"), plain.predict(images, "both"), rtol=0, atol=0)
        assert set(regularised.state_dict()) == set(plain.state_dict())  # nothing of PAE in the learner
    finally:
        plain.deep_hooks.remove()
        regularised.deep_hooks.remove()


def test_maple_text_and_visual_chains():
    import peer_fakes as pf

    clip_model = pf.tiny_maple_clip("fp32", n_ctx=2)
    learner = pf.maple.MultiModalPromptLearner(pf.make_cfg("maple", n_ctx=2, depth=4), pf.BASE, clip_model)
    learner.proj.float()
    text = prompt_chain(learner)
    assert len(text) == 3 and all(t is p for t, p in zip(text, learner.compound_prompts_text))
    visual = prompt_chain(learner, side="visual")
    assert len(visual) == 3 and visual[0].shape == (2, learner.proj.out_features)
    vis_reg = KoopmanLyapunov(learner.proj.out_features, dim=8)
    vis_reg(visual).total.backward()
    assert learner.compound_prompt_projections[0].weight.grad.abs().sum() > 0
    model = pf.maple.CustomCLIP(pf.make_cfg("maple", n_ctx=2, depth=4), pf.BASE, clip_model)
    assert len(prompt_chain(model)) == 3  # a CustomCLIP holding the learner
    assert math.isfinite(float(pae_loss(model, KoopmanLyapunov(64, dim=8)).detach()))


def test_attach_to_maple_through_the_anchoropt_shim_trains_and_leaves_inference_unchanged():
    import peer_fakes as pf
    from anchoropt.adapters import find, maple
    from anchoropt.methods.pae import attach, regularization

    clip_model = pf.tiny_maple_clip("fp32", n_ctx=2)
    cfg = pf.make_cfg("maple", n_ctx=2, prec="fp32", depth=3)  # the fake's 3 text blocks
    with maple.patch(pf.maple, anchors=pf.word_embedding(clip_model, "a")[:1]):
        model = pf.maple.CustomCLIP(cfg, pf.BASE, clip_model)
    pl = model.prompt_learner
    model.eval()
    images = pf.images(2)
    with torch.no_grad():
        before = model(images)
    text_reg = attach(pl, dim=8)
    visual_reg = attach(pl, side="visual", dim=8)
    assert text_reg.width == 64 and visual_reg.width == pl.proj.out_features and text_reg.n_layers == 2
    assert any(name.startswith("prompt_learner.pae.") for name, _ in model.named_parameters())  # MaPLe trains it
    with torch.no_grad():
        torch.testing.assert_close(model(images), before, rtol=0, atol=0)
    model.train()
    labels = torch.tensor([0, 1])
    loss = find(model).loss(labels, base_loss=model(images, labels)) + regularization(pl)
    loss.backward()
    for p in (pl.compound_prompts_text[0], pl.compound_prompt_projections[0].weight, text_reg.operator,
              visual_reg.lift.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="already"):
        attach(pl)
    with pytest.raises(TypeError, match="next to"):
        attach(_learner(tiny_open_clip(layers=4), 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda():
    from anchoropt.methods import mpa

    reg = KoopmanLyapunov(W, dim=4, device="cuda")
    prompts = torch.randn(J, T, W, device="cuda", requires_grad=True)
    terms = reg(prompts)
    terms.total.backward()
    assert terms.total.device.type == "cuda" and prompts.grad.abs().sum() > 0 and reg.operator.grad is not None
    visual = tiny_open_clip(image_size=32, vision_layers=2).requires_grad_(False).eval().visual.cuda()
    result = mpa.mpa_init(visual, torch.randn(4, 3, 32, 32, device="cuda"), torch.tensor([0, 1, 0, 1], device="cuda"),
                          n_prompts=2, depth=1, text_features=torch.randn(2, 32, device="cuda"), window=8, stride=8)
    assert result.prompts.device.type == "cuda" and result.prompts.shape == (2, 2, 64)
