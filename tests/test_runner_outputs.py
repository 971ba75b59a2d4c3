"""What a run writes besides results.json: per-epoch metrics (metrics.jsonl / .csv, TensorBoard), grid tables
(table.csv / table.tex, the paper's numbers), the anchors-placed record."""

from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from anchoropt.runner import RunConfig, cli, run_training
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


def test_resume_keeps_the_metrics_without_duplicate_epochs(folder, descriptions, tmp_path, monkeypatch):
    whole = run_training(_cfg(folder, descriptions, tmp_path / "whole"))
    kill_after_checkpoint(monkeypatch, epochs=2)
    out = tmp_path / "cut"
    with pytest.raises(Killed):
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
    assert code == 2 and "pip install tensorboard" in err and len(err.strip().splitlines()) == 1
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


# ---------------------------------------------------------------------- table.csv / table.tex / --paper
from anchoropt.runner import tables as T  # noqa: E402
from conftest import Killed, kill_after_checkpoint


def _b2n(method, dataset, seed, base, novel):
    return {"method": method, "dataset": dataset, "seed": seed, "protocol": "base2novel", "run_dir": "x",
            "base": base, "novel": novel, "hm": 2 * base * novel / (base + novel)}


RECORDS = [_b2n("coop+anchoropt", "caltech-101", 1, 98.0, 95.0), _b2n("coop+anchoropt", "caltech-101", 2, 98.5, 96.0),
           _b2n("coop", "caltech-101", 1, 97.0, 90.0), _b2n("coop", "caltech-101", 2, 98.0, 89.0),
           _b2n("my_method", "caltech-101", 1, 50.0, 40.0)]


