"""accelerate(): a CoOp-family TextEncoder on anchoropt's exact fast text path, against the contract fakes."""

from __future__ import annotations

import pytest
import torch

import anchoropt.adapters as adapters
from anchoropt import shared_prefix
from anchoropt.adapters.fast_text import shared_prefix_length

import peer_fakes as pf


def _encoded(model):
    """Text features of the learner's prompts and the gradient they send to its context ``ctx``."""
    model.prompt_learner.zero_grad(set_to_none=True)
    features = model.text_encoder(model.prompt_learner(), model.tokenized_prompts)
    (features.float() * torch.linspace(-1, 1, features.numel()).view_as(features)).sum().backward()
    return features.detach(), model.prompt_learner.ctx.grad.clone()


@pytest.mark.parametrize("prec", ["fp32", "fp16"])
def test_coop_text_encoder_gives_the_same_features_and_gradients(prec, monkeypatch):
    cfg = pf.make_cfg("coop", prec=prec)
    clip_model = pf.tiny_clip(prec)
    model = pf.build_model("coop", cfg, pf.BASE, clip_model)[0]
    want, want_grad = _encoded(model)
    calls = []
    original = shared_prefix.encode_with_shared_prefix
    monkeypatch.setattr(shared_prefix, "encode_with_shared_prefix", lambda *a, **k: calls.append(a[1].shape[1]) or original(*a, **k))
    handle = adapters.accelerate(model.text_encoder, clip_model)
    got, got_grad = _encoded(model)
    assert calls == [1 + model.prompt_learner.n_ctx]  # [SOS] + the shared context ran once
    if prec == "fp32":
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-4)
    else:  # fp16 sums the classes' gradients in another order: compare relative to the whole tensor
        torch.testing.assert_close(got.float(), want.float(), atol=3e-3, rtol=3e-3)
        error = (got_grad.float() - want_grad.float()).norm() / want_grad.float().norm()
        assert error < 1e-2, error
    handle.remove()
    assert "forward" not in model.text_encoder.__dict__
    again, _ = _encoded(model)
    torch.testing.assert_close(again, want, rtol=0, atol=0)


def test_cocoop_per_image_context_and_anchoropt_shim_together():
    cfg = pf.make_cfg("cocoop")
    clip_model = pf.tiny_clip()
    model = pf.build_model("cocoop", cfg, pf.BASE, clip_model)[0]
    handle = adapters.cocoop.wrap(model.prompt_learner, clip_model=clip_model, classnames=pf.BASE,
                                  anchors=torch.randn(1, clip_model.token_embedding.weight.shape[1]) * 0.02,
                                  owner=model)
    model.eval()
    images = pf.images()
    with torch.no_grad():
        want = model(images)
        fast = adapters.accelerate(model.text_encoder, clip_model)
        got = model(images)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    fast.remove()
    handle.remove()


def test_class_specific_context_shares_only_sos():
    prompts = torch.randn(3, 10, 4)
    prompts[:, 0] = prompts[0, 0]
    assert shared_prefix_length(prompts, 8) == 1
    prompts[:, 1:3] = prompts[0, 1:3]
    assert shared_prefix_length(prompts, 8) == 3
    assert shared_prefix_length(prompts, 2) == 2


def test_other_protocols_go_to_the_original_forward():
    clip_model = pf.tiny_clip()
    encoder = pf.TextEncoder(clip_model)
    seen = []
    encoder.forward = lambda *args: seen.append(len(args)) or torch.zeros(1)  # stands for MaPLe's 3-arg forward
    handle = adapters.accelerate(encoder, clip_model)
    handle.forward(torch.zeros(2, 77, 4), torch.zeros(2, 77, dtype=torch.long), ["deep prompts"])
    assert seen == [3]


def test_refuses_a_text_encoder_of_another_model():
    with pytest.raises(ValueError, match="does not run this CLIP model's transformer"):
        adapters.accelerate(pf.TextEncoder(pf.tiny_clip(seed=1)), pf.tiny_clip(seed=2))


