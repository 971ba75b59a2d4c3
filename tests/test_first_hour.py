"""What a new user meets first: offline defaults that fail fast in one line, the demo entry point, plain logs off
a terminal, the random-weights flag, optional matplotlib, early input checks, one-line CLI errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anchoropt.runner import cli
from anchoropt import viz
from anchoropt._progress import Progress
from anchoropt.runner import models, reports

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--shots", "4", "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "8", "--stage1-steps", "20",
        "--seed", "1"]


@pytest.fixture()
def no_model(monkeypatch):
    """Building a model fails the test: the command must stop before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr("anchoropt.runner.run.build_model", refuse)
    monkeypatch.setattr("anchoropt.runner.models.build_model", refuse)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------- --pretrained without a network
def test_default_pretrained_offline_fails_at_once_in_one_line(folder, descriptions, tmp_path, monkeypatch, capsys):
    import open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_cached", lambda cfg: False)
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("tried to download"))
    code = cli.main(["train", "--data", str(folder), "--descriptions", str(descriptions), "-o", str(tmp_path / "r")])
    line = _error_line(capsys)
    assert code == 2 and line.startswith("anchoropt train: error: --pretrained openai needs a download")
    assert "HF_HUB_OFFLINE is set" in line
    for choice in ("--pretrained none", "--pretrained FILE", "a tag where it can be downloaded"):
        assert choice in line


def test_unreachable_hub_fails_at_once(monkeypatch):
    import open_clip

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_cached", lambda cfg: False)
    monkeypatch.setattr(models, "_reachable", lambda host, timeout: False)
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(ValueError, match="huggingface.co cannot be reached: pass --pretrained none"):
        models.build_model("ViT-B-16", "openai")


def test_cached_weights_are_not_refused(monkeypatch):
    """With the weights in the cache no network is needed: open_clip is asked to load them."""
    import open_clip

    from anchoropt.testing import tiny_open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_cached", lambda cfg: True)
    asked = []
    monkeypatch.setattr(open_clip, "create_model",
                        lambda name, pretrained=None, **k: asked.append((name, pretrained)) or tiny_open_clip())
    models.build_model("ViT-B-16", "openai")
    assert asked == [("ViT-B-16", "openai")]


def test_a_failed_download_is_one_line_without_a_chained_traceback(monkeypatch):
    import open_clip

    monkeypatch.setattr(models, "_check_downloadable", lambda name, tag: None)

    def broken(*args, **kwargs):
        raise RuntimeError("Connection reset by peer\nmore lines")

    monkeypatch.setattr(open_clip, "create_model", broken)
    with pytest.raises(ValueError) as info:
        models.build_model("ViT-B-16", "openai")
    assert "(RuntimeError: Connection reset by peer);" in str(info.value) and "more lines" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_model_name_with_a_slash_gets_a_suggestion(capsys):
    with pytest.raises(ValueError, match=r"unknown open_clip model 'ViT-B/32' \(did you mean 'ViT-B-32'\?\)"):
        models.build_model("ViT-B/32", None)
    with pytest.raises(ValueError) as info:
        models.build_model("qqqqqq", None)
    assert "did you mean" not in str(info.value) and "[]" not in str(info.value)


# ---------------------------------------------------------------------- inputs before the model
def test_missing_data_is_reported_before_the_model_with_the_path_as_typed(tmp_path, descriptions, monkeypatch,
                                                                          capsys, no_model):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real.txt").write_text("x")
    os.symlink(tmp_path / "real.txt", tmp_path / "link")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    for given, what in (("nowhere/at_all", "not found"), ("link", "not a directory"), ("dangling", "not found")):
        code = cli.main(["train", "--data", given, "--descriptions", str(descriptions), "-o", "out"])
        line = _error_line(capsys)
        assert code == 2 and line == f"anchoropt train: error: dataset directory {what}: {given} (--data)"
    code = cli.main(["learn-anchors", "--data", "link", "--descriptions", str(descriptions)])
    assert code == 2 and _error_line(capsys).endswith("not a directory: link (--data)")


