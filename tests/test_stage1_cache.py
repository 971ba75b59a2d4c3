"""Stage I shared by a grid's AnchorOPT rows: learned once per dataset and seed, the same bits as learned alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from anchoropt import AnchorLearner
from anchoropt.datasets import folders as D
from anchoropt.io import load_anchors
from anchoropt.runner import RunConfig
from anchoropt.runner.grid import run_grid
from anchoropt.runner.stage1_cache import Stage1Cache

FAST = dict(model="tiny-test", pretrained=None, shots=2, epochs=1, warmup_epochs=0, batch_size=8, stage1_steps=3,
            progress=False, plots=False, augment="none")
OPTIONS = dict(steps=3, lr=0.002, mse_weight=1000.0, schedule="cosine", steps_per_epoch=1, warmup_lr=1e-5)
DESCRIPTIONS = {"cat": ["a small furry pet.", "it purrs."], "dog": ["a loyal pet that barks."]}


def _learner(model, seed: int = 0, preposition: str = "of") -> AnchorLearner:
    torch.manual_seed(seed)
    return AnchorLearner(model, ["cat", "dog"], n_anchor=2, preposition=preposition)


def test_the_key_names_every_input_and_a_hit_is_the_learned_bits(open_clip_model, tmp_path):
    cache = Stage1Cache(tmp_path / "stage1")
    learner = _learner(open_clip_model)
    targets = learner.targets(DESCRIPTIONS)
    key = cache.key(learner, targets, OPTIONS)
    assert key == cache.key(_learner(open_clip_model), _learner(open_clip_model).targets(DESCRIPTIONS), OPTIONS)
    other_descriptions = {**DESCRIPTIONS, "dog": ["a loyal pet that howls."]}
    misses = {
        "another start": cache.key(_learner(open_clip_model, seed=1), targets, OPTIONS),
        "other descriptions": cache.key(learner, learner.targets(other_descriptions), OPTIONS),
        "another template": cache.key(_learner(open_clip_model, preposition="for"), targets, OPTIONS),
        "more steps": cache.key(learner, targets, {**OPTIONS, "steps": 4}),
        "another lr": cache.key(learner, targets, {**OPTIONS, "lr": 0.001}),
    }
    assert len(set(misses.values()) | {key}) == len(misses) + 1, misses

    assert cache.load(key) is None
    history = learner.fit(targets, progress=False, **OPTIONS)
    cache.store(key, learner.frozen_anchors(), history[0], history[-1])
    hit = cache.load(key)
    assert torch.equal(hit.anchors, learner.frozen_anchors())
    assert (hit.loss_first, hit.loss_last) == (history[0], history[-1])

    (tmp_path / "stage1" / f"{key}.safetensors").write_bytes(b"not a safetensors file")
    assert cache.load(key) is None  # a damaged file is learned again, not read
    with pytest.raises(ValueError, match="not a Stage I cache key"):
        cache.load("../outside")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stage1_data")
    folder = D.make_synthetic_image_folder(root / "shapes", per_class=8, size=32, seed=1)
    names = D.read_image_folder(folder)[1]
    (folder / "descriptions.json").write_text(json.dumps({n: [f"a picture of a {n}.", f"a {n} thing."] for n in names}))
    return folder


def _grid(output: Path, dataset: Path) -> dict:
    methods = ["coop+anchoropt", "cocoop+anchoropt", "coop+anchoropt:kd_weight=0"]
    return run_grid(RunConfig(**FAST), methods, [str(dataset)], [1, 2], output, plot=False)


def _stage1(output: Path, method: str, seed: int) -> tuple[dict, torch.Tensor, dict]:
    run = output / "runs" / "shapes" / method / f"seed{seed}"
    results = json.loads((run / "results.json").read_text())
    return results["stage1"], load_anchors(run / "anchors.safetensors"), results["results"]


def test_a_grid_learns_stage1_once_per_dataset_and_seed_with_the_bits_of_a_fresh_stage1(tmp_path, dataset,
                                                                                        monkeypatch):
    _grid(tmp_path / "shared", dataset)
    monkeypatch.setattr(Stage1Cache, "load", lambda self, key: None)  # every run learns its own anchors
    _grid(tmp_path / "alone", dataset)
    for seed in (1, 2):
        first, anchors, _ = _stage1(tmp_path / "shared", "coop+anchoropt", seed)
        assert first["cache"] == "stored"
        for method in ("coop+anchoropt", "cocoop+anchoropt", "coop+anchoropt-kd_weight-0"):
            info, shared, shared_results = _stage1(tmp_path / "shared", method, seed)
            alone_info, alone, alone_results = _stage1(tmp_path / "alone", method, seed)
            assert info["cache"] == ("stored" if method == "coop+anchoropt" else "reused")
            assert torch.equal(shared, alone) and torch.equal(shared, anchors)
            assert (info["loss_first"], info["loss_last"]) == (alone_info["loss_first"], alone_info["loss_last"])
            assert shared_results == alone_results  # the same anchors, so the same run
    assert not torch.equal(_stage1(tmp_path / "shared", "coop+anchoropt", 1)[1],
                           _stage1(tmp_path / "shared", "coop+anchoropt", 2)[1])  # one entry per seed
    assert len(list((tmp_path / "shared" / "stage1").glob("*.safetensors"))) == 2
