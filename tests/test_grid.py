"""``anchoropt grid`` and ``train --method``: baselines through the runner, aggregation, resume, shards, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anchoropt.runner import cli
from anchoropt.datasets import folders as D
from anchoropt.methods.registry import MethodSettings, parse_method
from anchoropt.runner import RunConfig, run_training
from anchoropt.runner.grid import parse_shard, plan_grid, run_grid, select_shard
from anchoropt.runner.tables import base2novel_tables, format_cell, mean_std, record_from_results, transfer_tables
from anchoropt.testing import tiny_open_clip
from conftest import Killed, kill_after_checkpoint

FAST = dict(model="tiny-test", pretrained=None, shots=2, epochs=1, warmup_epochs=0, batch_size=8, stage1_steps=2,
            progress=False, plots=False, augment="none")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("grid_data")
    a = D.make_synthetic_image_folder(root / "shapes", per_class=8, size=32, seed=1)
    b = D.make_synthetic_image_folder(root / "colours", ["red", "green", "blue", "black"], per_class=8, size=32,
                                      seed=2)
    return [a, b]


@pytest.fixture(scope="module")
def descriptions(tmp_path_factory, folders) -> Path:
    names = [n for f in folders for n in D.read_image_folder(f)[1]]
    path = tmp_path_factory.mktemp("grid_desc") / "desc.json"
    path.write_text(json.dumps({n: [f"a picture of a {n}.", f"a {n} thing."] for n in names}))
    return path


# ---------------------------------------------------------------- aggregation on known numbers
def _b2n(method, dataset, seed, base, novel):
    return {"method": method, "dataset": dataset, "seed": seed, "protocol": "base2novel", "base": base,
            "novel": novel, "hm": 2 * base * novel / (base + novel), "run_dir": "x"}


def test_mean_and_sample_std_on_known_numbers():
    assert mean_std([80.0, 82.0, 84.0]) == (82.0, 2.0)
    assert mean_std([70.0]) == (70.0, 0.0)
    assert format_cell([80.0, 82.0, 84.0]) == "82.00 ± 2.00"
    assert format_cell([70.0]) == "70.00" and format_cell([]) == "–"
    with pytest.raises(ValueError):
        mean_std([])


def test_base2novel_table_cells_and_the_average_block():
    records = [_b2n("coop", "A", s, b, n) for s, b, n in ((1, 80, 60), (2, 82, 62), (3, 84, 64))]
    records += [_b2n("coop", "B", s, b, n) for s, b, n in ((1, 90, 40), (2, 90, 40), (3, 90, 40))]
    records += [_b2n("zeroshot", "A", s, 70, 70) for s in (1, 2, 3)] + [_b2n("zeroshot", "B", s, 50, 50) for s in (1, 2)]
    text = base2novel_tables(records, methods=["zeroshot", "coop"])
    lines = text.splitlines()
    a_block = lines[lines.index("### A") + 4:lines.index("### A") + 6]
    assert a_block[0] == "| zeroshot | 70.00 ± 0.00 | 70.00 ± 0.00 | 70.00 ± 0.00 |"
    hms = [2 * b * n / (b + n) for b, n in ((80, 60), (82, 62), (84, 64))]
    assert a_block[1] == f"| coop | 82.00 ± 2.00 | 62.00 ± 2.00 | {format_cell(hms)} |"
    # average block: per seed, base and novel averaged over A and B, HM of the averages
    avg = lines[lines.index("### Average over 2 datasets") + 4:lines.index("### Average over 2 datasets") + 6]
    per_seed = [((80 + 90) / 2, (60 + 40) / 2), ((82 + 90) / 2, (62 + 40) / 2), ((84 + 90) / 2, (64 + 40) / 2)]
    hm_avg = [2 * b * n / (b + n) for b, n in per_seed]
    assert avg[1] == (f"| coop | {format_cell([b for b, _ in per_seed])} | {format_cell([n for _, n in per_seed])} | "
                      f"{format_cell(hm_avg)} |")
    assert avg[0] == "| zeroshot | 60.00 ± 0.00 | 60.00 ± 0.00 | 60.00 ± 0.00 |"  # only seeds 1, 2 are in both
    summary = lines[lines.index("### HM per dataset") + 4]
    assert summary.startswith("| zeroshot | 70.00 ± 0.00 | 50.00 ± 0.00 | 60.00 ± 0.00 |")


def test_transfer_table_layout():
    records = [{"method": "coop", "dataset": "src", "seed": s, "protocol": "cross-dataset", "source": 90.0 + s,
                "targets": {"t1": 50.0 + s, "t2": 60.0}, "target_mean": 55.0 + s / 2, "run_dir": "x"} for s in (1, 3)]
    text = transfer_tables(records, "cross-dataset")
    assert "| Method | Source | t1 | t2 | Target average |" in text
    assert "| coop | 92.00 ± 1.41 | 52.00 ± 1.41 | 60.00 ± 0.00 | 56.00 ± 0.71 |" in text


# ---------------------------------------------------------------- baselines through the runner
def test_coop_ignores_the_runs_atprompt_attributes(open_clip_model):
    from anchoropt.template import default_tokenizer

    s = MethodSettings(n_soft=2, attributes=("color",), tokenizer=default_tokenizer())
    assert parse_method("coop").method.build(open_clip_model, ["a", "b"], s).attribute_soft is None
    assert parse_method("coop+atprompt").method.build(open_clip_model, ["a", "b"], s).attribute_soft is not None


@pytest.mark.parametrize("method", ["zeroshot", "coop", "coop+atprompt", "coop+atprompt+anchoropt:legacy=true",
                                    "coop+anchoropt:pooling=released"])
def test_train_every_method(tmp_path, folders, descriptions, method):
    cfg = RunConfig(method=method, data=str(folders[0]), output=str(tmp_path / "run"), attributes=["playfulness"],
                    descriptions=str(descriptions), cache_image_features=True, **FAST)
    results = run_training(cfg).results
    assert results["method"] == method
    base, novel = results["results"]["base"], results["results"]["novel"]
    heads = {"zeroshot": "zeroshot", "coop": "prompt", "coop+atprompt": "prompt"}
    assert base["head"] == heads.get(method, "normal") and novel["head"] == heads.get(method, "ensemble")
    assert (results["stage2"] is None) == (method == "zeroshot")
    learner_dir = "prompt_learner" if "anchoropt" in method else "learner"
    assert (tmp_path / "run" / learner_dir).is_dir()
    again = cli.main(["eval", str(tmp_path / "run"), "--no-progress"])
    assert again == 0
    reloaded = json.loads((tmp_path / "run" / "eval_results.json").read_text())["results"]
    assert reloaded["base"]["accuracy"] == base["accuracy"] and reloaded["novel"]["accuracy"] == novel["accuracy"]


def test_an_atprompt_method_without_attributes_is_refused(tmp_path, folders):
    cfg = RunConfig(method="coop+atprompt", data=str(folders[0]), output=str(tmp_path / "r"), **FAST)
    with pytest.raises(ValueError, match="coop\\+atprompt needs attribute words"):
        run_training(cfg)
    with pytest.raises(ValueError, match="does not apply to method 'coop'"):
        RunConfig(method="coop", eval_mode="novel", data="x").resolve()


# ---------------------------------------------------------------- the grid
def test_shards_partition_the_fixed_order(tmp_path):
    runs = plan_grid(["zeroshot", "coop"], ["d1", "x/d1"], [1, 2, 3], tmp_path)
    assert [r.dataset for r in runs[:6]] == ["d1"] * 6 and runs[6].dataset == "d1_2"
    shards = [select_shard(runs, (i, 3)) for i in range(3)]
    assert sorted(r.run_dir for s in shards for r in s) == sorted(r.run_dir for r in runs)
    assert shards[1] == runs[1::3]
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "1", "-1/2", "a/b"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
    with pytest.raises(ValueError, match="twice"):
        plan_grid(["coop", "coop"], ["d"], [1], tmp_path)


def test_grid_resumes_skipping_finished_runs_and_redoing_an_unfinished_one(tmp_path, folders, descriptions):
    base = RunConfig(descriptions=str(descriptions), **FAST)
    methods, seeds = ["zeroshot", "coop", "coop+anchoropt"], [1, 2]
    first = run_grid(base, methods, [str(f) for f in folders], seeds, tmp_path / "out", plot=False)
    assert len(first["ran"]) == 12 and not first["skipped"]
    records = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(records) == 12 and {r["method"] for r in records} == set(methods)
    assert (tmp_path / "out" / "features").is_dir()  # one shared feature file for the whole grid
    done = tmp_path / "out" / "runs" / "shapes" / "coop" / "seed1" / "results.json"
    stamp = done.stat().st_mtime_ns
    unfinished = tmp_path / "out" / "runs" / "colours" / "coop+anchoropt" / "seed2"
    (unfinished / "results.json").unlink()  # an interrupted run: its directory exists, results.json does not
    second = run_grid(base, methods, [str(f) for f in folders], seeds, tmp_path / "out", plot=False)
    assert second["ran"] == ["colours / coop+anchoropt / seed 2"] and len(second["skipped"]) == 11
    assert done.stat().st_mtime_ns == stamp and (unfinished / "results.json").is_file()
    redone = json.loads((unfinished / "results.json").read_text())
    assert record_from_results(redone, str(unfinished))["hm"] == next(
        r["hm"] for r in records if r["run_dir"] == str(unfinished))  # the same run again, the same numbers
    changed = RunConfig(descriptions=str(descriptions), **{**FAST, "epochs": 2})
    with pytest.raises(ValueError, match="was finished with epochs=1, but this grid asks for epochs=2"):
        run_grid(changed, methods, [str(f) for f in folders], seeds, tmp_path / "out", plot=False)


def test_grid_takes_the_shipped_toy_checkpoint_named_by_path_for_the_default(tmp_path):
    """A finished run made with the toy CLIP's default weights is the same run under ``--pretrained`` naming a
    copy of the shipped file; other weights are still refused."""
    from safetensors.torch import load_file, save_file

    from anchoropt.toyworld.make import make
    from anchoropt.toyworld.model import shipped_weights

    make(tmp_path / "toy", seed=3, classes=6, per_class=10)
    grid = dict(methods=["zeroshot"], data=[str(tmp_path / "toy")], seeds=[1], output=tmp_path / "out", plot=False)
    first = run_grid(RunConfig(**{**FAST, "model": "toy-clip"}), **grid)
    assert len(first["ran"]) == 1
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(shipped_weights().read_bytes())
    again = run_grid(RunConfig(**{**FAST, "model": "toy-clip", "pretrained": str(copy)}), **grid)
    assert not again["ran"] and len(again["skipped"]) == 1
    state = load_file(str(copy))
    name = next(iter(state))
    save_file({**state, name: state[name] + 1}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="was finished with pretrained=None"):
        run_grid(RunConfig(**{**FAST, "model": "toy-clip", "pretrained": str(tmp_path / "other.safetensors")}), **grid)


@pytest.mark.parametrize("method", ["coop", "coop+anchoropt"])
def test_grid_resumes_a_killed_run_from_its_checkpoint(tmp_path, folders, descriptions, monkeypatch, method):
    base = RunConfig(descriptions=str(descriptions), **{**FAST, "epochs": 3})
    whole = run_grid(base, [method], [str(folders[0])], [1], tmp_path / "whole", plot=False)
    kill_after_checkpoint(monkeypatch, epochs=2)
    with pytest.raises(Killed):
        run_grid(base, [method], [str(folders[0])], [1], tmp_path / "cut", plot=False)
    monkeypatch.undo()
    again = run_grid(base, [method], [str(folders[0])], [1], tmp_path / "cut", plot=False)
    assert again["ran"] == [f"shapes / {method} / seed 1"]
    run_dir = tmp_path / "cut" / "runs" / "shapes" / method / "seed1"
    results = json.loads((run_dir / "results.json").read_text())
    expected = json.loads((tmp_path / "whole" / "runs" / "shapes" / method / "seed1" / "results.json").read_text())
    assert results["stage2"]["resumed_at_epoch"] == 2
    assert results["stage2"]["epoch_losses"] == expected["stage2"]["epoch_losses"]
    assert results["results"] == expected["results"] and whole["report"]


def test_grid_command_and_report(tmp_path, folders, descriptions, capsys):
    out = tmp_path / "g"
    args = ["grid", "--methods", "zeroshot", "coop", "--data", str(folders[0]), "--seeds", "1", "2", "--model",
            "tiny-test", "--pretrained", "none", "--output", str(out), "--shots", "2", "--epochs", "1",
            "--warmup-epochs", "0", "--batch-size", "8", "--augment", "none", "--no-progress", "--no-plots"]
    assert cli.main([*args, "--shard", "0/2"]) == 0
    assert len(json.loads((out / "results.json").read_text())) == 2  # runs 0 and 2 of 4
    assert cli.main([*args, "--shard", "1/2"]) == 0
    assert cli.main(["grid", "--report", str(out)]) == 0
    records = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in records] == [("zeroshot", 1), ("zeroshot", 2), ("coop", 1), ("coop", 2)]
    table = (out / "table.md").read_text()
    assert "### Average over 1 dataset" in table and "| coop |" in table
    pytest.importorskip("matplotlib")
    assert (out / "hm.png").is_file()
    assert cli.main(["grid", "--methods", "coop"]) == 2
    assert "needs --data, --output" in capsys.readouterr().err


def test_a_datasets_own_descriptions_serve_stage1(tmp_path):
    from anchoropt.runner.grid import _run_config

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "descriptions.json").write_text("{}")
    run = plan_grid(["coop+anchoropt"], [str(tmp_path / "d")], [1], tmp_path / "out")[0]
    assert _run_config(RunConfig(), run).descriptions == str(tmp_path / "d" / "descriptions.json")
    assert _run_config(RunConfig(descriptions="mine.json"), run).descriptions == "mine.json"
    assert _run_config(RunConfig(augment="none"), run).cache_image_features is True


def test_feature_store_reencodes_a_rewritten_image(tmp_path):
    import os

    from anchoropt.runner import build_model
    from anchoropt.runner.features import FeatureStore

    folder = D.make_synthetic_image_folder(tmp_path / "imgs", ["a", "b"], per_class=2, size=32, seed=3)
    records = D.read_image_folder(folder)[0]
    store = FeatureStore(build_model("tiny-test"), tmp_path / "f.safetensors")
    first = store.table(records)
    store.save()
    again = FeatureStore(store.bundle, tmp_path / "f.safetensors")
    assert torch_equal(again.table(records), first) and again.encoded == 0  # read back, nothing encoded
    other = D.make_synthetic_image_folder(tmp_path / "other", ["a"], per_class=1, size=32, seed=9)
    new_image = D.read_image_folder(other)[0][0].path
    os.replace(new_image, records[0].path)  # the same path, another picture
    refreshed = again.table(records)
    assert again.encoded == 1 and not torch_equal(refreshed[0], first[0]) and torch_equal(refreshed[1:], first[1:])


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
