"""``anchoropt grid --jobs N`` starts the longest runs first: the run-length estimate and the order it gives."""

from __future__ import annotations

import dataclasses

import pytest

from anchoropt.datasets import folders as D
from anchoropt.runner import RunConfig, grid
from anchoropt.runner.schedule import estimated_work, longest_first

FAST = dict(model="tiny-test", pretrained=None, shots=2, warmup_epochs=0, batch_size=2, stage1_steps=3,
            progress=False, plots=False, augment="none")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return D.make_synthetic_image_folder(tmp_path_factory.mktemp("schedule") / "shapes", per_class=8, size=32)


def _cfg(shapes, method: str, **changes) -> RunConfig:
    return RunConfig(method=method, data=str(shapes), output="unused", **{**FAST, "epochs": 5, **changes})


def test_work_counts_the_prompts_each_method_encodes(shapes):
    # base-to-novel on 4 classes: 2 base classes x 2 shots = 4 images, batch 2: 2 steps per epoch
    coop = estimated_work(_cfg(shapes, "coop"))
    assert coop == 5 * 2 * 2  # epochs x steps x classes
    assert estimated_work(_cfg(shapes, "coop", epochs=10)) == 2 * coop
    assert estimated_work(_cfg(shapes, "cocoop")) == coop * 2  # class prompts for each image of the batch of 2
    assert estimated_work(_cfg(shapes, "coop+anchoropt")) == coop + 3 * 2  # + Stage I: 3 full-batch steps
    assert estimated_work(_cfg(shapes, "zeroshot")) == 0
    # drop_last keeps only full batches: 4 images at batch 3 is 1 step, without drop_last 2
    assert estimated_work(_cfg(shapes, "coop", batch_size=3)) == 5 * 1 * 2
    assert estimated_work(_cfg(shapes, "coop", batch_size=3, drop_last=False)) == 5 * 2 * 2


def test_longest_first_is_stable():
    assert longest_first(["a", "bb", "c", "dd", ""], len) == ["bb", "dd", "a", "c", ""]


def test_a_parallel_grid_hands_the_longest_runs_out_first(tmp_path, shapes, monkeypatch):
    handed = []
    monkeypatch.setattr(grid, "_run_pool", lambda base, todo, *args: handed.extend(r.method for r in todo))
    monkeypatch.setattr(grid, "report_grid", lambda *args, **kwargs: {})
    base = dataclasses.replace(_cfg(shapes, "coop"), epochs=None)  # each method's released epochs
    methods = ["zeroshot", "cocoop", "coop:n_soft=2"]
    grid.run_grid(base, methods, [str(shapes)], [1], tmp_path / "grid", jobs=2, plot=False)
    work = {r.method: estimated_work(grid._run_config(base, r)) for r in grid.plan_grid(methods, [str(shapes)], [1],
                                                                                          tmp_path / "grid")}
    assert work == {"coop:n_soft=2": 200 * 2 * 2, "cocoop": 10 * 2 * 2 * 2, "zeroshot": 0}
    assert handed == ["coop:n_soft=2", "cocoop", "zeroshot"]  # the plan's order was zeroshot, cocoop, coop


def test_the_schedule_benchmark_replays_runs_through_the_workers():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_grid_schedule.py"
    spec = importlib.util.spec_from_file_location("bench_grid_schedule", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.makespan([1, 1, 4], jobs=2) == 5  # the long run starts last: one worker idles for 3 s
    assert bench.makespan(longest_first([1, 1, 4], float), jobs=2) == 4
    assert bench.makespan([2, 2, 2], jobs=1) == 6