def test_presets_of_an_unknown_dataset_is_an_error(capsys):
    assert cli.main(["presets", "cifar10"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("anchoropt presets: error: no preset for dataset 'cifar10'")
    assert cli.main(["presets", "dtd"]) == 0 and "dtd" in capsys.readouterr().out


# ---------------------------------------------------------------------- --threads
def test_threads_option(monkeypatch, capsys):
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert cli.main(["presets", "dtd"]) == 0 and calls == []  # default: torch's own
    parser = cli.build_parser()
    assert parser.parse_args(["train", "--data", "d", "--anchors", "a", "--threads", "3"]).threads == 3
    assert parser.parse_args(["eval", "run", "--threads", "2"]).threads == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "d", "--anchors", "a", "--threads", "0"])
    capsys.readouterr()
    from anchoropt.runner import cli as runner_cli

    monkeypatch.setitem(runner_cli._COMMANDS, "train", lambda args: 0)
    assert cli.main(["train", "--data", "d", "--anchors", "a", "--threads", "1"]) == 0 and calls == [1]


# ---------------------------------------------------------------------- logs, flags, plots
def test_progress_off_a_terminal_is_a_few_plain_lines():
    stream = io.StringIO()
    bar = Progress(200, "Stage I anchors", stream=stream)
    for step in range(200):
        bar.update(loss=f"{1.0 / (step + 1):.4f}")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in stream.getvalue() and all(lines)
    assert lines[0] == "Stage I anchors: 20/200 loss 0.0500" and lines[-1].startswith("Stage I anchors: 200/200")


def test_progress_on_a_terminal_is_a_tqdm_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = Progress(3, "Stage II", stream=stream)
    for _ in range(3):
        bar.update(loss="0.5")
    bar.close()
    assert "\r" in stream.getvalue() and "Stage II" in stream.getvalue()


def test_train_off_a_terminal_flags_random_weights(folder, descriptions, tmp_path, capsys, monkeypatch):
    notes = []
    original = viz.save_run_plots
    monkeypatch.setattr(viz, "save_run_plots", lambda *a, note=None, **k: notes.append(note) or original(*a, **k))
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(folder), "--descriptions", str(descriptions), "--model", "tiny-test",
                     "--pretrained", "none", "-o", str(out), *FAST]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "" not in captured.err.splitlines()  # no redraws, no blank lines
    stage1 = [line for line in captured.err.splitlines() if line.startswith("Stage I anchors:")]
    assert len(stage1) == 10 and stage1[-1].startswith("Stage I anchors: 20/20 loss ")
    assert captured.out.strip().endswith("| RANDOM WEIGHTS")
    results = json.loads((out / "results.json").read_text())
    assert results["random_weights"] is True and results["summary"].endswith("| RANDOM WEIGHTS")
    assert notes and "RANDOM WEIGHTS" in notes[0]
    assert (out / "plots" / "position_matrix.png").is_file()


def test_summary_line_without_the_flag_for_trained_weights():
    results = {"protocol": "base2novel", "dataset": "d", "seed": 1, "random_weights": False,
               "results": {"base": {"accuracy": 80.0}, "novel": {"accuracy": 70.0}, "hm": 74.67}}
    assert reports.summary_line(results) == "base2novel d seed 1 | base 80.00 | novel 70.00 | HM 74.67"
    assert not reports.random_weights("openai") and reports.random_weights("none") and reports.random_weights(None)


