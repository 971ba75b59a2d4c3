"""Opt-in: the method modules' logits against the peers' real code for the same weights (not shipped, not run in CI).

``ANCHOROPT_PEERS_DIR`` as for ``test_adapters_real_peers.py`` (checkouts ``CoOp``, ``multimodal-prompt-learning``,
``DePT``; each missing one skips its test).  CoCoOp and DePT run on the repo's own tiny OpenAI-layout CLIP (built
through its ``build_model``, fp16 conversion included, then ``.float()``); MaPLe's real model is a MaPLe-built CLIP
(text 512 / vision 768 wide, as MaPLe hard-codes) and ours an open_clip ``CLIP`` holding the same weights.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import peer_fakes as pf
from anchoropt import testing
from anchoropt.methods import CoCoOp, DePT, MaPLe
from test_adapters_real_peers import PEERS, _tiny_clip, peer_repo

pytestmark = [
    pytest.mark.skipif(not PEERS, reason="set ANCHOROPT_PEERS_DIR to a folder with CoOp / MaPLe / DePT checkouts"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
]
B = 2


def test_real_cocoop_logits() -> None:
    with peer_repo("CoOp"):
        trainers_cocoop = importlib.import_module("trainers.cocoop")
        tokenize = importlib.import_module("clip.clip").tokenize
        clip_model = _tiny_clip().requires_grad_(False)
        peer = trainers_cocoop.CustomCLIP(pf.make_cfg("cocoop", n_ctx=4), pf.BASE, clip_model).eval()
        ours = CoCoOp(clip_model, pf.BASE, n_ctx=4, tokenizer=tokenize).eval()
        with torch.no_grad():
            ours.text.ctx.copy_(peer.prompt_learner.ctx.float())
            ours.meta_net.load_state_dict(peer.prompt_learner.meta_net.state_dict())
            expected = peer(pf.images(B))
            logits, _ = ours(clip_model.visual(pf.images(B)))
        torch.testing.assert_close(logits, expected.float(), atol=1e-4, rtol=1e-4)


def test_real_dept_logits_and_loss() -> None:
    with peer_repo("DePT"):
        elp = importlib.import_module("trainers.elp_coop")
        tokenize = importlib.import_module("clip.clip").tokenize
        clip_model = _tiny_clip().requires_grad_(False)
        peer = elp.CustomCLIP(pf.make_cfg("dept", n_ctx=4), pf.BASE, clip_model)
        ours = DePT(clip_model, pf.BASE, n_ctx=4, tokenizer=tokenize)
        with torch.no_grad():
            ours.text.ctx.copy_(peer.prompt_learner.ctx.float())
            for p in (*peer.film_lp_img.parameters(), *peer.linear_probe_proj.parameters()):
                p.add_(torch.randn_like(p) * 0.3)  # a trained-looking head
            for name in ("film_lp_img", "film_lp_text", "linear_probe_proj"):
                getattr(ours, name).load_state_dict(getattr(peer, name).state_dict())
        images, labels = pf.images(B), torch.tensor([0, 3])
        feats = clip_model.visual(images).detach()
        peer.eval(), ours.eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(feats)[0], peer(images).float(), atol=1e-4, rtol=1e-4)
        peer.train(), ours.train()
        torch.testing.assert_close(ours.loss(feats, labels), peer(images, labels).float(), atol=1e-5, rtol=1e-5)


def _real_and_native_maple(ctx_init: str, fp16_prompts: bool):
    """Real MaPLe (fp32) and native :class:`MaPLe` holding the same, **not** fp16-exact, weights."""
    trainers_maple = importlib.import_module("trainers.maple")
    tokenize = importlib.import_module("clip.clip").tokenize
    n_ctx, depth = 2, 2
    details = {"trainer": "MaPLe", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0,
               "language_ctx": 0, "maple_length": n_ctx}
    maple_clip = _tiny_clip(details, prec="fp32").requires_grad_(False)
    cfg = pf.make_cfg("maple", n_ctx=n_ctx, depth=depth, ctx_init=ctx_init)
    peer = trainers_maple.CustomCLIP(cfg, pf.BASE, maple_clip).eval()
    learner = peer.prompt_learner
    learner.proj.float()  # MaPLe's unconditional proj.half() fails in fp32
    model = _open_clip_like(maple_clip)
    ours = MaPLe(model, pf.BASE, n_ctx=n_ctx, prompt_depth=depth, tokenizer=tokenize, ctx_init=ctx_init or None,
                 fp16_prompts=fp16_prompts).eval()
    if ctx_init:  # the same initial context: the token embeddings of "a photo"
        torch.testing.assert_close(ours.text.ctx, learner.ctx.float(), atol=0, rtol=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking values, not representable in fp16 (biases too)
        for p in (learner.ctx, learner.compound_prompts_text[0], learner.proj.weight, learner.proj.bias,
                  learner.compound_prompt_projections[0].weight, learner.compound_prompt_projections[0].bias):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        assert (learner.ctx.half().float() != learner.ctx).any()
        ours.text.ctx.copy_(learner.ctx)
        ours.text.deep_prompts[0].copy_(learner.compound_prompts_text[0])
        ours.proj.load_state_dict(learner.proj.state_dict())
        ours.compound_prompt_projections[0].load_state_dict(learner.compound_prompt_projections[0].state_dict())
    pairs = [(ours.text.ctx, learner.ctx), (ours.text.deep_prompts, learner.compound_prompts_text[0]),
             (ours.proj.weight, learner.proj.weight), (ours.proj.bias, learner.proj.bias),
             (ours.compound_prompt_projections[0].weight, learner.compound_prompt_projections[0].weight),
             (ours.compound_prompt_projections[0].bias, learner.compound_prompt_projections[0].bias)]
    return peer, ours, pairs


def _logits_and_grads(peer, ours, pairs):
    """Both models' logits and the gradients of one CE loss, paired per parameter."""
    images, labels = pf.images(B), torch.tensor([0, 3])
    expected = peer(images)
    logits, _ = ours(images)
    torch.nn.functional.cross_entropy(expected.float(), labels).backward()
    torch.nn.functional.cross_entropy(logits, labels).backward()
    grads = [(a.grad.reshape(b.grad.shape), b.grad.float()) for a, b in pairs]
    return logits.detach(), expected.detach().float(), grads


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _not_close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of elements off by more than fp32 noise (1e-5 of the largest)."""
    return float(((a - b).abs() > 1e-5 * b.abs().max()).float().mean())


@pytest.mark.parametrize("ctx_init", ["", "a photo of a"], ids=["random-ctx", "released-ctx-init"])
def test_real_maple_logits_and_grads(ctx_init: str) -> None:
    """Native MaPLe with ``fp16_prompts=True`` is real MaPLe (fp32) on values that are not fp16-exact; also with
    MaPLe's released CTX_INIT (the context replaces "a photo", "of a" stays as fixed words).

    Logits agree to fp32 noise.  Gradients: MaPLe rounds every injected copy's gradient to fp16 as well, so a copy
    whose fp32 gradient lies within fp32 noise of an fp16 rounding boundary rounds the other way in one of the two
    (one fp16 step): a few percent of the elements; all the others agree to fp32 noise.  Without the switch most
    elements differ (the next test)."""
    with peer_repo("multimodal-prompt-learning"):
        peer, ours, pairs = _real_and_native_maple(ctx_init, fp16_prompts=True)
        logits, expected, grads = _logits_and_grads(peer, ours, pairs)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    ctx_grad, peer_ctx_grad = grads[0]
    assert _relative(ctx_grad, peer_ctx_grad) < 2e-5  # the layer-0 context is not rounded (but feeds proj)
    for ours_grad, peer_grad in grads[1:]:
        assert _not_close(ours_grad, peer_grad) < 0.05
        assert float((ours_grad - peer_grad).norm() / peer_grad.norm()) < 1.2e-4


def test_real_maple_without_fp16_prompts_differs() -> None:
    """Our default (no rounding) is measurably not the release: the switch is what makes them equal."""
    with peer_repo("multimodal-prompt-learning"):
        peer, ours, pairs = _real_and_native_maple("", fp16_prompts=False)
        logits, expected, grads = _logits_and_grads(peer, ours, pairs)
    assert 1e-5 < _relative(logits, expected) < 1e-3, _relative(logits, expected)
    assert _relative(*grads[0]) > 5e-5
    for ours_grad, peer_grad in grads[1:]:
        assert _not_close(ours_grad, peer_grad) > 0.3


def _open_clip_like(maple_clip) -> torch.nn.Module:
    """An open_clip ``CLIP`` with the MaPLe-built CLIP's sizes and weights (OpenAI parameter names in both)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=2, width=768, head_width=64, patch_size=16, image_size=32)
    text = CLIPTextCfg(context_length=77, vocab_size=testing.VOCAB_SIZE, width=512, heads=8, layers=3)
    model = open_clip.CLIP(32, vision, text, quick_gelu=True).eval()
    missing, unexpected = model.load_state_dict(maple_clip.state_dict(), strict=False)
    assert not missing and not [k for k in unexpected if "VPT" not in k], (missing, unexpected)
    return model.requires_grad_(False)
