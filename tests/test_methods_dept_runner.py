"""DePT through the registry and the runner: its ``lp_weight`` / ``head_lr_scale`` options, ``--preset``'s released
``w``, the head's own optimiser group under the schedule, and raw image features (CoOp keeps unit vectors)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from anchoropt.datasets import folders as D
from anchoropt.methods.baselines import SoftPromptLearner
from anchoropt.methods import DePT
from anchoropt.methods.registry import MethodSettings, parse_method
from anchoropt.runner import RunConfig, run_training
from anchoropt.runner.features import FeatureStore, feature_key
from anchoropt.runner.grid import run_grid
from anchoropt.runner.learners import method_settings
from anchoropt.testing import tiny_open_clip

FAST = dict(model="tiny-test", pretrained=None, shots=2, warmup_epochs=1, batch_size=4, progress=False, plots=False,
            augment="none", n_soft=2, lr=0.01, warmup_lr=1e-5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return D.make_synthetic_image_folder(tmp_path_factory.mktemp("dept_data") / "shapes", per_class=6, size=32,
                                         seed=1)


# ---------------------------------------------------------------- registry options
@pytest.mark.parametrize("spec", ["dept:lp_weight=0.6:head_lr_scale=3", "dept:lp_weight=0.6,head_lr_scale=3"])
def test_lp_weight_and_head_lr_scale_are_dept_options(spec) -> None:
    choice = parse_method(spec)
    assert choice.options == {"lp_weight": 0.6, "head_lr_scale": 3.0}
    learner = choice.method.build(tiny_open_clip(), ["cat", "dog"], choice.settings(MethodSettings(n_soft=2)))
    assert isinstance(learner, DePT) and (learner.lp_weight, learner.head_lr_scale) == (0.6, 3.0)
    assert [g["lr"] for g in learner.optimizer_groups(0.1)] == [0.1, pytest.approx(0.3)]
    for name in ("dept+atprompt", "dept+anchoropt"):
        assert {"lp_weight", "head_lr_scale"} <= set(parse_method(name).method.options)


@pytest.mark.parametrize(("spec", "message"), [
    ("dept:lp_weight=1.5", r"lp_weight must be a finite number in \[0, 1\], got 1.5"),
    ("dept:lp_weight=-0.1", r"lp_weight must be a finite number in \[0, 1\]"),
    ("dept:lp_weight=nan", r"lp_weight must be a finite number"),
    ("dept:lp_weight=high", "lp_weight takes a number, got 'high'"),
    ("dept:head_lr_scale=0", "head_lr_scale must be a finite number > 0, got 0.0"),
    ("dept:head_lr_scale=inf", "head_lr_scale must be a finite number > 0"),
    ("cocoop:lp_weight=0.5", "method 'cocoop' has no option 'lp_weight'"),
    ("dept:lp_weight", "must be key=value"),
])
def test_bad_dept_options_are_refused(spec, message) -> None:
    with pytest.raises(ValueError, match=message):
        parse_method(spec)
    with pytest.raises(ValueError, match=message):  # before anything runs
        RunConfig(method=spec, data="x").resolve()


# ---------------------------------------------------------------- --preset
@pytest.mark.parametrize(("spec", "dataset", "w"), [
    ("dept", "ucf101", 0.7),  # DePT's own configuration
    ("dept+atprompt", "ucf101", 0.5), ("dept+atprompt", "caltech101", 0.6), ("dept+atprompt", "eurosat", 0.7),
    ("dept+anchoropt", "eurosat", 0.9),  # the AnchorOPT DePT table
    ("dept+atprompt:lp_weight=0.8", "ucf101", 0.8),  # the spec wins over the preset
])
def test_preset_sets_dept_w_per_dataset(spec, dataset, w) -> None:
    from anchoropt.methods.entries import released_settings

    cfg = RunConfig(method=spec, preset=dataset, data="x").resolve()
    assert method_settings(cfg, None, None).lp_weight == w
    if ":" not in spec:
        assert w == released_settings(spec, dataset)["lp_weight"]
    assert method_settings(RunConfig(method=spec.split(":")[0], data="x").resolve(), None, None).lp_weight == 0.7


def test_preset_gives_maple_its_released_init_and_the_anchoropt_variant_none() -> None:
    maple = RunConfig(method="maple", preset="dtd", data="x").resolve()
    settings = method_settings(maple, None, None)
    assert (maple.n_soft, settings.soft_init) == (2, "a photo of a")
    assert method_settings(RunConfig(method="maple+anchoropt", preset="dtd", data="x").resolve(), None,
                           None).soft_init is None
    # no preset: MaPLe's released recipe has the init too; the legacy defaults had none
    assert method_settings(RunConfig(method="maple", data="x").resolve(), None, None).soft_init == "a photo of a"
    assert method_settings(RunConfig(method="maple", data="x", recipe="legacy").resolve(), None,
                           None).soft_init is None
    assert method_settings(RunConfig(method="coop", preset="dtd", data="x").resolve(), None, None).soft_init is None


# ---------------------------------------------------------------- the runner: optimiser groups, raw features
def _record_inputs(monkeypatch, cls, norms: list) -> None:
    original = cls.forward

    def forward(self, x, *args, **kwargs):
        norms.append(x.detach().float().norm(dim=-1))
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", forward)


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "encoded-per-step"])
def test_dept_trains_its_head_at_its_rate_on_raw_features(monkeypatch, tmp_path, folder, cache) -> None:
    steps: list[list[float]] = []
    step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        steps.append([g["lr"] for g in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    norms: list[torch.Tensor] = []
    _record_inputs(monkeypatch, DePT, norms)
    cfg = RunConfig(method="dept:head_lr_scale=6.5", data=str(folder), output=str(tmp_path / "run"), epochs=3,
                    cache_image_features=cache, **FAST)
    results = run_training(cfg).results
    groups = results["stage2"]["param_groups"]
    assert [g["name"] for g in groups] == ["prompt", "head"]
    assert groups[0]["lr"] == 0.01 and groups[1]["lr"] == pytest.approx(0.065)
    assert all(g["weight_decay"] == 5e-4 for g in groups)
    per_epoch = len(steps) // 3
    warm, full, last = steps[0], steps[per_epoch], steps[-1]
    assert warm == [1e-5, 1e-5]  # Dassl's constant warm-up: one rate for every group
    assert full[0] == pytest.approx(0.01) and full[1] == pytest.approx(0.065)
    cosine = 0.5 * (1 + math.cos(math.pi * 1 / 3))  # epoch 2 of 3 after one warm-up epoch
    assert last[0] == pytest.approx(0.01 * cosine) and last[1] == pytest.approx(0.065 * cosine)
    assert results["method_settings"]["lp_weight"] == 0.7 and results["method_settings"]["head_lr_scale"] == 6.5
    seen = torch.cat(norms)
    assert len(seen) and not torch.allclose(seen, torch.ones_like(seen), atol=1e-3)  # training and evaluation: raw


def test_coop_still_gets_unit_image_features(monkeypatch, tmp_path, folder) -> None:
    norms: list[torch.Tensor] = []
    _record_inputs(monkeypatch, SoftPromptLearner, norms)
    cfg = RunConfig(method="coop", data=str(folder), output=str(tmp_path / "run"), epochs=1,
                    cache_image_features=True, **FAST)
    results = run_training(cfg).results
    assert [g["name"] for g in results["stage2"]["param_groups"]] == ["prompt"]
    seen = torch.cat(norms)
    torch.testing.assert_close(seen, torch.ones_like(seen), atol=1e-5, rtol=0)


def test_raw_and_normalised_feature_stores_are_separate(tmp_path, folder) -> None:
    from anchoropt.runner import build_model

    records = D.read_image_folder(folder)[0][:3]
    bundle = build_model("tiny-test")
    unit, raw = FeatureStore(bundle, tmp_path / "unit.safetensors"), FeatureStore(bundle, tmp_path / "raw.safetensors",
                                                                                  normalize=False)
    torch.testing.assert_close(torch.nn.functional.normalize(raw.table(records), dim=-1), unit.table(records))
    unit.save(), raw.save()
    with pytest.raises(ValueError, match="does not hold raw image features"):
        FeatureStore(bundle, tmp_path / "unit.safetensors", normalize=False)
    with pytest.raises(ValueError, match="does not hold L2-normalised image features"):
        FeatureStore(bundle, tmp_path / "raw.safetensors")
    assert feature_key("m", None, "fp32", normalize=False) == feature_key("m", None, "fp32") + "-raw"
    cfg = RunConfig(method="dept", data=str(folder), output=str(tmp_path / "run"), epochs=1, cache_image_features=True,
                    **FAST)
    with pytest.raises(ValueError, match="takes raw image features"):
        run_training(cfg, bundle=bundle, features=unit)


def test_a_grid_with_dept_and_coop_keeps_two_feature_files(tmp_path, folder) -> None:
    base = RunConfig(epochs=1, cache_image_features=True, **FAST)
    run_grid(base, ["coop", "dept"], [str(folder)], [1], tmp_path / "out", plot=False)
    files = {p.name for p in (tmp_path / "out" / "features").glob("*.safetensors")}
    unit = [f for f in files if not f.endswith("-raw.safetensors")]
    assert len(files) == 2 and len(unit) == 1
    assert files == {unit[0], unit[0].replace(".safetensors", "-raw.safetensors")}
    records = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["method"] for r in records} == {"coop", "dept"}