def test_the_flag_follows_the_weights_the_model_was_built_with():
    shipped = models.build_model("toy-clip", None)  # from Python: no --pretrained, the shipped weights
    assert shipped.weights == "toy-clip (shipped)" and not reports.random_weights(None, shipped)
    assert reports.weights_record("openai", shipped) == {"pretrained": "toy-clip (shipped)", "random_weights": False}
    random_toy = models.build_model("toy-clip", "none")
    assert random_toy.weights == models.RANDOM and reports.random_weights("none", random_toy)
    tiny = models.build_model("tiny-test", None)
    assert reports.weights_record(None, tiny) == {"pretrained": models.RANDOM, "random_weights": True}
    by_hand = models.ModelBundle(tiny.model, None, tiny.test_transform, tiny.test_transform)
    assert reports.random_weights("openai", by_hand) is False and reports.random_weights(None, by_hand) is True


def _without_matplotlib(monkeypatch):
    def missing(**kwargs):
        raise ImportError(viz.MATPLOTLIB_HINT)

    monkeypatch.setattr(viz, "_figure", missing)


def test_train_without_matplotlib_says_so_once_and_leaves_no_plots(folder, descriptions, tmp_path, capsys,
                                                                   monkeypatch):
    _without_matplotlib(monkeypatch)
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(folder), "--descriptions", str(descriptions), "--model", "tiny-test",
                     "--pretrained", "none", "-o", str(out), "--no-progress", *FAST]) == 0
    err = capsys.readouterr().err
    assert err.count("pip install") == 1 and "plots skipped: the pictures need matplotlib: pip install matplotlib" in err
    assert "anchoropt[viz]" not in err and not (out / "plots").exists()
    # `anchoropt plot` on that run: one line, exit status 2, before any model is built
    monkeypatch.setattr("anchoropt.runner.models.build_model", lambda *a, **k: pytest.fail("model built"))
    assert cli.main(["plot", str(out)]) == 2
    assert _error_line(capsys) == f"anchoropt plot: error: {viz.MATPLOTLIB_HINT}"


def test_learn_anchors_prints_a_dataset_summary(folder, descriptions, tmp_path, capsys):
    assert cli.main(["learn-anchors", "--data", str(folder), "--descriptions", str(descriptions), "--model",
                     "tiny-test", "--pretrained", "none", "--stage1-steps", "2", "--no-progress",
                     "-o", str(tmp_path / "la")]) == 0
    captured = capsys.readouterr()
    assert "shapes: 4 classes, 24 train / 8 val / 16 test images" in captured.err
    assert "Stage I on the base classes: 2" in captured.err
    assert captured.out.strip().endswith("| RANDOM WEIGHTS")
    assert json.loads((tmp_path / "la" / "stage1.json").read_text())["random_weights"] is True


# ---------------------------------------------------------------------- the demo
def test_demo_command_runs_in_process(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--stage1-steps", "3", "--epochs", "1", "--shots", "2", "--toy-classes", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("NOTE: toy-world figures")  # the default: the toy world with the shipped toy CLIP
    assert "zero-shot" in out and "| HM " in out and "[toy world]" in out


def test_python_dash_m_anchoropt_demo():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "anchoropt", "demo", "--random", "--stage1-steps", "2", "--epochs",
                           "1", "--shots", "2", "--threads", "1"], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[RANDOM WEIGHTS]" in done.stdout and "Traceback" not in done.stderr


def test_demo_on_a_real_model_name_checks_like_the_runner(folder, descriptions, capsys, monkeypatch):
    from anchoropt.runner import demo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_cached", lambda cfg: False)
    args = ["--data", str(folder), "--descriptions", str(descriptions)]
    assert demo.main(["--model", "ViT-B-16", "--pretrained", "openai", *args]) == 2
    assert "--pretrained none" in _error_line(capsys)
    assert cli.main(["demo", "--model", "ViT-B/16", *args]) == 2
    assert "did you mean 'ViT-B-16'?" in capsys.readouterr().err
    assert demo.main(["--model", "ViT-B-16", "--data", "nowhere", "--descriptions", str(descriptions)]) == 2
    assert _error_line(capsys) == "anchoropt demo: error: dataset directory not found: nowhere (--data)"
