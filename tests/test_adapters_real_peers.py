"""Opt-in: the shims against the peers' real code (not shipped, not run in CI).

Set ``ANCHOROPT_PEERS_DIR`` to a folder holding checkouts named ``CoOp`` (KaiyangZhou/CoOp),
``multimodal-prompt-learning`` (MaPLe), ``DePT`` (Koorye/DePT) and/or ``Dassl.pytorch`` (only its
``dassl/optim/lr_scheduler.py`` is read, for the documented torch fix); each missing checkout skips its tests.
Dassl is not needed: when it is not importable, the few names the trainer modules import are stubbed (the
tests build ``CustomCLIP`` directly, as ``build_model`` does, from a tiny random CLIP made with the repo's own
``clip.model.CLIP`` and ``build_model`` - fp16 conversion included); ``plotnine`` (imported unused by DePT's
trainers) is stubbed when it is not installed, with or without a real Dassl.  Needs torchvision (the vendored
``clip.py`` imports it).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
import types
from pathlib import Path

import pytest
import torch

import peer_fakes as pf
from anchoropt.adapters import cocoop, coop, dept, find, maple

PEERS = os.environ.get("ANCHOROPT_PEERS_DIR")
pytestmark = [
    pytest.mark.skipif(not PEERS, reason="set ANCHOROPT_PEERS_DIR to a folder with CoOp / MaPLe / DePT checkouts"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
]

_TOP_LEVEL = ("clip", "clip_maple", "trainers", "utils", "datasets", "dassl", "plotnine")


def _dassl_stubs() -> dict[str, types.ModuleType]:
    """Just the names the trainer modules import at the top (peer_interfaces.md §9)."""

    class _Registry:
        def register(self, *args, **kwargs):
            return lambda cls: cls

    class _Trainer:
        pass

    def _unused(*args, **kwargs):
        raise RuntimeError("Dassl stub: not available in this test")

    names = {
        "dassl": {},
        "dassl.engine": {"TRAINER_REGISTRY": _Registry(), "TrainerX": _Trainer},
        "dassl.engine.trainer": {"TrainerX": _Trainer, "MetricMeter": object, "AverageMeter": object,
                                 "SummaryWriter": object},
        "dassl.metrics": {"compute_accuracy": _unused},
        "dassl.utils": {"load_pretrained_weights": _unused, "load_checkpoint": _unused},
        "dassl.utils.tools": {"mkdir_if_missing": lambda path: None},
        "dassl.optim": {"build_optimizer": _unused, "build_lr_scheduler": _unused},
        "dassl.optim.radam": {"RAdam": torch.optim.RAdam},
        "dassl.config": {"get_cfg_default": _unused, "clean_cfg": _unused},
    }
    modules = {}
    for name, members in names.items():
        module = types.ModuleType(name)
        module.__dict__.update(members)
        module.__path__ = []  # a package, so submodules resolve
        modules[name] = module
    return modules


def _stubs(have_dassl: bool, have_plotnine: bool) -> dict[str, types.ModuleType]:
    """Stand-ins for what is not installed: Dassl's names, and ``plotnine`` (DePT's trainers import it, unused) -
    the latter also when a real Dassl is on the path."""
    stubs = {} if have_dassl else _dassl_stubs()
    if not have_plotnine:
        stubs["plotnine"] = types.ModuleType("plotnine")
    return stubs


def test_plotnine_is_stubbed_also_next_to_a_real_dassl() -> None:
    assert "plotnine" in _stubs(have_dassl=True, have_plotnine=False)
    assert "dassl.engine" not in _stubs(have_dassl=True, have_plotnine=False)
    assert "plotnine" not in _stubs(have_dassl=False, have_plotnine=True)


@contextlib.contextmanager
def peer_repo(name: str):
    """Import from the checkout ``$ANCHOROPT_PEERS_DIR/<name>`` with its own ``clip`` / ``trainers`` packages."""
    root = Path(PEERS) / name
    if not (root / "trainers").is_dir():
        pytest.skip(f"no {name} checkout at {root}")
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in _TOP_LEVEL}
    sys.modules.update(_stubs(importlib.util.find_spec("dassl") is not None,
                              importlib.util.find_spec("plotnine") is not None))
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for key in [k for k in sys.modules if k.split(".")[0] in _TOP_LEVEL]:
            del sys.modules[key]
        sys.modules.update(saved)


def _tiny_clip(design_details: dict | None = None, prec: str = "fp32"):
    """The repo's CLIP class with tiny sizes, through the repo's build_model (fp16), like load_clip_to_cpu."""
    model_module = importlib.import_module("clip.model")
    maple_sizes = design_details is not None  # MaPLe hard-codes text 512 / vision 768
    sizes = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=768 if maple_sizes else 64,
                 vision_patch_size=16, context_length=77, vocab_size=49408,
                 transformer_width=512 if maple_sizes else 64, transformer_heads=8 if maple_sizes else 1,
                 transformer_layers=3 if maple_sizes else 2)
    torch.manual_seed(0)
    if design_details is None:
        state = model_module.CLIP(**sizes).state_dict()
        clip_model = model_module.build_model(state)
    else:
        state = model_module.CLIP(**sizes, design_details=design_details).state_dict()
        clip_model = model_module.build_model(state, design_details)
    return clip_model.float() if prec in ("fp32", "amp") else clip_model


def _anchor(clip_model, word="a"):
    return pf.word_embedding(clip_model, word)[:1]


@pytest.mark.parametrize("prec", ["fp32", "fp16"])
def test_real_coop(prec) -> None:
    with peer_repo("CoOp"):
        trainers_coop = importlib.import_module("trainers.coop")
        tokenize = importlib.import_module("clip.clip").tokenize
        clip_model = _tiny_clip(prec=prec)
        cfg = pf.make_cfg("coop", ctx_init="a photo of", prec=prec)
        model = trainers_coop.CustomCLIP(cfg, pf.BASE, clip_model).eval()
        with torch.no_grad():
            original = model(pf.images(2))
        h = coop.wrap(model.prompt_learner, clip_model=clip_model, classnames=pf.BASE, anchors=_anchor(clip_model),
                      owner=model, arrangement="anchor_after")
        assert model.tokenized_prompts is model.prompt_learner.tokenized_prompts
        with torch.no_grad():  # the prompt is "a photo of a {class}.": pooling at the true EOT
            ours = model.text_encoder(model.prompt_learner(), model.tokenized_prompts)
            real = clip_model.encode_text(tokenize([f"a photo of a {c.replace('_', ' ')}." for c in pf.BASE]))
        torch.testing.assert_close(ours.float(), real.float(), atol=1e-2 if prec == "fp16" else 1e-5, rtol=1e-3)
        h.remove()
        with torch.no_grad():
            assert torch.equal(model(pf.images(2)), original)  # the real CoOp's outputs, exactly

        with coop.patch(trainers_coop, anchors=_anchor(clip_model)):  # learned arrangement, class-level patch
            model = trainers_coop.CustomCLIP(cfg, pf.BASE, clip_model)
        h = find(model)
        model.train()
        optim = torch.optim.SGD(model.prompt_learner.parameters(), lr=0.002)  # CoOp's optimizer construction
        loss = h.loss(torch.tensor([0, 3]), logits=model(pf.images(2)))
        loss.backward()
        optim.step()
        assert torch.isfinite(loss) and h.position.logits.grad.abs().sum() > 0


def test_real_cocoop() -> None:
    with peer_repo("CoOp"):
        trainers_cocoop = importlib.import_module("trainers.cocoop")
        clip_model = _tiny_clip()
        with cocoop.patch(trainers_cocoop, anchors=_anchor(clip_model)):
            model = trainers_cocoop.CustomCLIP(pf.make_cfg("cocoop"), pf.BASE, clip_model)
        h = find(model)
        model.train()
        labels = torch.tensor([0, 3])
        loss = h.loss(labels, base_loss=model(pf.images(2), labels))
        loss.backward()
        for p in (model.prompt_learner.ctx, model.prompt_learner.meta_net.linear1.weight, h.position.logits):
            assert p.grad is not None and p.grad.abs().sum() > 0
        model.eval()
        with torch.no_grad():
            logits = model(pf.images(2))
            torch.testing.assert_close(h.normal_logits(), logits.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:MaPLe PROMPT_DEPTH")
def test_real_maple_fp32_with_deep_anchors() -> None:
    with peer_repo("multimodal-prompt-learning"):
        trainers_maple = importlib.import_module("trainers.maple")
        n_ctx = 2
        details = {"trainer": "MaPLe", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0,
                   "language_ctx": 0, "maple_length": n_ctx}
        clip_model = _tiny_clip(details, prec="fp32")
        cfg = pf.make_cfg("maple", n_ctx=n_ctx, depth=3)
        with maple.patch(trainers_maple, anchors=_anchor(clip_model)):
            model = trainers_maple.CustomCLIP(cfg, pf.BASE, clip_model)
        h = find(model)
        assert h.deep and model.prompt_learner.proj.weight.dtype == torch.float32  # MaPLe's proj.half() survived
        model.train()
        labels = torch.tensor([1, 2])
        loss = h.loss(labels, base_loss=model(pf.images(2), labels))
        loss.backward()
        assert torch.isfinite(loss) and h.position.logits.grad is not None
        model.eval()
        with torch.no_grad():
            logits = h.set_mode("novel").predict(model(pf.images(2)))
        assert logits.shape == (2, len(pf.BASE)) and torch.isfinite(logits).all()


def test_real_dept_elp_coop() -> None:
    with peer_repo("DePT"):
        coop_module = importlib.import_module("trainers.coop")
        elp = importlib.import_module("trainers.elp_coop")
        clip_model = _tiny_clip()
        with dept.patch(coop_module, anchors=_anchor(clip_model)):
            model = elp.CustomCLIP(pf.make_cfg("dept"), pf.BASE, clip_model)
        h = find(model)
        model.train()
        labels = torch.tensor([0, 1])
        dept_loss = model(pf.images(2), labels)
        loss = h.loss(labels, base_loss=dept_loss)
        assert torch.equal(loss, dept_loss.float())  # no KD: DePT's own loss
        loss.backward()
        assert h.position.logits.grad is not None and model.linear_probe_proj.weight.grad is not None
        novel = None
        with dept.patch(coop_module, anchors=_anchor(clip_model)):
            novel = elp.CustomCLIP(pf.make_cfg("dept", subsample="new"), pf.NOVEL, clip_model)
        hn = find(novel)
        novel.eval()
        with torch.no_grad():
            similarity = novel(pf.images(2))
            torch.testing.assert_close(hn.predict(similarity), (similarity.float() + hn.anchor_logits()) / 2)


def _real_maple(depth: int = 3, n_ctx: int = 2):
    """A tiny real MaPLe CustomCLIP (fp32) with the AnchorOPT shim; call inside ``peer_repo``."""
    trainers_maple = importlib.import_module("trainers.maple")
    details = {"trainer": "MaPLe", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0,
               "language_ctx": 0, "maple_length": n_ctx}
    clip_model = _tiny_clip(details, prec="fp32")
    with maple.patch(trainers_maple, anchors=_anchor(clip_model), arrangement="anchor_after"):
        model = trainers_maple.CustomCLIP(pf.make_cfg("maple", n_ctx=n_ctx, depth=depth), pf.BASE, clip_model)
    return model, clip_model


def test_real_maple_bare_learner_call_and_fp16_rounded_compound_prompts() -> None:
    with peer_repo("multimodal-prompt-learning"):
        model, clip_model = _real_maple()
        tower = maple.ListProtocolTextTower(clip_model)
        ids = importlib.import_module("clip.clip").tokenize(["a photo of a dog.", "a cat."])
        seen = {}
        block = model.text_encoder.transformer.resblocks[1]
        probe = block.ln_1.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone()))
        model.eval()
        with torch.no_grad():
            want = tower.encode_text(ids)
            model.prompt_learner()  # a bare call: the next unrelated pass must not be touched
            torch.testing.assert_close(tower.encode_text(ids), want, rtol=0, atol=0)
            model(pf.images(2))
        probe.remove()
        compound = model.prompt_learner.compound_prompts_text[0]  # the slots after the anchor_after arrangement
        x = seen["x"]  # (L, C, D) block 1's input after its own overwrite was suppressed: ours
        expected = compound.half().float()[:, None].expand(-1, x.shape[1], -1)  # rows 1..n_ctx, rounded
        torch.testing.assert_close(x[1:3], expected, rtol=0, atol=0)
        assert not torch.equal(compound.half().float(), compound)


def _train_with_and_without_accelerate(model, clip_model, run):
    """``run()`` -> (loss, {name: grad}) on the real model, then again after ``accelerate``; both results."""
    from anchoropt.adapters import accelerate

    def once():
        torch.manual_seed(0)  # the same Gumbel sample both times
        model.zero_grad(set_to_none=True)
        loss = run()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    want = once()
    handle = accelerate(model.text_encoder, clip_model)
    handle._original = None  # the fast path must take every call
    got = once()
    handle.remove()
    return want, got


def _assert_same(want, got, tol=1e-5, loose=()):
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=0)
    assert got[1].keys() == want[1].keys()
    for name, grad in want[1].items():
        bound = 2e-3 if any(part in name for part in loose) else tol
        error = float((got[1][name] - grad).norm() / grad.norm())
        assert error <= bound, (name, error)


def test_real_cocoop_and_dept_kd_with_the_shims_on_accelerate() -> None:
    labels = torch.tensor([0, 3])
    with peer_repo("CoOp"):
        trainers_cocoop = importlib.import_module("trainers.cocoop")
        clip_model = _tiny_clip()
        with cocoop.patch(trainers_cocoop, anchors=_anchor(clip_model)):
            model = trainers_cocoop.CustomCLIP(pf.make_cfg("cocoop"), pf.BASE, clip_model)
        h = find(model)
        want, got = _train_with_and_without_accelerate(
            model, clip_model, lambda: h.loss(labels, base_loss=model(pf.images(2), labels)))
        _assert_same(want, got)
        assert want[1]["prompt_learner.meta_net.linear1.weight"].abs().sum() > 0
    with peer_repo("DePT"):
        coop_module = importlib.import_module("trainers.coop")
        elp = importlib.import_module("trainers.elp_coop")
        clip_model = _tiny_clip()
        with dept.patch(coop_module, anchors=_anchor(clip_model), kd_weight=1.0):
            model = elp.CustomCLIP(pf.make_cfg("dept"), pf.BASE, clip_model)
        h = find(model)
        want, got = _train_with_and_without_accelerate(
            model, clip_model, lambda: h.loss(labels, base_loss=model(pf.images(2), labels)))
        _assert_same(want, got)


def test_real_coop_and_maple_on_accelerate() -> None:
    labels = torch.tensor([1, 2])
    with peer_repo("CoOp"):
        trainers_coop = importlib.import_module("trainers.coop")
        clip_model = _tiny_clip()
        model = trainers_coop.CustomCLIP(pf.make_cfg("coop"), pf.BASE, clip_model)
        want, got = _train_with_and_without_accelerate(
            model, clip_model, lambda: torch.nn.functional.cross_entropy(model(pf.images(2)), labels))
        _assert_same(want, got)
    with peer_repo("multimodal-prompt-learning"):
        model, clip_model = _real_maple()
        h = find(model)
        want, got = _train_with_and_without_accelerate(
            model, clip_model, lambda: h.loss(labels, base_loss=model(pf.images(2), labels)))
        # MaPLe's own .half() casts round these gradients to fp16 (see test_adapters_fast_text.py)
        _assert_same(want, got, loose=("compound_prompts_text", "prompt_learner.proj.",
                                       "compound_prompt_projections", "prompt_learner.ctx"))


def test_real_coop_csc_reload_for_other_classes_names_csc() -> None:
    with peer_repo("CoOp"):
        trainers_coop = importlib.import_module("trainers.coop")
        clip_model = _tiny_clip()
        with coop.patch(trainers_coop, anchors=_anchor(clip_model)):
            base = trainers_coop.CustomCLIP(pf.make_cfg("coop", csc=True), pf.BASE, clip_model)
            novel = trainers_coop.CustomCLIP(pf.make_cfg("coop", csc=True, subsample="new"), pf.NOVEL, clip_model)
        state = base.prompt_learner.state_dict()
        for key in ("token_prefix", "token_suffix"):  # as CoOp's load_model does
            del state[key]
        with pytest.raises(ValueError, match="CSC=True"):
            novel.prompt_learner.load_state_dict(state, strict=False)


def test_documented_dassl_scheduler_fix_on_this_torch() -> None:
    """docs/integrations: Dassl's warm-up scheduler passes ``verbose`` to torch's LRScheduler, which no longer takes
    it; the one-line fix the docs give makes it build (needs ``$ANCHOROPT_PEERS_DIR/Dassl.pytorch``)."""
    path = Path(PEERS) / "Dassl.pytorch" / "dassl" / "optim" / "lr_scheduler.py"
    if not path.is_file():
        pytest.skip(f"no Dassl.pytorch checkout at {path.parents[2]}")
    source = path.read_text(encoding="utf-8")
    broken, fixed = "super().__init__(optimizer, last_epoch, verbose)", "super().__init__(optimizer, last_epoch)"
    assert broken in source  # the line the docs' diff removes

    def warmup_scheduler(text: str):
        module = types.ModuleType("dassl_lr_scheduler")
        exec(compile(text, str(path), "exec"), module.__dict__)  # the user's own checkout, as the trainers import it
        optim = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.002)
        successor = torch.optim.lr_scheduler.CosineAnnealingLR(optim, 10)
        return module.ConstantWarmupScheduler(optim, successor, 1, 1e-5)

    if "verbose" not in inspect.signature(torch.optim.lr_scheduler.LRScheduler.__init__).parameters:
        with pytest.raises(TypeError, match="positional arguments"):
            warmup_scheduler(source)
    scheduler = warmup_scheduler(source.replace(broken, fixed))
    assert scheduler.get_last_lr() == [1e-5]
