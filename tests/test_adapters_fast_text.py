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
