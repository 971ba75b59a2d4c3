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


def recheck_output(out: Path, overwrite: bool, resume: bool, run_id: str | None = None) -> str:
    """:func:`check_output` again once ``out``'s lock is held (another process may have finished or replaced
    the run between the first check and the lock); with ``resume``, the run must still be run ``run_id``."""
    state = check_output(out, overwrite, resume)
    if resume and run_id is not None:
        values = read_json(out / RUN_CONFIG, f"{out / RUN_CONFIG} not found", RunDirectoryError)
        now = values.get("run_id") if isinstance(values, dict) else None
        if now != run_id:
            raise RunDirectoryError(f"--resume: {out} now holds run {now}, not run {run_id} (another process "
                                    "replaced it meanwhile); check it, then resume or start over with --overwrite")
    return state


def clear_unfinished(run_dir: Path, what: str) -> bool:
    """Remove the parts of the unfinished run in ``run_dir`` while holding its lock (refused while a live
    process holds it); ``False`` (nothing removed) when the run turns out finished once the lock is held."""
    with locked(run_dir, what):
        if run_state(run_dir) == "finished":
            return False
        for child in run_dir.iterdir():
            if child.name == LOCK_NAME:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    return True


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

    The lock appears in one step with its owner written in it (:func:`_create_lock`: a complete temporary file
    hard-linked to the lock's name, which fails when the name exists), so a lock is never seen half-written.
    A lock left by a process that no longer runs (same host) is taken over with a warning, by one process at a
    time (:func:`_takeover_guard`), so two takers never both hold it; a lock file that cannot be read is
    refused (delete it by hand once no process uses the directory), never taken as stale.
    """
    _parent_or_error(out)
    path = out / LOCK_NAME
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "what": what, "token": uuid.uuid4().hex}
    for _ in range(3):
        if _create_lock(path, record):
            break
        with _takeover_guard(out):
            try:
                holder = _lock_record(path.read_bytes())
            except FileNotFoundError:  # released in the meantime: try again
                continue
            if holder is None:
                raise RunDirectoryError(
                    f"{path} exists but is not a readable lock (another anchoropt may be creating it, or it was "
                    f"left by an old anchoropt): if no process uses {out}, delete {path} and run again"
                )
            if _alive(holder):
                raise RunDirectoryError(
                    f"{out} is in use by {holder.get('what', 'a run')} (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {holder.get('started')}): two runs cannot share a directory; "
                    f"wait for it or choose another --output (delete {path} if that process is gone)"
                )
            warnings.warn(f"{path}: taking over a lock left by a process that no longer runs ({holder})",
                          stacklevel=3)
            path.unlink()  # stale; under the guard no other taker removes a lock meanwhile
            if _create_lock(path, record):
                break
    else:
        raise RunDirectoryError(f"{out}: could not take {path} (other processes keep taking it); try again")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if (_lock_holder(path) or {}).get("token") == record["token"]:
                path.unlink()


def _parent_or_error(out: Path) -> None:
    """Create ``out`` (and its parents), or raise :class:`RunDirectoryError` naming the path and the cause."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        check_writable(out)  # names a file in the way or a read-only parent
        raise RunDirectoryError(f"cannot create {out}: {_files.os_error_reason(err)} (--output)") from None


def _create_lock(path: Path, record: dict) -> bool:
    """Create ``path`` holding ``record`` in one step; ``False`` when it exists already.

    The record goes to a temporary file first (written, fsynced), which is then hard-linked to ``path``: the
    link fails when ``path`` exists, and when it succeeds the lock is complete.  On a file system without hard
    links, ``O_CREAT | O_EXCL`` is the fallback (the record written straight after).
    """
    try:
        tmp = _files.write_text(path.with_name(f"{path.name}.{os.getpid()}.{record['token'][:8]}.tmp"),
                                json.dumps(record))
    except OSError as err:  # a full disk, a read-only folder: name the lock, not its temporary file
        raise type(err)(err.errno, err.strerror, str(path)) from err
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some network / FUSE file systems)
        return _create_lock_exclusive(path, record)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _create_lock_exclusive(path: Path, record: dict) -> bool:
    """:func:`_create_lock` where hard links fail: ``O_CREAT | O_EXCL``, then the record, fsynced."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(record))
        handle.flush()
        os.fsync(handle.fileno())
    return True


@contextlib.contextmanager
def _takeover_guard(out: Path) -> Iterator[None]:
    """Serialise the taking over of stale locks of ``out``: an exclusive ``flock`` on the directory itself (no
    file is left behind; the kernel drops it when its process dies).  Without ``fcntl`` (Windows) there is no
    guard."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _lock_holder(path: Path) -> dict | None:
    try:
        return _lock_record(path.read_bytes())
    except OSError:
        return None


def _lock_record(data: bytes) -> dict | None:
    """A lock file's owner record; ``None`` when it is not one (empty, cut, not JSON)."""
    try:
        holder = json.loads(data.decode("utf-8"))
    except ValueError:
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
