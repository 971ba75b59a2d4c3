"""Reliability of the runner (issue 11): safe run directories (no silent overwrite, --resume, a lock, one run per
directory) and every option and input file checked before a model is built.  Each test failed before the fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anchoropt import _files
from anchoropt.runner import cli
from anchoropt.methods import registry
from anchoropt.datasets import folders as D
from anchoropt.runner import ModelBundle, RunConfig, eval_transform, rundir, run_evaluation, run_training, train_transform
from anchoropt.io import WEIGHTS_NAME, read_manifest
from anchoropt.runner import run as run_module
from anchoropt.testing import tiny_open_clip
from conftest import Killed, kill_after_checkpoint

TINY = dict(model="tiny-test", pretrained=None, shots=4, epochs=4, warmup_epochs=0, batch_size=8, stage1_steps=3,
            progress=False, plots=False, seed=1)
FAST = ["--model", "tiny-test", "--pretrained", "none", "--shots", "2", "--epochs", "1", "--warmup-epochs", "0",
        "--batch-size", "8", "--stage1-steps", "2", "--no-progress", "--no-plots"]


def _cfg(folder, descriptions, out, **changes) -> RunConfig:
    return RunConfig(data=str(folder), descriptions=str(descriptions), output=str(out), **{**TINY, **changes})


def _train(folder, descriptions, out, *extra) -> int:
    return cli.main(["train", "--data", str(folder), "--descriptions", str(descriptions), "-o", str(out),
                     *FAST, *extra])


def _learned(out: Path) -> dict[str, torch.Tensor]:
    """The saved learner's tensors: AnchorOPT's prompt_learner/, any other method's learner/."""
    if (out / "prompt_learner").is_dir():
        return load_file(str(out / "prompt_learner" / "anchoropt.safetensors"))
    return load_file(str(out / "learner" / registry.LEARNER_WEIGHTS))