# ---------------------------------------------------------------------- every method x precision, with / without the shims
SHIMS = {"coop": adapters.coop, "cocoop": adapters.cocoop, "maple": adapters.maple, "dept": adapters.dept}
TOLERANCE = {"fp32": 1e-5, "amp": 1e-5, "fp16": 3e-2}  # ||got - want|| / ||want|| per tensor
# MaPLe casts these with .half() inside its own forward (compound prompts in its text blocks, proj(ctx) - so ctx
# too - and the deep visual prompts in its vision tower), so their gradients are rounded to fp16 by MaPLe itself:
# an fp32 round-off upstream can move an element by one fp16 step (2^-11 relative).  The text encoder alone is
# checked at 1e-5 in test_maple_text_encoder_features_and_input_gradients.
MAPLE_FP16_ROUNDED = ("compound_prompts_text", "prompt_learner.proj.", "compound_prompt_projections", "prompt_learner.ctx")
LABELS = torch.tensor([0, 3])


def _peer_model(method, prec, shim):
    """A contract-fake model of ``method`` as its trainer builds it; with the AnchorOPT shim (KD on) or without."""
    maple_like = method == "maple"
    clip_model = pf.tiny_maple_clip(prec, n_ctx=2) if maple_like else pf.tiny_clip(prec)
    cfg = pf.make_cfg(method, n_ctx=2 if maple_like else 4, prec=prec, depth=3)
    namespace = pf.coop if method == "dept" else pf.NAMESPACES[method]  # DePT's ELP inherits trainers.coop
    if not shim:
        model = pf.build_model(method, cfg, pf.BASE, clip_model)[0]
        if maple_like:
            model.prompt_learner.proj.to(model.prompt_learner.ctx.dtype)  # MaPLe's proj.half(), fixed by hand
        return model, clip_model, None
    with SHIMS[method].patch(namespace, anchors=pf.word_embedding(clip_model, "a")[:1], kd_weight=1.0):
        model = pf.build_model(method, cfg, pf.BASE, clip_model)[0]
    return model, clip_model, adapters.find(model)


def _train_pass(model, method, h, prec):
    """One training forward + backward as the trainer runs it; text features of every text pass, grads."""
    torch.manual_seed(0)  # the same Gumbel sample for both contenders
    model.train()
    model.zero_grad(set_to_none=True)
    seen = []
    hook = model.text_encoder.register_forward_hook(lambda m, a, out: seen.append(out.detach().float()))
    with torch.autocast("cuda", enabled=prec == "amp" and torch.cuda.is_available()):  # torch.cuda.amp.autocast
        if method == "coop":
            logits = model(pf.images(2))
            loss = h.loss(LABELS, logits=logits) if h else torch.nn.functional.cross_entropy(logits, LABELS)
        else:
            out = model(pf.images(2), LABELS)
            loss = h.loss(LABELS, base_loss=out) if h else out
    loss.backward()
    hook.remove()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), seen, grads


def _close(got, want, tol, what):
    error = float((got - want).norm() / want.norm().clamp_min(1e-30))
    assert error <= tol, f"{what}: relative error {error:.2e} > {tol:.0e}"


@pytest.mark.parametrize("shim", [False, True], ids=["peer", "anchoropt"])
@pytest.mark.parametrize("prec", ["fp32", "fp16", "amp"])
@pytest.mark.parametrize("method", ["coop", "cocoop", "maple", "dept"])
def test_accelerate_is_exact_for_every_method(method, prec, shim):
    model, clip_model, h = _peer_model(method, prec, shim)
    want_loss, want_text, want_grads = _train_pass(model, method, h, prec)
    fast = adapters.accelerate(model.text_encoder, clip_model)
    fallbacks, shared = [], []
    original = fast._original
    fast._original = lambda *a, **k: fallbacks.append(1) or original(*a, **k)
    encode_shared = fast.tower.encode_shared
    fast.tower.encode_shared = lambda *a, **k: shared.append(a[0].shape[0]) or encode_shared(*a, **k)
    got_loss, got_text, got_grads = _train_pass(model, method, h, prec)
    assert not fallbacks  # every text pass ran on the fast path
    if method == "cocoop":
        assert shared == [2]  # both images' prompts in one pass: per-image prefixes (G=2)
    elif method in ("coop", "dept"):
        assert shared == [1]
    tol = TOLERANCE[prec]
    assert len(got_text) == len(want_text) == (2 if method == "cocoop" else 1)
    for got, want in zip(got_text, want_text):
        _close(got, want, tol, "text features")
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        rounded = method == "maple" and prec != "fp16" and any(part in name for part in MAPLE_FP16_ROUNDED)
        _close(got_grads[name], want_grads[name], 2e-3 if rounded else tol, f"gradient of {name}")
    if method == "cocoop":
        assert want_grads["prompt_learner.meta_net.linear1.weight"].abs().sum() > 0
    assert abs(got_loss - want_loss) <= tol * abs(want_loss)
    fast.remove()
    model.eval()
    with torch.no_grad():  # evaluation (and the shims' novel-class ensemble) on the fast path too
        want = model(pf.images(2))
        with adapters.accelerate(model.text_encoder, clip_model):
            got = model(pf.images(2))
            if h is not None:
                _close(h.set_mode("novel").predict(got), h.predict(want), TOLERANCE[prec] * 10, "novel logits")
    _close(got.float(), want.float(), TOLERANCE[prec] * 10, "eval logits")


