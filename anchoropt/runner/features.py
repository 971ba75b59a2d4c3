"""Frozen image features shared by every run that sees the same images without augmentation.

With ``--augment none`` an image's feature depends only on the model and the test transform, so a grid
(methods x datasets x seeds) encodes each image once: :class:`FeatureStore` keeps ``path -> (E,)`` features,
encodes the images it has not seen in batches, and persists them to one safetensors file per model
(``OUT/features/<key>.safetensors``, written atomically) that the grid's worker processes read.  Each
feature remembers its file's content (a BLAKE2b digest of the bytes) with its size and change times, as git's
index does: while size, mtime and ctime are unchanged the file is trusted; otherwise its bytes are hashed and
an image whose content changed (a dataset made again in the same folder, a file replaced by one of the same size
with its mtime set back) is encoded again.  A store holds L2-normalised features (``normalize=True``, what every method
but DePT reads) or raw ones (``normalize=False``, DePT's ``image_input="raw_features"``; its own file,
``<key>-raw.safetensors``).

Axes: ``N`` images, ``E`` joint-embedding width.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from .. import _files
from ..datasets import folders as D
from .models import ModelBundle, encode_images, encode_images_raw

__all__ = ["FeatureStore", "feature_key", "RAW_SUFFIX"]

RAW_SUFFIX = "-raw"
"""What :func:`feature_key` appends for features that are not L2-normalised (their file sits beside the others)."""


def feature_key(model: str, pretrained: str | None, precision: str, normalize: bool = True) -> str:
    """A short file-name-safe key of what the features depend on (the model, its weights, the precision, and
    ``-raw`` for features that are not L2-normalised)."""
    weights = str(pretrained)
    if pretrained and Path(pretrained).is_file():
        stat = Path(pretrained).stat()
        weights = f"{Path(pretrained).resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    digest = hashlib.sha256(json.dumps([model, weights, precision]).encode()).hexdigest()[:16]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in Path(model).name)
    return f"{safe}-{digest}" + ("" if normalize else RAW_SUFFIX)


class FeatureStore:
    """``path -> feature`` for one frozen model and its test transform.

    Args:
        bundle: the frozen model and transforms.
        file: a safetensors file to load from (if it exists) and :meth:`save` to; ``None`` keeps it in memory.
        batch_size: images per image-tower call.
        workers: DataLoader workers.
        normalize: L2-normalised features (default) or the image tower's raw output.
    """

    def __init__(self, bundle: ModelBundle, file: str | os.PathLike | None = None, batch_size: int = 100,
                 workers: int = 0, normalize: bool = True):
        self.bundle, self.batch_size, self.workers = bundle, batch_size, workers
        self.normalize = bool(normalize)
        self.file = Path(file) if file else None
        self._index: dict[str, int] = {}
        self._rows: list[torch.Tensor] = []
        self._stamps: list[list] = []  # [size, mtime_ns, ctime_ns, digest] of each row's file when encoded
        self.encoded = 0  # images this store ran through the image tower (the rest came from the file)
        if self.file is not None and self.file.is_file():
            self._load(self.file)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, path: str) -> bool:
        return str(path) in self._index

    def table(self, records: Sequence[D.Record]) -> torch.Tensor:
        """Features ``(len(records), E)`` float32 in record order (missing images are encoded now)."""
        self.add(records)
        if not records:
            return torch.zeros(0, self._width())
        rows = torch.stack([self._rows[self._index[str(r.path)]] for r in records])
        return rows.to(self._device())

    @torch.no_grad()
    def add(self, records: Sequence[D.Record]) -> int:
        """Encode the images of ``records`` not in the store yet; returns how many were encoded."""
        from torch.utils.data import DataLoader

        missing, seen = [], set()
        for record in records:
            key = str(record.path)
            if key in seen:
                continue
            row = self._index.get(key)
            if row is None or not self._still_valid(row, key):
                missing.append(record)
                seen.add(key)
        if not missing:
            return 0
        stamps = [_stamp(str(record.path)) for record in missing]  # before reading: a later change is seen
        loader = DataLoader(D.ImageDataset(missing, self.bundle.test_transform), batch_size=self.batch_size,
                            num_workers=self.workers, generator=torch.Generator())
        encode = encode_images if self.normalize else encode_images_raw
        chunks = [encode(self.bundle.model, images.to(self._device())).cpu() for images, _, _ in loader]
        for record, row, stamp in zip(missing, torch.cat(chunks), stamps):
            key = str(record.path)
            if key in self._index:  # rewritten since: replace in place
                self._rows[self._index[key]], self._stamps[self._index[key]] = row, stamp
                continue
            self._index[key] = len(self._rows)
            self._rows.append(row)
            self._stamps.append(stamp)
        self.encoded += len(missing)
        return len(missing)

    def save(self, file: str | os.PathLike | None = None) -> Path:
        """Write every feature to ``file`` (default: the store's file), atomically."""
        from safetensors.torch import save_file

        target = Path(file) if file else self.file
        if target is None:
            raise ValueError("this feature store has no file to save to")
        target.parent.mkdir(parents=True, exist_ok=True)
        paths = sorted(self._index, key=self._index.get)
        features = torch.stack(self._rows) if self._rows else torch.zeros(0, 0)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        stamps = [self._stamps[self._index[p]] for p in paths]
        try:
            save_file({"features": features.contiguous()}, str(partial),
                      metadata={"paths": json.dumps(paths), "stamps": json.dumps(stamps),
                                **({} if self.normalize else {"normalized": "false"})})
        except BaseException:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise
        return _files.replace_fsynced(partial, target)

    def _load(self, file: Path) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as handle:
                metadata = handle.metadata() or {}
                features = handle.get_tensor("features")
        except Exception as err:  # safetensors raises its own error types for a damaged or truncated file
            raise ValueError(f"{file} is not a readable image-feature cache ({type(err).__name__}: {err}): it was "
                             "cut short or damaged; delete it and it is written again") from err
        if (metadata.get("normalized", "true") == "true") != self.normalize:
            kind = "L2-normalised" if self.normalize else "raw"
            raise ValueError(f"{file} does not hold {kind} image features; use another file for this store")
        paths = json.loads(metadata.get("paths", "[]"))
        stamps = json.loads(metadata.get("stamps", "null")) or [[-1, -1]] * len(paths)
        if not len(paths) == len(stamps) == features.shape[0]:
            raise ValueError(f"{file}: {len(paths)} paths but {features.shape[0]} features; delete the file")
        for path, stamp, row in zip(paths, stamps, features):
            self._index[path] = len(self._rows)
            self._rows.append(row.float())
            self._stamps.append(list(stamp))

    def _still_valid(self, row: int, path: str) -> bool:
        """Whether the feature of ``row`` is still that of ``path``'s content: equal stat data (size, mtime and
        ctime, which no program can set back) or, when they differ, an equal content digest (the stamp is then
        refreshed)."""
        saved, now = self._stamps[row], _stat(path)
        if len(saved) == 4 and now is not None and saved[:3] == now and saved[3] is not None:
            return True
        if now is None or len(saved) != 4 or saved[0] != now[0]:
            return False
        current = _stamp(path)
        if current[3] is None or current[3] != saved[3]:
            return False
        self._stamps[row] = current
        return True

    def _device(self) -> torch.device:
        return next(self.bundle.model.parameters()).device

    def _width(self) -> int:
        if self._rows:
            return int(self._rows[0].shape[0])
        from ..towers import TextTower

        return TextTower.from_model(self.bundle.model).output_dim


def _stat(path: str) -> list[int] | None:
    """``[size, mtime_ns, ctime_ns]`` of a file (``None`` when it cannot be read)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [int(stat.st_size), int(stat.st_mtime_ns), int(stat.st_ctime_ns)]


def _stamp(path: str) -> list:
    """``[size, mtime_ns, ctime_ns, digest]`` of an image file: its stat data and a BLAKE2b digest of its bytes
    (``[-1, -1, -1, None]`` when it cannot be read: it is then encoded again)."""
    before = _stat(path)
    try:
        digest = hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()
    except OSError:
        return [-1, -1, -1, None]
    if before is None or before != _stat(path):  # changed while read: never trusted on stat data alone
        return [-1, -1, -1, digest]
    return [*before, digest]
