"""Released behaviours one switch away (issue 20 item 6): MaPLe's fp16 rounding of its injected prompts, Dassl's
``drop_last`` training loader, PAE's per-pair Lyapunov factor, MPA's zero-prompt ranking.  Defaults stay ours."""

from __future__ import annotations

import pytest
import torch

import peer_fakes as pf
from anchoropt import testing
from anchoropt.methods import MaPLe

M, B = 2, 3


# ---------------------------------------------------------------------- MaPLe: fp16_prompts
def _maple_pair(fp16_prompts: bool):
    """The fake peer's MaPLe (rounds its injected prompts with ``.half()``, as the release) and ours, holding the
    same weights, none of them fp16-exact."""
    model = testing.tiny_open_clip(width=64, layers=3, heads=2, embed_dim=32, vision_layers=2).requires_grad_(False)
    fake = pf.MaPLeCLIP(width=64, layers=3, heads=2, embed_dim=32, image_size=32, vision_width=64, n_ctx=M).eval()
    fake.load_state_dict(model.state_dict())
    peer = pf.maple.CustomCLIP(pf.make_cfg("maple", n_ctx=M, depth=2), pf.BASE, fake).eval()
    learner = peer.prompt_learner
    learner.proj.float()
    ours = MaPLe(model, pf.BASE, n_ctx=M, prompt_depth=2, tokenizer=pf.tokenize, fp16_prompts=fp16_prompts).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (learner.ctx, learner.compound_prompts_text[0], *learner.proj.parameters(),
                  *learner.compound_prompt_projections[0].parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        assert not torch.equal(learner.compound_prompts_text[0].half().float(), learner.compound_prompts_text[0])
        ours.text.ctx.copy_(learner.ctx)
        ours.text.deep_prompts[0].copy_(learner.compound_prompts_text[0])
        ours.proj.load_state_dict(learner.proj.state_dict())
        ours.compound_prompt_projections[0].load_state_dict(learner.compound_prompt_projections[0].state_dict())
    return peer, ours


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_maple_fp16_prompts_is_the_peers_rounding() -> None:
    images = pf.images(B)
    peer, ours = _maple_pair(fp16_prompts=True)
    with torch.no_grad():
        expected = peer(images).float()
        torch.testing.assert_close(ours(images)[0], expected, atol=1e-5, rtol=1e-5)
    _, plain = _maple_pair(fp16_prompts=False)  # the default: not rounded, measurably not the peer
    with torch.no_grad():
        assert _relative(plain(images)[0], expected) > 1e-5


def test_maple_fp16_prompts_rounds_each_copys_gradient() -> None:
    """The release's ``.half()`` on each class's / image's copy rounds that copy's gradient too."""
    images, labels = pf.images(B), torch.tensor([0, 1, 2])
    grads = {}
    for flag in (True, False):
        _, ours = _maple_pair(fp16_prompts=flag)
        ours.loss(images, labels).backward()
        grads[flag] = ours.text.deep_prompts.grad.clone()
    assert not torch.equal(grads[True], grads[False])
    assert _relative(grads[True], grads[False]) < 1e-2


def test_maple_fp16_prompts_from_the_spec_and_the_released_settings() -> None:
    from anchoropt.methods.entries import preset_method_settings, released_settings
    from anchoropt.methods.registry import MethodSettings, parse_method

    assert parse_method("maple:fp16_prompts=true").settings(MethodSettings()).fp16_prompts is True
    assert MethodSettings().fp16_prompts is False
    for name in ("maple", "maple+atprompt", "maple+anchoropt"):
        assert released_settings(name, "oxford_pets")["fp16_prompts"] is True
    assert preset_method_settings("maple", "oxford_pets")["fp16_prompts"] is True
    assert "fp16_prompts" not in preset_method_settings("maple:fp16_prompts=false", "oxford_pets")
    with pytest.raises(ValueError, match="fp16_prompts"):
        parse_method("coop:fp16_prompts=true")
    model = testing.tiny_open_clip(width=64, layers=3, heads=2, embed_dim=32, vision_layers=2).requires_grad_(False)
    built = parse_method("maple:fp16_prompts=true")
    learner = built.method.build(model, list(pf.BASE), built.settings(MethodSettings(tokenizer=pf.tokenize)))
    assert learner.fp16_prompts and learner.vision.round_fp16 and learner.text.fp16_deep_prompts
    with pytest.raises(ValueError, match="fp16_prompts"):
        MaPLe(model, pf.BASE, n_ctx=M, prompt_depth=2, tokenizer=pf.tokenize, fp16_prompts="yes")


# ---------------------------------------------------------------------- --drop-last
def _stage2_steps(folder, descriptions, out, **changes) -> int:
    from anchoropt.runner import RunConfig, run_training

    cfg = RunConfig(data=str(folder), descriptions=str(descriptions), output=str(out), model="tiny-test",
                    pretrained=None, shots=4, epochs=1, warmup_epochs=0, stage1_steps=2, progress=False, plots=False,
                    seed=1, **changes)
    return run_training(cfg).results["stage2"]["steps_per_epoch"]


def test_drop_last_drops_the_last_partial_batch_as_dassl(folder, descriptions, tmp_path) -> None:
    """2 base classes x 4 shots = 8 images: batch 3 gives 3 batches (ours) or 2 (Dassl); a batch larger than the
    data drops nothing (Dassl: ``drop_last=is_train and len(data) >= batch_size``)."""
    assert _stage2_steps(folder, descriptions, tmp_path / "a", batch_size=3, drop_last=False) == 3
    assert _stage2_steps(folder, descriptions, tmp_path / "b", batch_size=3, drop_last=True) == 2
    assert _stage2_steps(folder, descriptions, tmp_path / "c", batch_size=16, drop_last=True) == 1


def test_drop_last_flag_and_preset() -> None:
    from anchoropt.runner import RunConfig
    from anchoropt.runner.cli import build_parser
    from anchoropt.runner.cli import _config

    assert RunConfig().resolve().drop_last is True  # default: the released recipe (Dassl's loader)
    assert RunConfig(recipe="legacy").resolve().drop_last is False  # the defaults before: every image
    assert RunConfig(preset="oxford_pets").resolve().drop_last is True  # the released recipe: Dassl's loader
    assert RunConfig(preset="oxford_pets", method="maple").resolve().drop_last is True
    assert RunConfig(preset="oxford_pets", drop_last=False).resolve().drop_last is False
    parser = build_parser()
    for argv, expected in ((["--drop-last"], True), (["--no-drop-last", "--preset", "oxford_pets"], False),
                           (["--preset", "oxford_pets"], True), ([], True), (["--recipe", "legacy"], False)):
        args = parser.parse_args(["train", "--data", "d", *argv])
        assert _config(args).resolve().drop_last is expected, argv
    grid = parser.parse_args(["grid", "--methods", "coop", "--data", "d", "--drop-last"])
    assert grid.drop_last is True
    with pytest.raises(ValueError, match="drop_last"):
        RunConfig(drop_last="yes").resolve()


def test_a_run_config_written_before_drop_last_kept_the_last_batch() -> None:
    from anchoropt.runner import RunConfig

    old = {k: v for k, v in RunConfig(preset="oxford_pets").resolve().__dict__.items() if k != "drop_last"}
    assert RunConfig.from_json(old).drop_last is False


# ---------------------------------------------------------------------- PAE: energy="per_pair"
def _released_layerwise_terms(chain: torch.Tensor, lift: torch.Tensor, ops: torch.Tensor, ls: torch.Tensor):
    """PAE's released layerwise loop (``src/models/vit_prompt/vit.py``), written out: pair ``i`` uses ``K_i`` and
    its own ``L_i``; MSE Koopman term; softplus of the energy increase of the row-normalised predicted state."""
    koopman, lyapunov = torch.zeros(()), torch.zeros(())
    for i in range(chain.shape[0] - 1):
        z, z_next = chain[i] @ lift.t(), chain[i + 1] @ lift.t()
        pred = z @ ops[i]
        koopman = koopman + ((pred - z_next) ** 2).mean()
        q = ls[i].t() @ ls[i]
        q = q / torch.linalg.matrix_norm(q, ord=2)
        a = z / z.norm(dim=-1, keepdim=True).clamp(min=1.0)
        b = pred / pred.norm(dim=-1, keepdim=True).clamp(min=1.0)
        v_a, v_b = ((a @ q) * a).sum(-1), ((b @ q) * b).sum(-1)
        lyapunov = lyapunov + 10 * torch.tanh(torch.nn.functional.softplus(v_b - v_a).mean() / 10)
    return koopman, lyapunov


def test_pae_per_pair_energy_is_the_released_layerwise_mode() -> None:
    from anchoropt.methods.pae import KoopmanLyapunov

    torch.manual_seed(0)
    chain = torch.randn(4, 3, 16)
    reg = KoopmanLyapunov(16, dim=8, mode="layerwise", n_layers=4, energy="per_pair")
    shared = KoopmanLyapunov(16, dim=8, mode="layerwise", n_layers=4)
    assert tuple(reg.energy.shape) == (3, 8, 8) and tuple(shared.energy.shape) == (8, 8)
    with torch.no_grad():
        reg.operator.add_(torch.randn_like(reg.operator) * 0.2)
        reg.energy.add_(torch.randn_like(reg.energy) * 0.3)  # trained: each pair's L apart
        shared.load_state_dict({**reg.state_dict(), "energy": reg.energy[0]})
    terms = reg(chain)
    koopman, lyapunov = _released_layerwise_terms(chain, reg.lift.weight, reg.operator, reg.energy)
    torch.testing.assert_close(terms.koopman, koopman)
    torch.testing.assert_close(terms.lyapunov, lyapunov)
    assert not torch.allclose(shared(chain).lyapunov, lyapunov)  # one shared L is not the release once trained
    terms.total.backward()
    assert all(float(g.abs().sum()) > 0 for g in reg.energy.grad)  # every pair trains its own L
    rebuilt = KoopmanLyapunov(**reg.config())
    rebuilt.load_state_dict(reg.state_dict())
    torch.testing.assert_close(rebuilt(chain).total, terms.total)
    assert reg.config()["energy"] == "per_pair" and KoopmanLyapunov(16, dim=8).config()["energy"] == "shared"
    with pytest.raises(ValueError, match="n_layers"):
        KoopmanLyapunov(16, dim=8, energy="per_pair")
    with pytest.raises(ValueError, match="energy"):
        KoopmanLyapunov(16, dim=8, n_layers=4, energy="layerwise")


def test_pae_energy_from_the_runner(folder, descriptions, tmp_path) -> None:
    from anchoropt.runner import ModelBundle, RunConfig, eval_transform, run_training, train_transform
    from anchoropt.runner.cli import _config, build_parser
    from anchoropt.testing import tiny_open_clip

    args = build_parser().parse_args(["train", "--data", "d", "--pae", "--deep-depth", "2", "--pae-energy", "per_pair"])
    assert _config(args).pae_energy == "per_pair" and RunConfig().pae_energy == "shared"
    with pytest.raises(ValueError, match="pae-energy"):
        RunConfig(pae=True, deep_depth=2, pae_energy="global").resolve()
    model = tiny_open_clip(layers=4).eval().requires_grad_(False)
    cfg = RunConfig(data=str(folder), descriptions=str(descriptions), output=str(tmp_path / "run"), model="tiny-test",
                    pretrained=None, shots=2, epochs=1, warmup_epochs=0, batch_size=8, stage1_steps=2, progress=False,
                    plots=False, deep_depth=3, pae=True, pae_dim=8, pae_mode="layerwise", pae_energy="per_pair")
    run = run_training(cfg, bundle=ModelBundle(model, None, train_transform(model), eval_transform(model), "tiny-4"))
    assert run.results["stage2"]["pae"]["energy"] == "per_pair" and run.results["stage2"]["pae"]["mode"] == "layerwise"


# ---------------------------------------------------------------------- MPA: ranking with zero prompts
def test_mpa_ranking_with_zero_prompts_is_not_ranking_without_prompts() -> None:
    """Zero prompt tokens still attend (after the pre-norm they are its bias): the losses that rank the masks
    change, so ranking without prompts is not PAE's ranking with its zero-initialised prompts."""
    from anchoropt.methods import mpa

    size = 32
    visual = testing.tiny_open_clip(image_size=size, vision_layers=3).requires_grad_(False).eval().visual
    g = torch.Generator().manual_seed(4)
    images, labels = torch.randn(8, 3, size, size, generator=g), torch.arange(8) % 2
    text = torch.randn(2, 32, generator=g)
    common = dict(n_prompts=4, depth=2, text_features=text, window=8, stride=4)
    bare = mpa.mpa_init(visual, images, labels, **common)
    zero = mpa.mpa_init(visual, images, labels, ranking="zero_prompts", **common)
    assert float((bare.losses - zero.losses).abs().max()) > 0.1
    # on this batch 1 of the 4 chosen masks changes (as the issue measured on its own setting)
    assert len(set(bare.mask_index.tolist()) ^ set(zero.mask_index.tolist())) == 2
    assert not torch.allclose(bare.first, zero.first)
    assert torch.equal(bare.masks, zero.masks)
    # the zero-prompt losses are the classifier's on the tower with zero prompts in it, done by hand
    from anchoropt.methods.vision import VisionPrompts

    hooks = VisionPrompts(visual, 4, 2)
    try:
        with torch.no_grad(), hooks.active(torch.zeros(4, 64), torch.zeros(2, 4, 64)):
            expected = mpa.rank_masks(mpa.zero_shot_classifier(visual, text), images, labels, bare.masks)
    finally:
        hooks.remove()
    torch.testing.assert_close(zero.losses, expected)
    # afterwards the tower is bare again: the default ranking is unchanged
    torch.testing.assert_close(mpa.mpa_init(visual, images, labels, **common).losses, bare.losses)
    with pytest.raises(ValueError, match="ranking"):
        mpa.mpa_init(visual, images, labels, ranking="zeros", **common)


@pytest.mark.parametrize("batch_first", [True, False])
def test_deep_rows_round_each_copy_as_maple(batch_first: bool) -> None:
    """``round_fp16``: each sequence's copy of the layer prompts is ``.half()``-ed, as MaPLe's blocks do
    (``prompts.expand(C, ...).half()``): values and each copy's gradient rounded (the MaPLe shim uses this too)."""
    from anchoropt.deep import attach_deep, deep_slot_rows

    C, L, D = 5, 6, 8
    blocks = [torch.nn.Identity() for _ in range(3)]
    hooks = attach_deep(blocks, 2, batch_first=batch_first)
    g = torch.Generator().manual_seed(0)
    prompts = (torch.randn(M, D, generator=g) * 0.37).requires_grad_()
    hidden = torch.randn((C, L, D) if batch_first else (L, C, D), generator=g)
    weights = torch.randn(hidden.shape, generator=g) * 1e-3 / 3
    with hooks.active(torch.eye(M), M, 0, torch.zeros(2, M, D), round_fp16=True) as record:
        rows = deep_slot_rows(hidden, record, prompts, batch_first=batch_first)
    (rows * weights).sum().backward()
    copies = prompts.detach().clone().requires_grad_()
    expected = copies.expand(C, M, D).half()  # MaPLe: the expanded copy, cast
    expected_rows = expected.float() if batch_first else expected.float().transpose(0, 1)
    seq = 1 if batch_first else 0
    torch.testing.assert_close(rows.narrow(seq, 1, M), expected_rows, atol=0, rtol=0)
    (expected_rows * weights.narrow(seq, 1, M)).sum().backward()
    torch.testing.assert_close(prompts.grad, copies.grad, atol=0, rtol=0)
    summed_then_rounded = (weights.narrow(seq, 1, M).sum(0 if batch_first else 1)).half().float()
    assert not torch.equal(prompts.grad, summed_then_rounded)  # not the gradient rounded once after the sum
    hooks.remove()
