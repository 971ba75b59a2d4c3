"""Writing files so that an interruption loses nothing: atomic single files and complete-or-absent file sets.

* :func:`write_bytes` / :func:`write_text` / :func:`write_json` / :func:`save_figure`: the data goes to a
  temporary file in the same directory, is flushed and fsynced, then ``os.replace``-d over the target.  A
  reader sees the old file or the new one, never a part.
* :func:`commit_files` / :func:`read_committed`: several files that belong together (weights + config) in
  one directory, with a manifest (file names, sizes, sha256, format version) written **last**.  The files
  are first written into ``DIR/.anchoropt-staging/`` (manifest last), then moved into ``DIR`` one by one,
  the manifest last of all.  The reader takes the staged manifest when one is there (the previous commit
  was interrupted after the new set was complete: each file is found in the staging folder or already moved)
  and ``DIR``'s manifest otherwise (a staging folder without a manifest is an unfinished write: ignored, the
  previous set is untouched).  Every file is checked against the manifest's sha256, so an interrupted or
  mixed set never reads as complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = [
    "MANIFEST_NAME",
    "STAGING_NAME",
    "IncompleteSaveError",
    "write_bytes",
    "write_text",
    "write_json",
    "save_figure",
    "commit_files",
    "read_committed",
    "sha256",
]

MANIFEST_NAME = "anchoropt_manifest.json"
STAGING_NAME = ".anchoropt-staging"
MANIFEST_VERSION = 1


class IncompleteSaveError(ValueError):
    """A saved file set whose files do not match its manifest (an interrupted, mixed or edited save)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, ``os.replace``)."""
    path = Path(path)
    _parent_dir(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; a saved file gets the mode open() would give it
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename is None:  # e.g. ENOSPC from write(): name the file
            raise type(err)(err.errno, err.strerror, str(path)) from err
        raise
    _fsync_dir(path.parent)
    return path


def replace_fsynced(partial: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Finish a file another library wrote to ``partial`` (safetensors, matplotlib): fsync it, ``os.replace``
    it over ``target``, fsync the directory; ``partial`` is removed when this fails."""
    partial, target = Path(partial), Path(target)
    try:
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    _fsync_dir(target.parent)
    return target


_OS_ERROR_FIXES = {
    errno.ENOSPC: "no space left on the device: free some space, or write somewhere else",
    errno.EDQUOT: "disk quota exceeded: free some space, or write somewhere else",
    errno.EFBIG: "file too large for this file system or limit: write somewhere else",
    errno.EROFS: "read-only file system: write somewhere else",
    errno.EACCES: "permission denied: make it writable, or write somewhere else",
    errno.EPERM: "operation not permitted: make it writable, or write somewhere else",
    errno.ENOTDIR: "a part of this path is a file, not a directory: choose another path",
    errno.EISDIR: "this is a directory, not a file: choose another path",
}


def describe_os_error(err: OSError, where: str | os.PathLike | None = None) -> str:
    """One line for an ``OSError`` a command met (a full disk, a read-only or blocked output): the path (the
    error's own file name, else ``where``, e.g. the command's output) and what to do."""
    path = err.filename or where
    if err.filename2:
        path = f"{err.filename} -> {err.filename2}"
    return f"{path}: {os_error_reason(err)}" if path else os_error_reason(err)


