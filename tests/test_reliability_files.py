"""Reliability of files and run directories (issue 21, part A): saves delete only their own files, locks are
atomic and re-checked, a damaged finished run is refused by name, grid reports take only a run's own results,
datasets are identified by their resolved folder, and OS errors are one line naming the path."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from anchoropt import AnchorOPTPromptLearner, _files, load_prompt_learner
from anchoropt.datasets import folders as D
from anchoropt.runner import cli
from anchoropt.runner import RunConfig, rundir, run_training
from anchoropt.runner.grid import plan_grid, report_grid, run_grid

FAST = ["--model", "tiny-test", "--pretrained", "none", "--shots", "2", "--epochs", "1", "--warmup-epochs", "0",
        "--batch-size", "8", "--stage1-steps", "2", "--no-progress", "--no-plots"]
GRID = dict(model="tiny-test", pretrained=None, shots=2, epochs=1, warmup_epochs=0, batch_size=8, progress=False,
            plots=False, augment="none")
REPO = Path(__file__).resolve().parents[1]


def _learner(model, seed: int = 0) -> AnchorOPTPromptLearner:
    """A small AnchorOPT learner whose tensors depend only on ``seed``."""
    torch.manual_seed(seed)
    return AnchorOPTPromptLearner(model, ["cat", "dog"], torch.randn(1, 64) * 0.02, n_soft=4)


@contextlib.contextmanager
def _live_process():
    """A process that runs while the body does (its pid is a live lock owner)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _lock_of(pid: int) -> str:
    """The content of a run lock held by ``pid`` on this host."""
    return json.dumps({"pid": pid, "host": rundir.socket.gethostname(), "started": "now", "what": "anchoropt grid"})


# ---------------------------------------------------------------------- 1. saves delete only their own files
def test_a_hostile_manifest_cannot_make_a_save_delete_files(open_clip_model, tmp_path):
    save = tmp_path / "save"
    _learner(open_clip_model, 1).save_pretrained(save)
    outside, absolute, user = tmp_path / "victim.txt", tmp_path / "elsewhere" / "abs.txt", save / "notes.txt"
    for path in (outside, absolute, user):
        path.parent.mkdir(exist_ok=True)
        path.write_text("keep me")
    manifest = json.loads((save / _files.MANIFEST_NAME).read_text())
    manifest["files"].update({"../victim.txt": {"size": 7, "sha256": "x"}, str(absolute): {"size": 7, "sha256": "x"},
                              "notes.txt": {"size": 7, "sha256": "x"}})
    (save / _files.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(_files.IncompleteSaveError, match=r"lists '\.\./victim\.txt', not a plain file name"):
        load_prompt_learner(save, open_clip_model, ["cat"])  # a hostile manifest is not read either
    with pytest.warns(UserWarning, match="names outside its folder"):
        _learner(open_clip_model, 2).save_pretrained(save)
    assert all(p.read_text() == "keep me" for p in (outside, absolute, user))
    loaded = load_prompt_learner(save, open_clip_model, ["cat"])
    assert torch.equal(loaded.soft, _learner(open_clip_model, 2).soft)


def test_a_save_still_removes_its_own_old_files(tmp_path):
    _files.commit_files(tmp_path, {"a.bin": b"1", "b.bin": b"2"}, known=("a.bin", "b.bin"))
    _files.commit_files(tmp_path, {"a.bin": b"3"}, known=("a.bin", "b.bin"))
    assert not (tmp_path / "b.bin").exists() and (tmp_path / "a.bin").read_bytes() == b"3"
    _files.commit_files(tmp_path, {"c.bin": b"4"})  # a.bin is not one of this save's known names: left alone
    assert (tmp_path / "a.bin").read_bytes() == b"3"


# ---------------------------------------------------------------------- 2. atomic lock, re-checked
def test_the_lock_appears_complete_in_one_step(tmp_path, monkeypatch):
    seen = []
    real_link = os.link

    def link(src, dst, *args, **kwargs):
        real_link(src, dst, *args, **kwargs)
        seen.append(json.loads(Path(dst).read_text()))  # the moment the lock's name exists, it holds its owner

    monkeypatch.setattr(rundir.os, "link", link)
    with rundir.locked(tmp_path, "a test"):
        assert seen and seen[0]["pid"] == os.getpid() and seen[0]["what"] == "a test"
    assert not (tmp_path / rundir.LOCK_NAME).exists() and os.listdir(tmp_path) == []


def test_an_unwritten_lock_is_not_taken_as_stale(tmp_path):
    (tmp_path / rundir.LOCK_NAME).write_bytes(b"")  # created, not yet written (or left by an old anchoropt)
    with pytest.raises(rundir.RunDirectoryError, match="not a readable lock.*delete"):
        with rundir.locked(tmp_path):
            pass
    assert (tmp_path / rundir.LOCK_NAME).exists()


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale-lock"])
def test_only_one_of_many_racing_takers_holds_the_lock(tmp_path, stale):
    if stale:  # a dead owner: every taker wants to take it over
        with _live_process() as dead:
            pass
        (tmp_path / rundir.LOCK_NAME).write_text(_lock_of(dead.pid))
    start, inside, most, outcomes = threading.Barrier(8), [0], [0], []
    guard = threading.Lock()

    def take():
        start.wait()
        try:
            with rundir.locked(tmp_path):
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.3)
                with guard:
                    inside[0] -= 1
            outcomes.append("held")
        except rundir.RunDirectoryError:
            outcomes.append("refused")

    threads = [threading.Thread(target=take) for _ in range(8)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rundir.warnings, "warn", lambda *a, **k: None)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert most[0] == 1 and outcomes.count("held") >= 1 and len(outcomes) == 8


