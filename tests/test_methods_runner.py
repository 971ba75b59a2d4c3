"""The method modules through the runner: ``anchoropt train --method cocoop | maple | dept (+atprompt, +anchoropt)``
trains, scores every head, saves, and ``anchoropt eval`` reloads the same numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from anchoropt.runner import cli
from anchoropt.datasets import folders as D
from anchoropt.runner import RunConfig, run_training

FAST = dict(model="tiny-test", pretrained=None, shots=2, epochs=1, warmup_epochs=0, batch_size=4, stage1_steps=2,
            progress=False, plots=False, augment="none", n_soft=2)
NAMES = [f"{base}{suffix}" for base in ("cocoop", "maple", "dept") for suffix in ("", "+atprompt", "+anchoropt")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return D.make_synthetic_image_folder(tmp_path_factory.mktemp("methods_data") / "shapes", per_class=6, size=32,
                                         seed=1)


@pytest.fixture(scope="module")
def descriptions(tmp_path_factory, folder) -> Path:
    path = tmp_path_factory.mktemp("methods_desc") / "desc.json"
    path.write_text(json.dumps({n: [f"a picture of a {n}.", f"a {n} thing."] for n in D.read_image_folder(folder)[1]}))
    return path


@pytest.mark.parametrize("method", NAMES)
def test_train_and_eval_every_method(method, tmp_path, folder, descriptions) -> None:
    cfg = RunConfig(method=method, data=str(folder), output=str(tmp_path / "run"), attributes=["playfulness"],
                    descriptions=str(descriptions), cache_image_features=True, **FAST)
    results = run_training(cfg).results
    assert results["method"] == method
    base, novel = results["results"]["base"], results["results"]["novel"]
    unseen = "ensemble" if method.endswith("+anchoropt") else ("similarity" if method.startswith("dept") else "normal")
    assert (base["head"], novel["head"]) == ("normal", unseen)
    assert results["stage2"]["epoch_losses"]
    assert cli.main(["eval", str(tmp_path / "run"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "run" / "eval_results.json").read_text())["results"]
    assert again["base"]["accuracy"] == base["accuracy"] and again["novel"]["accuracy"] == novel["accuracy"]


@pytest.mark.parametrize("model", ["tiny-eva-test", "tiny-siglip-test"])
@pytest.mark.parametrize("method", ["cocoop+anchoropt", "maple+anchoropt", "dept+anchoropt"])
def test_every_base_method_trains_on_timm_image_towers(method, model, tmp_path, folder, descriptions) -> None:
    """EVA02- and SigLIP-style models (timm image towers; causal / bidirectional text) through the whole runner."""
    cfg = RunConfig(method=method, data=str(folder), output=str(tmp_path / "run"), descriptions=str(descriptions),
                    cache_image_features=True, **{**FAST, "model": model})
    results = run_training(cfg).results
    losses = results["stage2"]["epoch_losses"]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert 0.0 <= results["results"]["novel"]["accuracy"] <= 100.0 and results["random_weights"] is True
    assert cli.main(["eval", str(tmp_path / "run"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "run" / "eval_results.json").read_text())["results"]
    assert again["base"]["accuracy"] == results["results"]["base"]["accuracy"]


def test_presets_follow_the_methods_tables() -> None:
    pets = RunConfig(method="cocoop+anchoropt", preset="oxford_pets", data="x").resolve()
    assert (pets.n_soft, pets.epochs, pets.ce_weight, pets.kd_weight, pets.kd_temperature, pets.batch_size) == \
        (4, 20, 10.0, 100.0, 2.0, 1)  # the authors' CoCoOp+AnchorOPT row, not CoOp+AnchorOPT's (4/100/100/1000/1.0)
    maple = RunConfig(method="maple+atprompt", preset="ucf101", data="x").resolve()
    assert (maple.n_soft, maple.epochs, maple.lr, maple.attributes) == (2, 5, 0.0035, ["precision"])
    coop = RunConfig(method="coop+anchoropt", preset="oxford_pets", data="x").resolve()
    assert (coop.epochs, coop.ce_weight) == (100, 100.0)
    explicit = RunConfig(method="dept", preset="dtd", data="x", epochs=3).resolve()
    assert explicit.epochs == 3 and explicit.lr == 0.0035


@pytest.mark.parametrize("method", ["coop+anchoropt", "dept+anchoropt"])
def test_eval_with_sampled_positions_draws_the_matrix_for_every_batch(method, tmp_path, folder, descriptions,
                                                                       monkeypatch) -> None:
    import torch.nn.functional as F

    from anchoropt import position

    cfg = RunConfig(method=method, data=str(folder), output=str(tmp_path / "run"), descriptions=str(descriptions),
                    cache_image_features=True, eval_batch_size=2, **FAST)
    run_training(cfg)
    draws, gumbel_softmax = [], F.gumbel_softmax
    monkeypatch.setattr(position.F, "gumbel_softmax", lambda *a, **k: draws.append(1) or gumbel_softmax(*a, **k))
    assert cli.main(["eval", str(tmp_path / "run"), "--no-progress"]) == 0
    assert not draws  # deterministic by default: the row-wise argmax
    assert cli.main(["eval", str(tmp_path / "run"), "--no-progress", "--sampled-positions"]) == 0
    again = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    batches = sum(math.ceil(again["results"][split]["n_images"] / 2) for split in ("base", "novel"))
    assert len(draws) >= batches and again["positions"].startswith("sampled")
    assert again["summary"].endswith("| sampled positions")


def test_eval_with_sampled_positions_refuses_a_run_without_a_position_matrix(tmp_path, folder, capsys) -> None:
    cfg = RunConfig(method="coop", data=str(folder), output=str(tmp_path / "run"), **FAST)
    run_training(cfg)
    assert cli.main(["eval", str(tmp_path / "run"), "--no-progress", "--sampled-positions"]) == 2
    assert "has no learned position matrix" in capsys.readouterr().err
