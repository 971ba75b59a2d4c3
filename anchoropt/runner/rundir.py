"""A run directory's safety: one run at a time (a lock file), no silent overwrite of a finished run, resumable
checkpoints, and a run id written into every part so that parts of two runs are never taken as one.

Parts of a run directory and where each records the run id::

    run_config.json          "run_id"
    anchors.safetensors      metadata "run_id"
    stage1.json              "run_id"
    prompt_learner/          manifest "run_id"   (AnchorOPT's learner)
    learner/                 manifest "run_id"   (any other method's; older anchoropt wrote none)
    checkpoints/last/        manifest "run_id"; + trainer_state.safetensors / trainer_state.json (for --resume)
    results.json             "run_id"   (written last: a directory with it holds a finished run)
    .anchoropt.lock          the pid / host of the run writing the directory (removed when it ends)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .. import _files
from .._jsonfile import read_json
from .config import RESULTS, RUN_CONFIG

LOCK_NAME = ".anchoropt.lock"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last"
STAGE1 = "stage1.json"
TRAINER_TENSORS = "trainer_state.safetensors"
TRAINER_INFO = "trainer_state.json"
# what `train --overwrite` removes before starting (so no part of the old run can mix with the new one)
RUN_PARTS = (RESULTS, "eval_results.json", "prompt_learner", "anchors.safetensors", CHECKPOINTS, "plots", STAGE1,
             RUN_CONFIG, "metrics.jsonl", "metrics.csv", "tensorboard")


class RunDirectoryError(ValueError):
    """A run directory that cannot be used as asked (finished, interrupted, locked, or mixing two runs)."""


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


# ---------------------------------------------------------------------- state of a directory
def run_state(out: Path) -> str:
    """``"empty"`` (no run), ``"finished"`` (results.json) or ``"interrupted"`` (a run started, not finished)."""
    if (out / RESULTS).is_file():
        return "finished"
    if (out / RUN_CONFIG).is_file():
        return "interrupted"
    return "empty"


def check_writable(out: Path) -> None:
    """Refuse an output directory that is a file, lies under one, or cannot be created / written."""
    for up in (out, *out.parents):
        if up.exists():
            if not up.is_dir():
                raise RunDirectoryError(f"--output {out}: {up} is a file, not a directory; choose another --output")
            if not os.access(up, os.W_OK | os.X_OK):
                raise RunDirectoryError(f"--output {out}: {up} is not writable; choose another --output")
            return


def check_output(out: Path, overwrite: bool, resume: bool) -> str:
    """Refuse an output that :func:`check_writable` refuses, a finished run (unless ``overwrite``) and an
    interrupted one (unless ``resume`` or ``overwrite``); returns the directory's :func:`run_state`."""
    check_writable(out)
    if overwrite and resume:
        raise RunDirectoryError("--overwrite and --resume exclude each other: start over, or continue")
    state = run_state(out)
    if state == "finished" and not overwrite:
        raise RunDirectoryError(
            f"{out} holds a finished run ({RESULTS}); pass --overwrite to replace it, or choose another --output"
            + (" (there is nothing to resume)" if resume else "")
        )
    if state == "interrupted" and not (resume or overwrite):
        raise RunDirectoryError(
            f"{out} holds an interrupted run ({RUN_CONFIG} but no {RESULTS}): continue it with --resume, "
            "start over with --overwrite, or choose another --output"
        )
    if state == "empty" and resume:
        raise RunDirectoryError(f"--resume: {out} holds no run to continue ({RUN_CONFIG} not found)")
    return state


def clear_run(out: Path) -> None:
    """Remove a previous run's parts (``--overwrite``), results first so the directory never looks finished."""
    for name in RUN_PARTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ---------------------------------------------------------------------- lock
