"""``--pae`` in the experiment runner: flags, validation, training with the regulariser, inference unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from anchoropt import runner
from anchoropt.runner import cli as runner_cli
from anchoropt.testing import tiny_open_clip


@pytest.fixture(scope="module")
def bundle():
    model = tiny_open_clip(layers=3).eval().requires_grad_(False)  # 3 text blocks: deep depth 2
    return runner.ModelBundle(model, None, runner.eval_transform(model), runner.eval_transform(model), "tiny-3")


@pytest.fixture(scope="module")
def anchors(tmp_path_factory):
    from anchoropt.io import save_anchors

    path = tmp_path_factory.mktemp("anchors") / "anchors.safetensors"
    save_anchors(torch.randn(1, 64, generator=torch.Generator().manual_seed(0)) * 0.02, path)
    return path


def _cfg(folder, anchors, out, **kwargs):
    return runner.RunConfig(data=str(folder), model="tiny-3", pretrained=None, anchors=str(anchors), output=str(out),
                            shots=4, epochs=2, warmup_epochs=0, batch_size=4, lr=0.05, augment="none",
                            cache_image_features=True, progress=False, plots=False, deep_depth=2, **kwargs)


def test_flags_map_onto_the_config():
    args = runner_cli.build_parser().parse_args(
        ["train", "--data", "d", "--anchors", "a.safetensors", "--deep-depth", "3", "--pae", "--pae-alpha", "0.3",
         "--pae-beta", "0.1", "--pae-dim", "64", "--pae-mode", "layerwise", "--pae-reading", "paper", "--pae-decay"])
    cfg = runner_cli._config(args)
    assert (cfg.pae, cfg.pae_alpha, cfg.pae_beta, cfg.pae_dim, cfg.pae_mode, cfg.pae_reading, cfg.pae_decay) == (
        True, 0.3, 0.1, 64, "layerwise", "paper", True)
    plain = runner_cli._config(runner_cli.build_parser().parse_args(["train", "--data", "d", "--anchors", "a"]))
    assert (plain.pae, plain.pae_alpha, plain.pae_beta, plain.pae_dim, plain.pae_decay) == (False, 0.5, 0.2, 256, False)


@pytest.mark.parametrize("changes, message", [
    ({"deep_depth": 1}, "--deep-depth >= 2"),
    ({"pae_alpha": -1.0}, "--pae-alpha"),
    ({"pae_dim": 0}, "--pae-dim"),
    ({"pae_mode": "pairs"}, "--pae-mode"),
])
def test_bad_pae_settings_are_refused_before_training(folder, anchors, tmp_path, changes, message):
    cfg = _cfg(folder, anchors, tmp_path, pae=True)
    for key, value in changes.items():
        setattr(cfg, key, value)
    with pytest.raises(ValueError, match=message):
        cfg.resolve()


def test_training_with_pae_and_inference_unchanged(folder, anchors, bundle, tmp_path):
    runs = {}
    for name, extra in (("plain", {}), ("zero", {"pae": True, "pae_alpha": 0.0, "pae_beta": 0.0}),
                        ("pae", {"pae": True, "pae_dim": 16})):
        result = runner.run_training(_cfg(folder, anchors, tmp_path / name, **extra), bundle=bundle)
        result.learner.deep_hooks.remove()  # a finished run's hooks would send the next run down the hook path
        runs[name] = result
    summary = runs["pae"].results["stage2"]["pae"]
    assert summary["dim"] == 16 and len(summary["epoch_koopman"]) == 2 and summary["spectral_radius"] > 0
    assert summary["epoch_koopman"][0] > 0 and summary["epoch_lyapunov"][0] > 0
    assert "pae" not in runs["plain"].results["stage2"]
    # zero weights: the PAE plumbing (own optimiser group, own RNG stream, clipping) changes nothing else
    for key, value in runs["plain"].learner.state_dict().items():
        torch.testing.assert_close(runs["zero"].learner.state_dict()[key], value, rtol=0, atol=0)
    assert not torch.equal(runs["pae"].learner.deep.prompts, runs["plain"].learner.deep.prompts)
    # inference needs no PAE: the saved learner (no PAE tensors) reloads and scores exactly as in the run
    saved = json.loads((tmp_path / "pae" / "prompt_learner" / "anchoropt_config.json").read_text())
    assert saved["deep_depth"] == 2
    again = runner.run_evaluation(tmp_path / "pae", {"progress": False}, bundle=bundle)
    first = runs["pae"].results["results"]
    assert again["results"]["base"]["accuracy_normal"] == first["base"]["accuracy_normal"]
    assert again["results"]["novel"]["accuracy_ensemble"] == first["novel"]["accuracy_ensemble"]