def test_train_rechecks_the_output_once_it_holds_the_lock(folder, descriptions, tmp_path, monkeypatch):
    out = tmp_path / "run"
    finished = {"run_id": "A", "results": {"done": True}}
    real = rundir.locked

    @contextlib.contextmanager
    def another_run_finishes_first(directory, what="a run"):
        with real(directory, what):  # B passed the first check; A finished before B got the lock
            (directory / "run_config.json").write_text(json.dumps({"run_id": "A"}))
            (directory / "results.json").write_text(json.dumps(finished))
            yield

    monkeypatch.setattr(rundir, "locked", another_run_finishes_first)
    cfg = RunConfig(data=str(folder), descriptions=str(descriptions), output=str(out), model="tiny-test",
                    pretrained=None, shots=2, epochs=1, warmup_epochs=0, batch_size=8, stage1_steps=2,
                    progress=False, plots=False)
    with pytest.raises(rundir.RunDirectoryError, match="holds a finished run.*--overwrite"):
        run_training(cfg)
    assert json.loads((out / "results.json").read_text()) == finished


def test_a_second_grid_does_not_clear_a_run_another_process_holds(folder, tmp_path):
    out = tmp_path / "grid"
    run = plan_grid(["zeroshot"], [str(folder)], [1], out)[0]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "run_config.json").write_text(json.dumps({"run_id": "first-grid"}))  # being written
    with _live_process() as owner:
        (run.run_dir / rundir.LOCK_NAME).write_text(_lock_of(owner.pid))
        with pytest.raises(rundir.RunDirectoryError, match=f"in use by anchoropt grid \\(pid {owner.pid}"):
            run_grid(RunConfig(**GRID), ["zeroshot"], [str(folder)], [1], out, plot=False)
        assert json.loads((run.run_dir / "run_config.json").read_text()) == {"run_id": "first-grid"}