def os_error_reason(err: OSError) -> str:
    """What went wrong and what to do, for the common ``errno`` values (the system's words otherwise)."""
    return _OS_ERROR_FIXES.get(err.errno, err.strerror or str(err))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_bytes` of UTF-8 ``text``."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """``value`` as indented JSON (non-ASCII kept), written atomically."""
    return write_text(path, json_text(value))


def json_text(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def csv_text(rows: Iterable[Mapping[str, Any]], empty_header: Iterable[str] = ()) -> str:
    """``rows`` as CSV: a header of the union of their keys in first-seen order (``empty_header`` when there are
    no rows), empty cells where a row lacks a key or holds ``None``."""
    import csv
    import io

    rows = list(rows)
    columns = list(dict.fromkeys(key for row in rows for key in row)) or list(empty_header)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return buffer.getvalue()


def save_figure(figure, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """``figure.savefig`` to ``path`` atomically (the format comes from ``path``'s suffix)."""
    import io

    path = Path(path)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    return write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------------- file sets with a manifest
def commit_files(directory: str | os.PathLike, files: Mapping[str, bytes], info: Mapping[str, Any] | None = None,
                 known: Iterable[str] = ()) -> Path:
    """Write ``files`` (name -> bytes) into ``directory`` as one complete-or-absent set.

    ``info`` (JSON-able, e.g. tensor shapes or a run id) goes into the manifest.  Files of ``directory``
    not named in ``files`` are left alone (a directory may hold other things); a file of the previous set
    that the new set lacks is removed only when its name is one of ``known`` (the file names this kind of
    save writes, e.g. a checkpoint's trainer state): any other name an old manifest lists (a hand-edited or
    hostile one: ``../x``, an absolute path, a file of the user's) is never touched.
    """
    directory = Path(directory)
    _parent_dir(directory / "x")
    staging = directory / STAGING_NAME
    known = frozenset(known) | frozenset(files)
    if (staging / MANIFEST_NAME).is_file():  # a previous commit was interrupted after its set was complete
        try:
            _finish_commit(directory, known)
        except IncompleteSaveError as err:  # not a set this code staged: drop it, keep the previous set
            warnings.warn(f"{staging}: discarding an unfinished save that cannot be completed ({err})",
                          stacklevel=2)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    manifest = {
        "format": "anchoropt-manifest",
        "manifest_version": MANIFEST_VERSION,
        "files": {name: {"size": len(data), "sha256": sha256(data)} for name, data in files.items()},
        **dict(info or {}),
    }
    for name, data in files.items():
        _check_name(name)
        write_bytes(staging / name, data)
    write_text(staging / MANIFEST_NAME, json_text(manifest))
    _finish_commit(directory, known)
    return directory


def _finish_commit(directory: Path, known: frozenset[str]) -> None:
    """Move a complete staged set into ``directory``, the manifest last, then drop the staging folder.

    Of the previous manifest's files, only those named in ``known`` are removed (:func:`_own_old_files`).
    """
    staging = directory / STAGING_NAME
    manifest = _read_manifest(staging / MANIFEST_NAME)
    old = directory / MANIFEST_NAME
    old_files = _own_old_files(old, known)
    for name in manifest["files"]:
        if (staging / name).is_file():
            os.replace(staging / name, directory / name)
    _fsync_dir(directory)
    os.replace(staging / MANIFEST_NAME, old)
    _fsync_dir(directory)
    for name in old_files - set(manifest["files"]):
        with contextlib.suppress(OSError):
            (directory / name).unlink()
    shutil.rmtree(staging, ignore_errors=True)


def _own_old_files(old_manifest: Path, known: frozenset[str]) -> set[str]:
    """The files of the previous set in ``old_manifest`` that a new commit may remove: plain names of this
    directory that are in ``known``.  Other names (``../x``, ``/abs/path``, a file of the user's) are left
    alone (a warning names those outside the folder); an unreadable old manifest is replaced and removes
    nothing."""
    if not old_manifest.is_file():
        return set()
    try:
        listed = json.loads(old_manifest.read_bytes()).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    if not isinstance(listed, dict):
        warnings.warn(f"{old_manifest} is not a readable anchoropt manifest: it is replaced and none of the "
                      "files it may list is removed", stacklevel=4)
        return set()
    outside = sorted(str(name) for name in listed if not _plain_name(name))
    if outside:
        warnings.warn(f"{old_manifest} lists names outside its folder ({', '.join(map(repr, outside[:5]))}): a "
                      "hand-edited or hostile manifest; those files are left in place, not removed", stacklevel=4)
    return {name for name in listed if _plain_name(name) and name in known}


def _plain_name(name: object) -> bool:
    """Whether ``name`` is a plain file name of its directory (no separator, not ``.``/``..``, not absolute,
    not hidden, not the manifest itself): the only names a committed set may list."""
    return (isinstance(name, str) and bool(name) and name not in (".", "..") and "/" not in name
            and "\\" not in name and "\0" not in name and not name.startswith(".") and name != MANIFEST_NAME
            and not os.path.isabs(name) and Path(name).name == name)


def read_committed(directory: str | os.PathLike, names: tuple[str, ...] | None = None) -> tuple[dict, dict[str, bytes]] | None:
    """``(manifest, {name: bytes})`` of the complete set in ``directory``; ``None`` when it has no manifest.

    Raises :class:`IncompleteSaveError` when a file is missing or differs from the manifest.
    ``names`` restricts which files are read (all of the manifest's by default).
    """
    directory = Path(directory)
    staged = directory / STAGING_NAME / MANIFEST_NAME
    manifest_path = staged if staged.is_file() else directory / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    manifest = _read_manifest(manifest_path)
    out = {}
    for name, entry in manifest["files"].items():
        if names is not None and name not in names:
            continue
        data = _matching_copy(directory, name, entry)
        if data is None:
            raise IncompleteSaveError(
                f"{directory / name} is missing or does not match {manifest_path} (size / sha256): the save "
                "was interrupted, mixed with another save, or edited afterwards; save it again"
            )
        out[name] = data
    return manifest, out


def _matching_copy(directory: Path, name: str, entry: Mapping) -> bytes | None:
    for candidate in (directory / STAGING_NAME / name, directory / name):
        if candidate.is_file():
            data = candidate.read_bytes()
            if len(data) == entry.get("size") and sha256(data) == entry.get("sha256"):
                return data
    return None


def _read_manifest(path: Path) -> dict:
    from ._jsonfile import read_json

    manifest = read_json(path, f"manifest not found: {path}", IncompleteSaveError)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or manifest.get("format") != "anchoropt-manifest"
            or not all(isinstance(v, dict) for v in files.values())):
        raise IncompleteSaveError(f"{path} is not an anchoropt manifest")
    outside = [name for name in files if not _plain_name(name)]
    if outside:
        raise IncompleteSaveError(f"{path} lists {outside[0]!r}, not a plain file name of its folder (a hand-edited "
                                  "or hostile manifest); save the set again")
    if not isinstance(manifest.get("manifest_version"), int) or manifest["manifest_version"] > MANIFEST_VERSION:
        raise IncompleteSaveError(
            f"{path} has manifest_version {manifest.get('manifest_version')!r}; this anchoropt reads "
            f"versions up to {MANIFEST_VERSION} (upgrade anchoropt)"
        )
    return manifest


def _check_name(name: str) -> None:
    if not _plain_name(name):
        raise ValueError(f"invalid file name in a committed set: {name!r}")


def _parent_dir(path: Path) -> None:
    parent = path.parent
    for up in (parent, *parent.parents):
        if up.exists():
            if not up.is_dir():
                raise NotADirectoryError(f"cannot write {path}: {up} is a file, not a directory")
            break
    parent.mkdir(parents=True, exist_ok=True)


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # pragma: no cover - directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
