"""Re-running a run or a grid from its saved config: ``anchoropt train --config`` / ``anchoropt grid --config``."""

from __future__ import annotations

import json

import pytest

from anchoropt.runner import cli

FAST = ["--pretrained", "none", "--shots", "2", "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "8",
        "--stage1-steps", "2", "--no-progress", "--seed", "1", "--no-plots", "--augment", "none"]

GRID_FAST = [a for a in FAST if a not in ("--seed", "1")]


def _results(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, folder, descriptions):
    out = tmp_path_factory.mktemp("rerun") / "first"
    assert cli.main(["train", "--data", str(folder), "--descriptions", str(descriptions), "--model", "tiny-test",
                     "-o", str(out), *FAST]) == 0
    return out


def test_train_config_reruns_the_same_run(first_run, tmp_path):
    again = tmp_path / "again"
    assert cli.main(["train", "--config", str(first_run / "run_config.json"), "-o", str(again)]) == 0
    first, second = _results(first_run), _results(again)
    assert second["results"] == first["results"]
    assert second["stage2"]["epoch_losses"] == first["stage2"]["epoch_losses"]
    saved = json.loads((again / "run_config.json").read_text())
    assert saved["output"] == str(again) and saved["epochs"] == 2 and saved["seed"] == 1


def test_train_config_typed_options_override_the_file(first_run, tmp_path):
    out = tmp_path / "one_epoch"
    # a run directory works as --config too; --seed and --epochs typed: they win, nothing else changes
    assert cli.main(["train", "--config", str(first_run), "-o", str(out), "--epochs", "1", "--seed", "2"]) == 0
    saved = json.loads((out / "run_config.json").read_text())
    first = json.loads((first_run / "run_config.json").read_text())
    assert (saved["epochs"], saved["seed"]) == (1, 2)
    assert len(_results(out)["stage2"]["epoch_losses"]) == 1
    # argparse defaults do not override the file (e.g. --eval-batch-size 100, --augment rrc_flip, --protocol)
    for key in ("augment", "shots", "batch_size", "progress", "plots", "data", "descriptions", "lr"):
        assert saved[key] == first[key], key


def test_train_config_errors_name_the_file(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "nowhere.json"), "-o", str(tmp_path / "x")]) == 2
    assert "nowhere.json not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli.main(["train", "--config", str(bad), "-o", str(tmp_path / "x")]) == 2
    assert "bad.json is not valid JSON" in capsys.readouterr().err
    bad.write_text(json.dumps({"epochs": 2, "colour": "red"}))
    assert cli.main(["train", "--config", str(bad), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "colour" in err
    bad.write_text(json.dumps({"methods": ["coop"], "seeds": [1]}))
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "anchoropt grid --config" in capsys.readouterr().err


def test_train_without_data_or_config_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["train", "-o", str(tmp_path / "x")]) == 2
    assert "--data" in capsys.readouterr().err


def test_grid_config_reruns_the_same_grid(tmp_path, folder, descriptions):
    grid = tmp_path / "grid"
    assert cli.main(["grid", "--methods", "coop", "--data", str(folder), "--seeds", "1", "--model", "tiny-test",
                     "-o", str(grid), "--descriptions", str(descriptions), *GRID_FAST]) == 0
    assert (grid / "table.csv").is_file() and "\\toprule" in (grid / "table.tex").read_text()
    assert cli.main(["grid", "--report", str(grid), "--paper"]) == 0  # a folder the paper does not have
    assert "paper_hm" in (grid / "table.csv").read_text().splitlines()[0]
    spec = json.loads((grid / "grid.json").read_text())
    assert spec["config"]["epochs"] == 2 and spec["data_dirs"] == [str(folder)]
    again = tmp_path / "again"
    assert cli.main(["grid", "--config", str(grid / "grid.json"), "-o", str(again)]) == 0
    first = json.loads((grid / "results.json").read_text())
    second = json.loads((again / "results.json").read_text())
    assert [(r["method"], r["seed"], r["base"], r["novel"], r["hm"]) for r in first] == \
        [(r["method"], r["seed"], r["base"], r["novel"], r["hm"]) for r in second]
    # an override on top: another seed list and one epoch
    third = tmp_path / "third"
    assert cli.main(["grid", "--config", str(grid), "-o", str(third), "--seeds", "2", "--epochs", "1"]) == 0
    records = json.loads((third / "results.json").read_text())
    assert [r["seed"] for r in records] == [2]
    run_cfg = json.loads((third / "runs" / folder.name / "coop" / "seed2" / "run_config.json").read_text())
    assert run_cfg["epochs"] == 1 and run_cfg["shots"] == 2


def test_grid_config_without_saved_settings_is_refused(tmp_path, capsys):
    (tmp_path / "grid.json").write_text(json.dumps({"methods": ["coop"], "seeds": [1]}))
    assert cli.main(["grid", "--config", str(tmp_path)]) == 2
    assert "holds no saved settings" in capsys.readouterr().err