# ---------------------------------------------------------------------- 3. damaged results.json, atomic grid.json
def test_a_grid_refuses_a_finished_run_with_a_damaged_results_json(folder, tmp_path, capsys):
    out = tmp_path / "grid"
    run_grid(RunConfig(**GRID), ["zeroshot"], [str(folder)], [1], out, plot=False)
    results = out / "runs" / "shapes" / "zeroshot" / "seed1" / "results.json"
    results.write_text('{"run_id": "x", "results": {"ba')  # truncated
    args = ["grid", "--methods", "zeroshot", "--data", str(folder), "--seeds", "1", "--output", str(out),
            *FAST[:4], "--augment", "none", "--no-progress", "--no-plots"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"{results} is damaged" in err and "delete" in err and "Traceback" not in err
    assert results.read_text() == '{"run_id": "x", "results": {"ba'  # nothing retrained, nothing deleted
    assert (results.parent / "run_config.json").is_file()


def test_grid_json_survives_a_full_disk(folder, tmp_path):
    out = tmp_path / "grid"
    out.mkdir()
    (out / "grid.json").write_text('{"methods": ["previous"]}\n')
    script = (
        "import resource, signal, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from anchoropt.runner import cli\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))\n"
        f"sys.exit(cli.main(['grid', '--methods', 'zeroshot', '--data', {str(folder)!r}, '--output', {str(out)!r},"
        " '--model', 'tiny-test', '--pretrained', 'none', '--augment', 'none', '--no-progress', '--no-plots']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-800:]
    assert "Traceback" not in proc.stderr and str(out / "grid.json") in proc.stderr
    assert (out / "grid.json").read_text() == '{"methods": ["previous"]}\n'
    assert [p.name for p in out.iterdir()] == ["grid.json"]  # no temp file left behind


# ---------------------------------------------------------------------- 4. a run's results match its run id
def test_a_report_leaves_out_a_results_json_copied_from_another_run(folder, tmp_path):
    out = tmp_path / "grid"
    run_grid(RunConfig(**GRID), ["zeroshot"], [str(folder)], [1, 2], out, plot=False)
    runs = out / "runs" / "shapes" / "zeroshot"
    (runs / "seed2" / "results.json").unlink()
    shutil.copy(runs / "seed1" / "results.json", runs / "seed2" / "results.json")
    with pytest.warns(UserWarning, match=r"leaving out .*seed2/results.json: it is the result of seed 1"):
        report_grid(out, plot=False)
    assert [r["seed"] for r in json.loads((out / "results.json").read_text())] == [1]
    seed2 = json.loads((runs / "seed1" / "results.json").read_text())
    seed2["seed"] = 2  # the seed edited to fit: the run id still tells
    (runs / "seed2" / "results.json").write_text(json.dumps(seed2))
    with pytest.warns(UserWarning, match=r"its run id .* is not the run id .* of .*seed2/run_config.json"):
        report_grid(out, plot=False)
    assert [r["seed"] for r in json.loads((out / "results.json").read_text())] == [1]
    with pytest.raises(ValueError, match=r"seed2/results.json is not this run's own: its run id"):
        run_grid(RunConfig(**GRID), ["zeroshot"], [str(folder)], [1, 2], out, plot=False)  # not skipped as done


# ---------------------------------------------------------------------- 5. datasets by resolved path
def test_one_dataset_folder_given_twice_is_refused(folder, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(folder, target_is_directory=True)
    for twice in ([str(folder), str(folder) + "/"], [str(folder), str(link)],
                  [str(folder), f"{folder.parent}/./{folder.name}"]):
        with pytest.raises(ValueError, match="--data lists one dataset twice.*give each dataset once"):
            plan_grid(["zeroshot"], twice, [1], tmp_path / "out")


def test_two_datasets_sharing_a_folder_name_are_reported_apart(tmp_path):
    a = D.make_synthetic_image_folder(tmp_path / "a" / "mini", per_class=8, size=32, seed=1)
    b = D.make_synthetic_image_folder(tmp_path / "b" / "mini", ["red", "green", "blue", "black"], per_class=8,
                                      size=32, seed=2)
    out = tmp_path / "grid"
    run_grid(RunConfig(**GRID), ["zeroshot"], [str(a), str(b)], [1], out, plot=False)
    records = json.loads((out / "results.json").read_text())
    assert [r["dataset"] for r in records] == ["mini", "mini_2"]
    assert {Path(r["run_dir"]).parts[-3] for r in records} == {"mini", "mini_2"}
    table = (out / "table.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| zeroshot |"))
    assert "–" not in row and "### mini_2" in table  # both columns filled, neither averaged into the other


# ---------------------------------------------------------------------- 6. OS errors: one line, the path
def test_a_read_only_output_and_one_under_a_file_are_one_line(folder, descriptions, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    base = ["train", "--data", str(folder), "--descriptions", str(descriptions), *FAST]
    assert cli.main([*base, "-o", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and str(blocker) in err and "Traceback" not in err
    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):  # a read-only file system (EROFS): refused to root as well
        if ro in self.parents:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "mkdir", read_only)
        assert cli.main([*base, "-o", str(ro / "run")]) == 2
        err = capsys.readouterr().err
        assert f"cannot create {ro / 'run'}: read-only file system" in err and "Traceback" not in err
        assert cli.main(["grid", "--methods", "zeroshot", "--data", str(folder), "--output", str(ro / "g"),
                         *FAST[:4], "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"{ro / 'g'}: read-only file system" in err and "Traceback" not in err
    if os.geteuid() == 0:
        return  # root writes into a 0500 folder
    ro.chmod(0o500)
    try:
        assert cli.main([*base, "-o", str(ro / "run")]) == 2
        err = capsys.readouterr().err
        assert "not writable" in err and str(ro) in err and "Traceback" not in err
        assert cli.main(["grid", "--methods", "zeroshot", "--data", str(folder), "--output", str(ro / "g"),
                         *FAST[:4], "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert str(ro) in err and "error:" in err and "Traceback" not in err
    finally:
        ro.chmod(0o700)


def test_a_full_disk_is_one_line_naming_the_file(folder, descriptions, tmp_path, monkeypatch, capsys):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_files.os, "fsync", full)
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(folder), "--descriptions", str(descriptions), "-o", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on the device" in err[0] and str(out) in err[0]
    from PIL import Image

    def no_space(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", no_space)
    world = tmp_path / "world"
    assert cli.main(["toyworld", "make", str(world), "--classes", "2", "--per-class", "5"]) == 2
    err = capsys.readouterr().err
    assert f"{world}: no space left on the device" in err and "Traceback" not in err