def test_table_csv_has_mean_and_std_per_method_and_dataset(tmp_path):
    written = T.write_report(tmp_path, RECORDS, plot=False)
    with open(written["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    anchor = next(r for r in rows if r["method"] == "coop+anchoropt" and r["dataset"] == "caltech-101")
    assert float(anchor["base_mean"]) == pytest.approx(98.25) and float(anchor["base_std"]) == pytest.approx(0.353553, abs=1e-4)
    assert anchor["seeds"] == "2" and "paper_hm" not in anchor
    assert {(r["method"], r["dataset"]) for r in rows} >= {("coop", "average"), ("my_method", "caltech-101")}


def test_table_tex_is_booktabs_with_mean_pm_std(tmp_path):
    T.write_report(tmp_path, RECORDS, plot=False)
    tex = (tmp_path / "table.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex and "booktabs" in tex
    assert "$98.25 \\pm 0.35$" in tex  # coop+anchoropt's base on caltech-101
    assert "my\\_method" in tex and "caltech-101" in tex
    assert tex.count("\\begin{tabular}") == tex.count("\\end{tabular}") == 1
    assert "$50.00$" in tex  # one seed: the mean alone


def test_paper_numbers_beside_the_rows_they_exist_for(tmp_path, capsys):
    written = T.write_report(tmp_path, RECORDS, plot=False, paper=True)
    with open(written["csv"], newline="") as handle:
        rows = {(r["method"], r["dataset"]): r for r in csv.DictReader(handle)}
    anchor = rows[("coop+anchoropt", "caltech-101")]
    # the paper's Table 1, CoOp + AnchorOPT on Caltech101: 98.26 / 95.34 / 96.78
    assert (float(anchor["paper_base"]), float(anchor["paper_novel"]), float(anchor["paper_hm"])) == (98.26, 95.34, 96.78)
    assert float(anchor["diff_base"]) == pytest.approx(98.25 - 98.26, abs=0.006)
    assert float(rows[("coop", "caltech-101")]["paper_hm"]) == 93.73
    assert rows[("my_method", "caltech-101")]["paper_hm"] == ""  # not in the paper
    assert rows[("coop", "average")]["paper_hm"] == ""  # one dataset's average is not the paper's 11-dataset one
    tex = (tmp_path / "table.tex").read_text()
    assert "$96.78$" in tex and "2511.21188" in tex and "$\\Delta$HM" in tex
    assert written["paper_rows"] == 2
    md = (tmp_path / "table.md").read_text()
    assert "### Beside the paper" in md and "| coop+anchoropt | caltech-101 | 98.25 ± 0.35 |" in md
    assert "| 98.26 | 95.34 | 96.78 |" in md and "my_method | caltech-101 | 50" not in md.split("Beside the paper")[1]


def test_paper_numbers_match_datasets_by_their_spellings():
    assert T.paper_numbers("maple+anchoropt", "eurosat") == {"base": 95.92, "novel": 81.63, "hm": 88.2}
    assert T.paper_numbers("dept+atprompt", "OxfordPets")["hm"] == 96.29
    assert T.paper_numbers("coop+anchoropt:pooling=released", "oxford_flowers")["novel"] == 75.41
    assert T.paper_numbers("coop", "my_folder") is None and T.paper_numbers("zeroshot", "dtd") is None
    paper11 = ["imagenet", "caltech-101", "oxford_pets", "stanford_cars", "oxford_flowers", "food-101",
               "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]
    assert T.paper_numbers("cocoop+anchoropt", "average", paper11) == {"base": 81.87, "novel": 77.06, "hm": 79.39}


def _paper_text() -> Path:
    from conftest import shared_data_dir

    path = shared_data_dir().parent / "reference" / "anchoropt_paper.md"
    if not path.is_file():
        pytest.skip(f"{path} absent: the paper's text is in the workplace's shared/reference folder")
    return path


@pytest.mark.parametrize("block_title", ["Average", "StanfordCars", "SUN397"])
def test_shipped_table_matches_the_papers_text(block_title):
    """Each line of the paper's Table 1 (as text) against the shipped JSON: every number of every row of the
    block whose header names ``block_title``."""
    lines = _paper_text().read_text(encoding="utf-8").splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("Table 1. Base-to-novel"))
    header = max(i for i, line in enumerate(lines[:end]) if line.startswith("Method\t") and block_title in line)
    heads = [h for h in lines[header].split("\t")[1:] if h]
    names = dict(zip(T.paper_table()["datasets"], ["Average", "ImageNet", "Caltech101", "OxfordPets", "StanfordCars",
                                                   "Flowers102", "Food101", "FGVCAircraft", "SUN397", "DTD",
                                                   "EuroSAT", "UCF101"]))
    keys = [next(k for k, v in names.items() if v == h) for h in heads]
    shipped = T.paper_table()["rows"]
    block = []
    for line in lines[header + 2:]:
        if not line.strip():
            break
        block.append(line)
    assert len(block) == len(shipped) == 17
    for line, row in zip(block, shipped):
        cells = [c for c in line.split("\t")[1:]]
        numbers = [float(c.replace("<b>", "").replace("</b>", "").split("(")[0]) for c in cells]
        assert numbers == [row["datasets"][k][m] for k in keys for m in ("base", "novel", "hm")], line


# ---------------------------------------------------------------------- anchors placed by the evaluation arrangement
def test_anchors_placed_counts_the_evaluation_arrangement():
    from anchoropt.position import PositionMatrix

    position = PositionMatrix(3, 1, arrangement="anchor_after")
    assert position.anchors_placed() == 1
    with torch.no_grad():
        position.logits.copy_(torch.eye(4)[[0, 1, 2, 2]] * 10)  # slot 4 takes soft3 again: the anchor is dropped
    position.arrangement = "learned"
    assert position.anchors_placed() == 0 and position.describe() == ["soft1", "soft2", "soft3", "soft3"]


def _drop_the_anchor(real):
    def train_then_drop(learner, *args, **kwargs):
        summary = real(learner, *args, **kwargs)
        with torch.no_grad():  # every slot's argmax on a soft token: the evaluation prompt has no anchor
            size = learner.position.size
            learner.position.logits.copy_(torch.eye(size)[[min(i, learner.position.n_soft - 1) for i in range(size)]])
        return summary
    return train_then_drop


def test_a_run_whose_evaluation_places_no_anchor_says_so(folder, descriptions, tmp_path, monkeypatch, capsys):
    from anchoropt.runner import run as run_module

    monkeypatch.setattr(run_module, "train_stage2", _drop_the_anchor(run_module.train_stage2))
    run = run_training(_cfg(folder, descriptions, tmp_path / "run", epochs=1))
    saved = json.loads((run.output / "results.json").read_text())
    assert saved["anchors_placed"] == 0 and saved["no_anchor_placed"] is True
    assert "anchor1" not in saved["position"]["slots"]
    assert "NO ANCHOR PLACED" in saved["summary"] and "NO ANCHOR PLACED" in capsys.readouterr().out


def test_a_run_that_places_its_anchor_records_it(folder, descriptions, tmp_path):
    run = run_training(_cfg(folder, descriptions, tmp_path / "run", epochs=1))
    saved = json.loads((run.output / "results.json").read_text())
    placed = sum(1 for slot in saved["position"]["slots"] if slot.startswith("anchor")) > 0
    assert saved["anchors_placed"] == int(placed) and saved["no_anchor_placed"] is (not placed)
    assert ("NO ANCHOR PLACED" in saved["summary"]) is (not placed)


def test_position_plot_caption_says_no_anchor_placed():
    pytest.importorskip("matplotlib")
    from anchoropt import viz

    logits = torch.eye(4)[[0, 1, 2, 2]] * 10
    figure = viz.position_matrix_figure((logits, 3))
    assert "NO ANCHOR PLACED" in figure._supxlabel.get_text()
    figure = viz.position_matrix_figure((torch.eye(4) * 10, 3))
    assert "NO ANCHOR" not in figure._supxlabel.get_text()


# ---------------------------------------------------------------------- noise: warnings, Ctrl-C, wording, threads
def test_cli_prints_each_warning_once_as_one_plain_line(monkeypatch, capsys):
    import warnings

    def noisy(args):
        for _ in range(3):
            warnings.warn("the same thing", UserWarning, stacklevel=1)
        warnings.warn("another thing", UserWarning)
        return 0

    monkeypatch.setitem(cli._COMMANDS, "presets", noisy)
    assert cli.main(["presets"]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == ["warning: the same thing", "warning: another thing"]
    assert warnings.showwarning is not None and "warning:" not in warnings.formatwarning("x", UserWarning, "f", 1)


def test_ctrl_c_during_train_names_the_resume_command(monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json").write_text("{}")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli._COMMANDS, "train", interrupted)
    code = cli.main(["train", "--data", "d e", "--anchors", "a", "-o", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.strip() == f"interrupted: continue with: anchoropt train --data 'd e' --anchors a -o {out} --resume"
    assert cli.main(["train", "--data", "d", "--anchors", "a", "-o", str(tmp_path / "new")]) == 130
    assert "before the run started" in capsys.readouterr().err
    monkeypatch.setitem(cli._COMMANDS, "grid", interrupted)
    assert cli.main(["grid", "--methods", "coop", "--data", "d", "-o", "g"]) == 130
    assert capsys.readouterr().err.startswith("interrupted: continue with: anchoropt grid --methods coop --data d -o g")


def test_ctrl_c_in_a_real_training_run(folder, descriptions, tmp_path, monkeypatch, capsys):
    from anchoropt.runner import training

    real = training.train_stage2

    def stopped_after_one_epoch(*args, **kwargs):
        def stop(state, tensors, checkpoint=kwargs["on_checkpoint"]):
            checkpoint(state, tensors)
            raise KeyboardInterrupt
        return real(*args, **{**kwargs, "on_checkpoint": stop})

    from anchoropt.runner import run as run_module

    monkeypatch.setattr(run_module, "train_stage2", stopped_after_one_epoch)
    out = tmp_path / "run"
    argv = ["train", "--data", str(folder), "--descriptions", str(descriptions), "--model", "tiny-test",
            "--pretrained", "none", "--shots", "2", "--epochs", "2", "--warmup-epochs", "0", "--stage1-steps", "2",
            "--no-progress", "--no-plots", "-o", str(out)]
    assert cli.main(argv) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("interrupted: continue with: anchoropt train ") and line.endswith(" --resume")
    monkeypatch.undo()
    assert cli.main(line.split("anchoropt ", 1)[1].split()) == 0  # the printed command continues the run
    assert [r["epoch"] for r in M.read_metrics(out)] == [1, 2]


def test_toyworld_make_error_names_the_flag(tmp_path, capsys):
    (tmp_path / "x").write_text("")
    assert cli.main(["toyworld", "make", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite" in err and "overwrite=True" not in err
    from anchoropt.toyworld.make import make

    with pytest.raises(FileExistsError, match=r"pass overwrite=True$"):
        make(tmp_path)


def test_demo_help_has_no_run_of_spaces_inside_a_line(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "openai \\" in out
    assert not [line for line in out.splitlines() if "        --" in line.strip() and "#" not in line]


def test_demo_and_toyworld_use_one_thread_others_keep_torchs(monkeypatch, capsys):
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setitem(cli._COMMANDS, "demo", lambda args: 0)
    monkeypatch.setitem(cli._COMMANDS, "train", lambda args: 0)
    assert cli.main(["demo"]) == 0 and calls == [1]
    assert cli.main(["demo", "--threads", "3"]) == 0 and calls == [1, 3]
    assert cli.main(["toyworld", "info"]) == 0 and calls == [1, 3, 1]
    monkeypatch.setattr(cli, "busy_machine_hint", lambda: None)
    assert cli.main(["train", "--data", "d", "--anchors", "a"]) == 0 and calls == [1, 3, 1]
    capsys.readouterr()
    monkeypatch.setattr(cli, "busy_machine_hint", lambda: "note: busy")
    assert cli.main(["train", "--data", "d", "--anchors", "a"]) == 0
    assert capsys.readouterr().err == ""  # torch runs one thread already (the suite's setting): no hint
    monkeypatch.setattr(cli, "_torch_threads", lambda: 4)
    assert cli.main(["train", "--data", "d", "--anchors", "a"]) == 0
    assert capsys.readouterr().err.splitlines() == ["note: busy"]


def test_busy_machine_hint_only_when_the_load_exceeds_the_cores(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert cli.busy_machine_hint(load=1.5, cores=2) is None
    hint = cli.busy_machine_hint(load=5.2, cores=2)
    assert "--threads" in hint and "5.2" in hint and len(hint.splitlines()) == 1
    monkeypatch.setenv("RANK", "1")
    assert cli.busy_machine_hint(load=5.2, cores=2) is None