# ---------------------------------------------------------------------- run directories
def test_a_finished_run_is_not_overwritten_without_overwrite(folder, descriptions, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(folder, descriptions, out) == 0
    first = (out / "results.json").read_bytes()
    assert _train(folder, descriptions, out, "--seed", "2") == 2
    assert "holds a finished run" in capsys.readouterr().err and (out / "results.json").read_bytes() == first
    assert _train(folder, descriptions, out, "--seed", "2", "--overwrite") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 2 and results["run_id"] == json.loads((out / "run_config.json").read_text())["run_id"]


RESUME_VARIANTS = {
    "shallow": {},
    "deep-pae-cached-views": dict(deep_depth=2, pae=True, pae_dim=8, cache_image_features=True, cache_views=2),
    "coop-cached-views": dict(method="coop", cache_image_features=True, cache_views=2),
    "dept-two-rates": dict(method="dept"),  # its head in a second optimizer group at 6.5x the rate, raw features
    "maple-images": dict(method="maple"),  # takes images (the runner never caches features for it)
    "cocoop+anchoropt": dict(method="cocoop+anchoropt"),  # a method module with Stage I anchors in its state
    "drop-last": dict(drop_last=True, batch_size=3),  # Dassl's loader: 8 images -> 2 batches an epoch, not 3
}


@pytest.mark.parametrize("variant", RESUME_VARIANTS.values(), ids=RESUME_VARIANTS.keys())
def test_resume_continues_an_interrupted_run_bit_exactly(folder, descriptions, tmp_path, monkeypatch, variant):
    def bundle():  # PAE needs deep depth 2: a tower with 3 text blocks (a fresh one per run: deep hooks attach)
        if not variant.get("pae"):
            return None
        model = tiny_open_clip(layers=3).eval().requires_grad_(False)
        return ModelBundle(model, None, train_transform(model), eval_transform(model), "tiny-3")

    whole = run_training(_cfg(folder, descriptions, tmp_path / "whole", **variant), bundle=bundle())
    saved = kill_after_checkpoint(monkeypatch, epochs=2)
    out = tmp_path / "cut"
    with pytest.raises(Killed):
        run_training(_cfg(folder, descriptions, out, **variant), bundle=bundle())
    monkeypatch.undo()
    assert saved == [1, 2] and rundir.run_state(out) == "interrupted" and not (out / rundir.LOCK_NAME).exists()
    _check_checkpoint_holds_only_the_learned_tensors(out / rundir.CHECKPOINTS / rundir.LAST_CHECKPOINT, whole.learner)
    with pytest.raises(rundir.RunDirectoryError, match="interrupted run .* --resume"):
        run_training(_cfg(folder, descriptions, out, **variant))
    with pytest.raises(rundir.RunDirectoryError, match="other options .*epochs: 4 -> 5"):
        run_training(_cfg(folder, descriptions, out, **{**variant, "epochs": 5}), resume=True)
    resumed = run_training(_cfg(folder, descriptions, out, **variant), bundle=bundle(), resume=True)
    assert resumed.results["stage2"]["resumed_at_epoch"] == 2
    assert resumed.results["stage2"]["epoch_losses"] == whole.results["stage2"]["epoch_losses"]
    assert resumed.results["stage2"]["param_groups"] == whole.results["stage2"]["param_groups"]
    for name, tensor in _learned(whole.output).items():
        assert torch.equal(tensor, _learned(out)[name]), name
    assert resumed.results["results"] == whole.results["results"]
    assert resumed.results["stage2"].get("pae") == whole.results["stage2"].get("pae")
    assert not (out / rundir.CHECKPOINTS / rundir.LAST_CHECKPOINT).exists()
    if variant.get("method") == "dept":
        head, prompt = (next(g for g in resumed.results["stage2"]["param_groups"] if g["name"] == n)
                        for n in ("head", "prompt"))
        assert head["lr"] == pytest.approx(6.5 * prompt["lr"])


def _check_checkpoint_holds_only_the_learned_tensors(directory: Path, learner) -> None:
    """A checkpoint's weights are the learner's trainable tensors (+ its Stage I anchors), no frozen CLIP weight."""
    manifest = read_manifest(directory)
    assert manifest is not None and manifest["run_id"] == json.loads(
        (directory.parents[1] / "run_config.json").read_text())["run_id"]
    weights = load_file(str(directory / WEIGHTS_NAME))
    trainable = {name for name, p in learner.named_parameters() if p.requires_grad}
    assert {name for name in weights if name.rsplit(".", 1)[-1] != "anchors"} == trainable
    assert set(weights) == set(learner.state_dict())
def test_two_runs_cannot_share_a_directory(folder, descriptions, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / rundir.LOCK_NAME).write_text(json.dumps({"pid": other.pid, "host": rundir.socket.gethostname(),
                                                        "started": "now", "what": "anchoropt train"}))
        with pytest.raises(rundir.RunDirectoryError, match=f"in use by anchoropt train \\(pid {other.pid}"):
            run_training(_cfg(folder, descriptions, out, epochs=1))
    finally:
        other.kill()
        other.wait()
    with pytest.warns(UserWarning, match="no longer runs"):  # a lock left by a dead process is taken over
        run_training(_cfg(folder, descriptions, out, epochs=1))
    assert not (out / rundir.LOCK_NAME).exists()


def test_eval_refuses_a_directory_mixing_two_runs(folder, descriptions, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_training(_cfg(folder, descriptions, a, epochs=1))
    run_training(_cfg(folder, descriptions, b, epochs=1, seed=2))
    shutil.rmtree(a / "prompt_learner")
    shutil.copytree(b / "prompt_learner", a / "prompt_learner")
    with pytest.raises(rundir.RunDirectoryError, match="mixes parts of different runs.*prompt_learner/ is from run"):
        run_evaluation(a)


def test_eval_names_a_wrong_type_in_a_hand_edited_run_config(folder, descriptions, tmp_path, capsys):
    out = tmp_path / "run"
    run_training(_cfg(folder, descriptions, out, epochs=1))
    values = json.loads((out / "run_config.json").read_text())
    (out / "run_config.json").write_text(json.dumps({**values, "eval_batch_size": "100"}))
    assert cli.main(["eval", str(out)]) == 2
    err = capsys.readouterr().err
    assert "run_config.json: eval_batch_size must be int, got '100'" in err and "Traceback" not in err


def test_classes_short_of_shots_are_recorded_in_results(folder, descriptions, tmp_path, capsys):
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # one plain log line, not also a UserWarning
        warnings.simplefilter("always")
        result = run_training(_cfg(folder, descriptions, tmp_path / "run", shots=16, epochs=1))
    assert not [w for w in caught if "fewer than" in str(w.message)]
    lines = [line for line in capsys.readouterr().err.splitlines() if "fewer than" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: train classes with fewer than the shots asked")
    short = json.loads((tmp_path / "run" / "results.json").read_text())["classes_short_of_shots"]
    assert short == {"train": {name: 6 for name in ("circle", "cross", "square", "stripe")}}  # val: never used
    assert result.results["classes_short_of_shots"] == short


# ---------------------------------------------------------------------- everything checked before the model
def _unreadable_image(tmp_path, folder) -> list[str]:
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    for path in sorted(bad.rglob("*.png")):
        path.write_bytes(b"not an image")
    return ["--data", str(bad)]


@pytest.mark.parametrize("case, message", [
    (["--tau", "nan"], "--tau must be a finite number"),
    (["--kd-weight", "inf"], "--kd-weight must be a finite number"),
    (["--stage1-mse-weight", "-1"], "--stage1-mse-weight must be > 0"),
    (["--kd-normalization", "per-class"], "unknown --kd-normalization 'per-class'"),
    (["--workers", "-2"], "--workers must be >= 0"),
    (["--shots", "-3"], "--shots must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--device", "gpu9"], "unknown --device 'gpu9'"),
    ("output-under-file", "is a file, not a directory"),
    ("unreadable-image", "image(s) cannot be read"),
    ("missing-class-description", "has no descriptions for 1 class"),
])
def test_bad_options_and_inputs_fail_before_the_model_is_built(folder, descriptions, tmp_path, monkeypatch, capsys,
                                                              case, message):
    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was built before the bad input was found")

    monkeypatch.setattr(run_module, "build_model", no_model)
    args = ["train", "--data", str(folder), "--descriptions", str(descriptions), "-o", str(tmp_path / "run"), *FAST]
    if case == "output-under-file":
        (tmp_path / "file").write_text("x")
        args += ["-o", str(tmp_path / "file" / "run")]
    elif case == "unreadable-image":
        args += _unreadable_image(tmp_path, folder)
    elif case == "missing-class-description":
        names = D.read_image_folder(folder)[1]
        partial = tmp_path / "partial.json"
        partial.write_text(json.dumps({n: [f"a {n}."] for n in names[1:]}))
        args += ["--descriptions", str(partial)]
    else:
        args += case
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "run_config.json").exists()


# ---------------------------------------------------------------------- registry.save_learner: complete or absent
def _coop(open_clip_model, tokenizer, shift: float = 0.0):
    choice, settings = registry.parse_method("coop"), registry.MethodSettings(tokenizer=tokenizer)
    learner = choice.method.build(open_clip_model, ["cat", "dog"], settings)
    with torch.no_grad():
        learner.soft.add_(shift)
    return learner, choice, settings


def _killed_at_call(n: int, real):
    """A stand-in for ``real`` that raises :class:`Killed` at its ``n``-th call (``real`` runs before that)."""
    calls = []

    def call(*args):
        calls.append(args)
        if len(calls) == n:
            raise Killed()
        return real(*args)

    return call


def _load_soft(directory: Path, open_clip_model, tokenizer) -> torch.Tensor:
    return registry.load_learner(directory, open_clip_model, ["cat", "dog"], tokenizer=tokenizer)[0].soft.detach()


def test_an_interrupted_save_learner_leaves_the_previous_save(open_clip_model, tokenizer, tmp_path, monkeypatch):
    directory = tmp_path / "learner"
    old, choice, settings = _coop(open_clip_model, tokenizer)
    registry.save_learner(old, choice, settings, directory, run_id="run-a")
    assert read_manifest(directory)["run_id"] == "run-a"
    new = _coop(open_clip_model, tokenizer, shift=1.0)[0]
    monkeypatch.setattr(_files, "write_bytes", _killed_at_call(2, _files.write_bytes))  # weights staged, then killed
    with pytest.raises(Killed):
        registry.save_learner(new, choice, settings, directory, run_id="run-b")
    monkeypatch.undo()
    assert torch.equal(_load_soft(directory, open_clip_model, tokenizer), old.soft.detach())
    assert read_manifest(directory)["run_id"] == "run-a"

    # killed once the new set was complete (staged), before it was moved in: the new save is the one read
    monkeypatch.setattr(_files, "_finish_commit", _killed_at_call(1, None))
    with pytest.raises(Killed):
        registry.save_learner(new, choice, settings, directory, run_id="run-b")
    monkeypatch.undo()
    assert torch.equal(_load_soft(directory, open_clip_model, tokenizer), new.soft.detach())


def test_a_first_save_learner_interrupted_does_not_load(open_clip_model, tokenizer, tmp_path, monkeypatch):
    learner, choice, settings = _coop(open_clip_model, tokenizer)
    monkeypatch.setattr(_files, "write_bytes", _killed_at_call(2, _files.write_bytes))
    with pytest.raises(Killed):
        registry.save_learner(learner, choice, settings, tmp_path / "learner")
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="not a saved learner"):
        registry.load_learner(tmp_path / "learner", open_clip_model, ["cat", "dog"], tokenizer=tokenizer)