def test_cocoop_rows_of_another_batch_are_not_served_from_the_cache():
    model, clip_model, _ = _peer_model("cocoop", "fp32", shim=False)
    model.eval()
    fast = adapters.accelerate(model.text_encoder, clip_model)
    with torch.no_grad():
        prompts = model.prompt_learner(torch.randn(3, 32))
        first = model.text_encoder(prompts[0], model.tokenized_prompts)
        other = model.prompt_learner(torch.randn(3, 32))
        again = model.text_encoder(other[0], model.tokenized_prompts)
        fast.remove()
        torch.testing.assert_close(again, model.text_encoder(other[0], model.tokenized_prompts), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(first, again)
        copy = prompts[1].clone()  # not a row of a batch: encoded on its own
    with torch.no_grad(), adapters.accelerate(model.text_encoder, clip_model):
        torch.testing.assert_close(model.text_encoder(copy, model.tokenized_prompts),
                                   model.text_encoder(prompts[1], model.tokenized_prompts), atol=1e-5, rtol=1e-4)


def test_without_accelerate_capture_still_comes_from_ln_final():
    model, clip_model, h = _peer_model("cocoop", "fp32", shim=True)
    _train_pass(model, "cocoop", h, "fp32")
    assert len(h._text_features) == 2  # one per image, from the ln_final hook


@pytest.mark.parametrize("shim", [False, True], ids=["peer", "anchoropt-deep"])
def test_maple_text_encoder_features_and_input_gradients(shim):
    """MaPLe's TextEncoder alone, fp32: features and the gradient to its input prompts within 1e-5; the compound
    prompts' gradients (fp16-rounded by MaPLe's blocks) within one fp16 step."""
    model, clip_model, h = _peer_model("maple", "fp32", shim)
    model.train()
    torch.manual_seed(0)
    prompts, _, compound, _ = model.prompt_learner()  # with the shim: arranged, deep hooks armed for one pass
    prompts = prompts.detach().requires_grad_()
    if h is not None:
        h.last_matrix = h.last_matrix.detach()  # the sample both passes use (its own graph is not under test)
    weights = torch.randn(len(pf.BASE), 32)

    def run():
        if h is not None:
            h.after_rewrite()  # re-arm the deep hooks for this pass, with the same position-matrix sample
        for p in [prompts, *compound]:
            p.grad = None
        features = model.text_encoder(prompts, model.tokenized_prompts, compound)
        (features * weights).sum().backward()
        return features.detach(), prompts.grad.clone(), [p.grad.clone() for p in compound]

    want = run()
    with adapters.accelerate(model.text_encoder, clip_model) as fast:
        fast._original = None  # no fallback allowed
        got = run()
    _close(got[0], want[0], 1e-5, "features")
    _close(got[1], want[1], 1e-5, "gradient of the input prompts")
    for g, w in zip(got[2], want[2]):
        _close(g, w, 2e-3, "gradient of a compound prompt")
        assert g.abs().sum() > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="documents the CPU behaviour of the peers' amp")
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_peers_amp_on_cpu_trains_in_fp32():
    """The peers' amp is torch.cuda.amp.autocast + GradScaler: both switch themselves off without CUDA, so PREC amp
    on a CPU is the fp32 run (documented in docs/integrations)."""
    model, clip_model, h = _peer_model("coop", "amp", shim=True)
    with adapters.accelerate(model.text_encoder, clip_model), torch.cuda.amp.autocast():
        features = model.text_encoder(model.prompt_learner(), model.tokenized_prompts)
        logits = model(pf.images(2))
    assert features.dtype == torch.float32 and logits.dtype == torch.float32
    assert not torch.cuda.amp.GradScaler().is_enabled()