@contextlib.contextmanager
def locked(out: Path, what: str = "a run") -> Iterator[None]:
    """Hold ``out/.anchoropt.lock`` while the body runs; refuse when a live process holds it.

    A lock left by a process that no longer runs (same host) is taken over with a warning.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "what": what}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is not None and _alive(holder):
                raise RunDirectoryError(
                    f"{out} is in use by {holder.get('what', 'a run')} (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {holder.get('started')}): two runs cannot share a directory; "
                    f"wait for it or choose another --output (delete {path} if that process is gone)"
                ) from None
            warnings.warn(f"{path}: taking over a lock left by a process that no longer runs ({holder})",
                          stacklevel=3)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if (_lock_holder(path) or {}).get("pid") == os.getpid():
                path.unlink()


def _lock_holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process: cannot tell, so assume it runs
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------- run id of each part
def part_run_ids(run_dir: Path) -> dict[str, str | None]:
    """The run id recorded by each present part of ``run_dir`` (``None`` for a part written without one)."""
    from ..io import anchors_run_id, read_manifest

    ids: dict[str, str | None] = {}
    for name in (RUN_CONFIG, RESULTS, STAGE1):
        if (run_dir / name).is_file():
            value = read_json(run_dir / name, "")
            ids[name] = value.get("run_id") if isinstance(value, dict) else None
    if (run_dir / "anchors.safetensors").is_file():
        ids["anchors.safetensors"] = anchors_run_id(run_dir / "anchors.safetensors")
    if (run_dir / "prompt_learner").is_dir():
        manifest = read_manifest(run_dir / "prompt_learner")
        ids["prompt_learner/"] = None if manifest is None else manifest.get("run_id")
    if (run_dir / "learner").is_dir():
        manifest = read_manifest(run_dir / "learner")
        if manifest is not None:  # learner/ without a manifest: written before it had one (no run id to check)
            ids["learner/"] = manifest.get("run_id")
    return ids


def check_one_run(run_dir: Path) -> str | None:
    """Refuse a run directory whose parts carry different run ids (an interrupted re-run into it, or files
    copied together from two runs); returns the run id (``None`` for a directory written before run ids)."""
    ids = part_run_ids(run_dir)
    run_id = ids.get(RUN_CONFIG)
    if run_id is None:
        return None
    others = {name: value for name, value in ids.items() if value != run_id}
    if others:
        listing = ", ".join(f"{name} is from run {value}" for name, value in others.items())
        raise RunDirectoryError(
            f"{run_dir} mixes parts of different runs: {RUN_CONFIG} is from run {run_id}, but {listing}; "
            "re-run `anchoropt train` into it with --resume or --overwrite"
        )
    return run_id


# ---------------------------------------------------------------------- checkpoints for --resume
def save_checkpoint(directory: Path, learner: nn.Module, run_id: str, state: dict[str, Any],
                    tensors: dict[str, torch.Tensor]) -> None:
    """Learner + trainer state (``state`` JSON-able, ``tensors`` e.g. optimizer buffers and RNG states) as
    one complete-or-absent set whose manifest records ``run_id``.

    An :class:`~anchoropt.prompts.AnchorOPTPromptLearner` is written as its ``prompt_learner/`` set
    (:func:`anchoropt.io.save_prompt_learner`); any other learner (CoOp, ATPrompt, CoCoOp, MaPLe, DePT ...)
    as its ``state_dict()`` in ``anchoropt.safetensors``, as :func:`anchoropt.methods.registry.save_learner` saves it.
    A learner's state holds only what it learns (and its Stage I anchors): the method modules keep the frozen
    CLIP towers as plain references, not submodules (MaPLe's image tower too), so no frozen CLIP weight is
    written into a checkpoint.
    """
    from safetensors.torch import save as safetensors_bytes

    from ..io import WEIGHTS_NAME, save_prompt_learner, state_tensors, tensor_shapes
    from ..prompts import AnchorOPTPromptLearner

    extra = {
        TRAINER_TENSORS: safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}),
        TRAINER_INFO: _files.json_text({**state, "run_id": run_id}).encode("utf-8"),
    }
    if isinstance(learner, AnchorOPTPromptLearner):
        save_prompt_learner(learner, directory, run_id=run_id, extra_files=extra)
        return
    weights = state_tensors(learner)
    files = {WEIGHTS_NAME: safetensors_bytes(weights, metadata={"format": "anchoropt"}), **extra}
    _files.commit_files(directory, files, {"kind": "learner_checkpoint", "learner": type(learner).__name__,
                                           "tensors": tensor_shapes(weights), "run_id": run_id})


def latest_checkpoint(out: Path, run_id: str | None) -> tuple[Path, dict, dict, dict[str, torch.Tensor]] | None:
    """``(directory, state, trainer tensors, learner state dict)`` of the complete checkpoint of run ``run_id``
    with the most epochs done (either kind :func:`save_checkpoint` writes); incomplete or foreign ones are
    skipped (with a warning)."""
    from safetensors.torch import load as load_safetensors_bytes

    from ..io import WEIGHTS_NAME

    best = None
    for directory in sorted((out / CHECKPOINTS).glob("*")):
        try:
            committed = _files.read_committed(directory, names=(TRAINER_TENSORS, TRAINER_INFO, WEIGHTS_NAME))
        except (ValueError, OSError) as err:
            warnings.warn(f"skipping checkpoint {directory}: {err}", stacklevel=2)
            continue
        if committed is None or TRAINER_INFO not in committed[1]:
            continue
        manifest, files = committed
        if run_id is not None and manifest.get("run_id") != run_id:
            warnings.warn(f"skipping checkpoint {directory}: it belongs to run {manifest.get('run_id')}", stacklevel=2)
            continue
        state = json.loads(files[TRAINER_INFO])
        if best is None or state["epochs_done"] > best[1]["epochs_done"]:
            best = (directory, state, load_safetensors_bytes(files[TRAINER_TENSORS]),
                    load_safetensors_bytes(files[WEIGHTS_NAME]))
    return best