@pytest.mark.parametrize("damage", ["flipped-byte", "truncated"])
def test_load_learner_refuses_a_file_that_differs_from_the_manifest(open_clip_model, tokenizer, tmp_path, damage):
    learner, choice, settings = _coop(open_clip_model, tokenizer)
    registry.save_learner(learner, choice, settings, tmp_path / "learner")
    weights = tmp_path / "learner" / registry.LEARNER_WEIGHTS
    data = bytearray(weights.read_bytes())
    if damage == "truncated":  # a half-written file: not a safetensors parse error, the manifest's message
        data = data[: len(data) // 2]
    else:
        data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(_files.IncompleteSaveError, match="does not match .*anchoropt_manifest.json .*save it again"):
        registry.load_learner(tmp_path / "learner", open_clip_model, ["cat", "dog"], tokenizer=tokenizer)


def test_a_learner_saved_without_a_manifest_still_loads(open_clip_model, tokenizer, tmp_path):
    """The layout the previous anchoropt wrote: learner.safetensors + learner.json, no manifest."""
    learner, choice, settings = _coop(open_clip_model, tokenizer, shift=0.5)
    registry.save_learner(learner, choice, settings, tmp_path / "learner")
    (tmp_path / "learner" / _files.MANIFEST_NAME).unlink()
    assert sorted(p.name for p in (tmp_path / "learner").iterdir()) == [registry.LEARNER_CONFIG,
                                                                        registry.LEARNER_WEIGHTS]
    assert torch.equal(_load_soft(tmp_path / "learner", open_clip_model, tokenizer), learner.soft.detach())


def test_a_run_s_learner_dir_carries_its_run_id(folder, descriptions, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    first = run_training(_cfg(folder, descriptions, a, method="coop", epochs=1)).results
    run_training(_cfg(folder, descriptions, b, method="coop", epochs=1, seed=2))
    assert read_manifest(a / "learner")["run_id"] == first["run_id"]
    (a / "learner" / _files.MANIFEST_NAME).unlink()  # as an older anchoropt wrote it: still evaluates
    assert run_evaluation(a)["results"] == first["results"]
    shutil.rmtree(a / "learner")
    shutil.copytree(b / "learner", a / "learner")
    with pytest.raises(rundir.RunDirectoryError, match="mixes parts of different runs.*learner/ is from run"):
        run_evaluation(a)
