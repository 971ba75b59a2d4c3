"""What a run writes besides results.json: per-epoch metrics (metrics.jsonl / .csv, TensorBoard), grid tables
(table.csv / table.tex, the paper's numbers), the anchors-placed record."""

from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import pytest

from anchoropt.runner import RunConfig, cli, rundir, run_training
from anchoropt.runner import metrics as M

TINY = dict(model="tiny-test", pretrained=None, shots=2, epochs=3, warmup_epochs=0, batch_size=8, stage1_steps=2,
            progress=False, plots=False, seed=1, augment="none")


def _cfg(folder, descriptions, out, **changes) -> RunConfig:
    return RunConfig(data=str(folder), descriptions=str(descriptions), output=str(out), **{**TINY, **changes})


def _csv_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / M.METRICS_CSV, newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------- metrics.jsonl / metrics.csv
def test_every_run_writes_per_epoch_metrics(folder, descriptions, tmp_path):
    run = run_training(_cfg(folder, descriptions, tmp_path / "run"))
    rows = M.read_metrics(run.output)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    losses = run.results["stage2"]["epoch_losses"]
    assert [r["loss"] for r in rows] == pytest.approx(losses, abs=1e-6)
    for row in rows:
        assert row["ce"] > 0 and row["lr"] > 0 and row["seconds"] >= 0
    assert rows[-1]["eval_hm"] == pytest.approx(run.results["results"]["hm"])
    assert rows[-1]["eval_base"] == pytest.approx(run.results["results"]["base"]["accuracy"])
    assert "eval_hm" not in rows[0]
    table = _csv_rows(run.output)
    assert [int(r["epoch"]) for r in table] == [1, 2, 3]
    assert float(table[1]["loss"]) == pytest.approx(rows[1]["loss"]) and table[0]["eval_hm"] == ""
    assert float(table[-1]["eval_hm"]) == pytest.approx(rows[-1]["eval_hm"])


def test_a_method_that_trains_nothing_gets_one_evaluation_row(folder, descriptions, tmp_path):
    run = run_training(_cfg(folder, descriptions, tmp_path / "zs", method="zeroshot"))
    rows = M.read_metrics(run.output)
    assert len(rows) == 1 and rows[0]["epoch"] == 0 and rows[0]["eval_hm"] == pytest.approx(run.results["results"]["hm"])


class _Killed(BaseException):
    pass


def test_resume_keeps_the_metrics_without_duplicate_epochs(folder, descriptions, tmp_path, monkeypatch):
    whole = run_training(_cfg(folder, descriptions, tmp_path / "whole"))
    real = rundir.save_checkpoint

    def killed_after_two_epochs(directory, learner, run_id, state, tensors):
        real(directory, learner, run_id, state, tensors)
        if state["epochs_done"] == 2:
            raise _Killed()

    monkeypatch.setattr(rundir, "save_checkpoint", killed_after_two_epochs)
    out = tmp_path / "cut"
    with pytest.raises(_Killed):
        run_training(_cfg(folder, descriptions, out))
    monkeypatch.undo()
    assert [r["epoch"] for r in M.read_metrics(out)] == [1, 2]
    # a row written after the checkpoint it belongs to was lost (killed in between): the resume drops it
    with open(out / M.METRICS_JSONL, "a") as handle:
        handle.write(json.dumps({"epoch": 3, "loss": 99.0}) + "\n")
    run_training(_cfg(folder, descriptions, out), resume=True)
    rows, reference = M.read_metrics(out), M.read_metrics(whole.output)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference]
    assert [int(r["epoch"]) for r in _csv_rows(out)] == [1, 2, 3]


def test_overwrite_removes_the_old_metrics(folder, descriptions, tmp_path):
    out = tmp_path / "run"
    run_training(_cfg(folder, descriptions, out))
    run_training(_cfg(folder, descriptions, out, epochs=1), overwrite=True)
    assert [r["epoch"] for r in M.read_metrics(out)] == [1]


# ---------------------------------------------------------------------- TensorBoard
def _tensorboard_installed() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_tensorboard_installed(), reason="tensorboard is installed: the missing-package path cannot run")
def test_tensorboard_missing_is_one_clear_line(folder, descriptions, tmp_path, capsys):
    code = cli.main(["train", "--data", str(folder), "--descriptions", str(descriptions), "--model", "tiny-test",
                     "--pretrained", "none", "--epochs", "1", "--no-progress", "-o", str(tmp_path / "tb"),
                     "--tensorboard"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install \"anchoropt[tensorboard]\"" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "tb").exists()  # refused before anything was written


class _FakeWriter:
    """Stands in for torch's SummaryWriter: records what a run logs."""

    made: list["_FakeWriter"] = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        _FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_writer_gets_every_epoch(folder, descriptions, tmp_path, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    _FakeWriter.made.clear()
    run = run_training(_cfg(folder, descriptions, tmp_path / "tb", tensorboard=True))
    (writer,) = _FakeWriter.made
    assert writer.closed and Path(writer.log_dir) == run.output / M.TENSORBOARD_DIR
    losses = [(value, step) for tag, value, step in writer.scalars if tag == "train/loss"]
    assert [step for _, step in losses] == [1, 2, 3]
    assert ("eval/hm", run.results["results"]["hm"], 3) in [(t, pytest.approx(v), s) for t, v, s in writer.scalars]
    assert {t for t, _, _ in writer.scalars} >= {"train/loss", "train/ce", "lr/first_group", "time/epoch_seconds",
                                                "eval/base", "eval/novel"}
