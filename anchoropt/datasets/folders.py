"""Datasets for the experiment runner: ImageFolder directories and CoOp split files, the field's protocols.

A dataset is read into :class:`DatasetSplits` - lists of :class:`Record` ``(path, label, classname)`` for
``train`` / ``val`` / ``test`` and the class names indexed by label - from one of three layouts:

* a CoOp-style split file (``split_zhou_*.json``: ``{"train": [[relpath, label, classname], ...], "val": ...,
  "test": ...}``) next to, or given for, an image directory - so the standard split files work unchanged;
* a directory with ``train/`` and ``test/`` (optionally ``val/``) ImageFolder sub-directories;
* a plain ImageFolder directory (one sub-directory per class), split per class with a seed
  (:func:`split_per_class`), or read whole as a test set (cross-dataset / domain-generalisation targets).

The protocols follow Dassl / CoOp:

* :func:`few_shot` - K images per class, drawn with ``random.Random(seed)``: per class in order of first
  appearance, ``random.sample`` (``random.choices`` when a class has fewer than K), training set first,
  then the validation set with ``min(K, 4)`` shots (:func:`sample_few_shot`);
* :func:`subsample_classes` - base classes are the first ``ceil(C / 2)`` labels of the training set, novel
  classes the rest, each relabelled from 0 (Dassl's ``subsample_classes``).

Nothing here imports open_clip; :class:`ImageDataset` needs Pillow (installed with torchvision).
"""

from __future__ import annotations

import math
import os
import random
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .._jsonfile import read_json
from ..descriptions import class_key

__all__ = [
    "IMAGE_EXTENSIONS",
    "Record",
    "DatasetSplits",
    "open_dataset",
    "read_image_folder",
    "read_split_json",
    "read_classnames_file",
    "split_per_class",
    "few_shot",
    "sample_few_shot",
    "short_classes",
    "subsample_classes",
    "base_novel_split",
    "ImageDataset",
    "load_rgb",
    "make_synthetic_image_folder",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_FILE_PATTERNS = ("split_zhou_*.json", "split_*.json", "split.json")
CLASSNAMES_FILE = "classnames.txt"
IGNORED_FOLDERS = ("split_fewshot",)
"""Folders that are never classes: Dassl's few-shot cache (``split_fewshot/shot_K-seed_S.pkl``)."""
_SPLIT_FOLDERS = {"train", "val", "test"}
_WNID = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class Record:
    """One image: its file, integer label and class name (Dassl's ``Datum``)."""

    path: str
    label: int
    classname: str


@dataclass
class DatasetSplits:
    """A dataset's splits and class names (``classnames[label]``).

    Attributes:
        name: a short name for reports (the directory name by default).
        classnames: class names indexed by label.
        train, val, test: lists of :class:`Record`.
        layout: where the splits came from: ``"split_json"``, ``"subfolders"``, ``"folder_split"``
            (a plain folder split per class) or ``"folder"`` (a plain folder read whole as ``test``), or a
            dataset-specific layout of :mod:`~anchoropt.datasets.layouts` (``"imagenet"``, ...).
        root: the directory the dataset was read from.
        dataset: the Dassl / CoOp dataset class it was recognised as (``"OxfordPets"``, ``"ImageNet"``), or ``""``.
    """

    name: str
    classnames: list[str]
    train: list[Record] = field(default_factory=list)
    val: list[Record] = field(default_factory=list)
    test: list[Record] = field(default_factory=list)
    layout: str = "folder"
    root: str = ""
    dataset: str = ""

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def split(self, name: str) -> list[Record]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; choose 'train', 'val' or 'test'")
        return getattr(self, name)

    def summary(self) -> str:
        return (f"{self.name}: {self.n_classes} classes, {len(self.train)} train / {len(self.val)} val / "
                f"{len(self.test)} test images ({self.layout})")


# ---------------------------------------------------------------------- reading
def open_dataset(
    root: str | os.PathLike,
    split_json: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    classnames_file: str | os.PathLike | None = None,
    holdout: bool = True,
    p_train: float = 0.5,
    p_val: float = 0.2,
    split_seed: int = 1,
    name: str | None = None,
) -> DatasetSplits:
    """Read a dataset directory in any of the supported layouts (see the module docstring).

    Args:
        root: the dataset directory.
        split_json: a CoOp split file; by default ``root/split_zhou_*.json`` (or ``split_*.json``,
            ``split.json``) is used when there is exactly one.
        image_root: directory the split file's paths are relative to; by default the first of ``root`` and
            its sub-directories in which the split's first image exists.
        classnames_file: lines ``<folder> <class name>`` mapping folder names (e.g. WordNet ids) to class
            names, as CoOp's ImageNet ``classnames.txt``; ``root/classnames.txt`` is used when present.
        holdout: for a plain ImageFolder: split each class into train / val / test (``True``), or read all
            images as ``test`` (``False``: a cross-dataset or domain-generalisation target).
        p_train: per-class fraction of training images for the holdout split.
        p_val: per-class fraction of validation images (the rest is test).
        split_seed: seed of the holdout split (fixed per dataset, independent of the run's seed).
        name: name for reports (the directory name by default).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {root}")
    name = name or root.name
    split_json = Path(split_json) if split_json is not None else _find_split_file(root)
    if split_json is not None:
        return replace(read_split_json(split_json, image_root or _guess_image_root(split_json, root)),
                       name=name, root=str(root))
    mapping = read_classnames_file(classnames_file or root / CLASSNAMES_FILE) if (
        classnames_file or (root / CLASSNAMES_FILE).is_file()) else None
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, classnames = read_image_folder(root / "train", mapping)
        test = read_image_folder(root / "test", mapping, classnames)[0]
        val = read_image_folder(root / "val", mapping, classnames)[0] if (root / "val").is_dir() else []
        return DatasetSplits(name, classnames, train, val, test, "subfolders", str(root))
    records, classnames = read_image_folder(root, mapping)
    if not holdout:
        return DatasetSplits(name, classnames, [], [], records, "folder", str(root))
    train, val, test = split_per_class(records, p_train, p_val, split_seed)
    return DatasetSplits(name, classnames, train, val, test, "folder_split", str(root))


def read_image_folder(
    root: str | os.PathLike,
    classnames_map: dict[str, str] | None = None,
    classnames: Sequence[str] | None = None,
) -> tuple[list[Record], list[str]]:
    """Records of an ImageFolder directory and its class names.

    Classes are the sub-directories sorted by name (as torchvision's ``ImageFolder``); a class name is the
    folder name (or its entry in ``classnames_map``) with ``_`` read as a space.  Images are the files with
    an extension in :data:`IMAGE_EXTENSIONS`, found recursively, in sorted order.

    Args:
        classnames: label these folders with an existing class list instead (a test split must use the
            training split's labels); a folder whose class is not in it is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith(".")
                     and entry.name not in IGNORED_FOLDERS)
    if not folders:
        raise ValueError(f"{root} has no class sub-directories (expected an ImageFolder layout: root/<class>/*.jpg)")
    files_of = {folder: sorted(_image_files(root / folder)) for folder in folders}
    other = [f for f in folders if not files_of[f] and _holds_files(root / f)]
    if other and len(other) < len(folders):  # annotations, metadata: never classes
        warnings.warn(f"{root}: folder(s) {other[:10]} hold files but no images; they are not classes", stacklevel=2)
        folders = [f for f in folders if f not in other]
    _refuse_split_level(root, folders, classnames_map)
    names = [_clean_name((classnames_map or {}).get(folder, folder)) for folder in folders]
    _refuse_colliding(folders, names, f"{root}: class folders")
    empty = [folder for folder in folders if not files_of[folder]]
    if classnames is None:
        if empty and len(empty) < len(folders):
            raise ValueError(
                f"{root}: class folder(s) {empty[:10]} hold no images with extensions {IMAGE_EXTENSIONS}; a class "
                "without images would shift the labels and the base / novel split: add images or remove the folder(s)"
            )
        classnames = names
        label_of = {n: i for i, n in enumerate(names)}
    else:
        label_of = {n: i for i, n in enumerate(classnames)}
        unknown = [n for n in names if n not in label_of]
        if unknown:
            raise ValueError(f"{root}: class folder(s) {unknown[:5]} are not among the classes {list(classnames)[:10]}")
    if empty and len(empty) < len(folders):
        warnings.warn(f"{root}: class folder(s) {empty[:10]} hold no images; those classes are not scored here",
                      stacklevel=2)
    records = []
    for folder, name in zip(folders, names):
        records.extend(Record(str(path), label_of[name], name) for path in files_of[folder])
    if not records:
        raise ValueError(f"{root} holds no images with extensions {IMAGE_EXTENSIONS}")
    return records, list(classnames)


def read_split_json(path: str | os.PathLike, image_root: str | os.PathLike) -> DatasetSplits:
    """A CoOp split file ``{"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}``.

    Labels keep the file's order; class names come from the file (``_`` read as a space).  A label with two
    different class names is an error; labels that are not ``0 .. C-1`` are renumbered in sorted order.
    """
    path, image_root = Path(path), Path(image_root)
    raw = read_json(path, f"split file not found: {path}")
    if not isinstance(raw, dict) or "train" not in raw or "test" not in raw:
        raise ValueError(f"{path} is not a CoOp split file: expected keys 'train', 'val', 'test'")
    names: dict[int, str] = {}
    splits: dict[str, list[tuple[str, int, str]]] = {}
    for split in ("train", "val", "test"):
        rows = raw.get(split, [])
        checked = []
        for i, row in enumerate(rows):
            if not (isinstance(row, (list, tuple)) and len(row) == 3):
                raise ValueError(f"{path}: {split}[{i}] must be [path, label, classname], got {row!r}")
            if not (isinstance(row[0], str) and isinstance(row[1], int) and not isinstance(row[1], bool)
                    and isinstance(row[2], str)):
                raise ValueError(f"{path}: {split}[{i}] must be [path (text), label (integer), classname (text)], "
                                 f"got {row!r}")
            rel, label, classname = row[0], row[1], _clean_name(row[2])
            if names.setdefault(label, classname) != classname:
                raise ValueError(f"{path}: label {label} is both {names[label]!r} and {classname!r}")
            checked.append((rel, label, classname))
        splits[split] = checked
    if not names:
        raise ValueError(f"{path} lists no images")
    _refuse_colliding([f"label {label}" for label in names], list(names.values()), f"{path}: classes")
    relabel = {label: i for i, label in enumerate(sorted(names))}
    classnames = [names[label] for label in sorted(names)]
    out = {
        split: [Record(str(image_root / rel), relabel[label], classname) for rel, label, classname in rows]
        for split, rows in splits.items()
    }
    return DatasetSplits(path.stem, classnames, out["train"], out["val"], out["test"], "split_json", str(image_root))


def read_classnames_file(path: str | os.PathLike) -> dict[str, str]:
    """``{folder: class name}`` from lines ``<folder> <class name with spaces>`` (CoOp's ImageNet format)."""
    mapping = {}
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"class names file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        folder, _, name = line.partition(" ")
        if not name.strip():
            raise ValueError(f"{path}:{n}: expected '<folder> <class name>', got {line!r}")
        mapping[folder] = name.strip()
    return mapping


def split_per_class(
    records: Sequence[Record], p_train: float = 0.5, p_val: float = 0.2, seed: int = 1
) -> tuple[list[Record], list[Record], list[Record]]:
    """Shuffle each class's images with ``random.Random(seed)`` and cut them into train / val / test.

    ``round(n * p_train)`` training and ``round(n * p_val)`` validation images per class, the rest test
    (the proportions CoOp uses for datasets without an official split, e.g. DTD and EuroSAT).
    """
    if not (0 < p_train < 1 and 0 <= p_val < 1 and p_train + p_val < 1):
        raise ValueError(f"need 0 < p_train, 0 <= p_val and p_train + p_val < 1, got {p_train}, {p_val}")
    rng = random.Random(seed)
    train, val, test = [], [], []
    groups = _by_label(records)
    _check_split_sizes(groups, p_train, p_val)
    for items in groups.values():
        items = list(items)
        rng.shuffle(items)
        n_train, n_val = round(len(items) * p_train), round(len(items) * p_val)
        train += items[:n_train]
        val += items[n_train : n_train + n_val]
        test += items[n_train + n_val :]
    return train, val, test


def _check_split_sizes(groups: dict[int, list[Record]], p_train: float, p_val: float) -> None:
    """Refuse classes too small to give one training image (they would vanish from the training set and shift
    the base / novel labels, as CoOp's split asserts); warn by name about classes left without test images."""
    sizes = {items[0].classname: len(items) for items in groups.values()}
    no_train = {name: n for name, n in sizes.items() if round(n * p_train) < 1}
    if no_train:
        shown = ", ".join(f"{name!r} ({n})" for name, n in list(no_train.items())[:10])
        raise ValueError(f"{len(no_train)} class(es) have too few images to give one training image at p_train "
                         f"{p_train:g}: {shown}{' ...' if len(no_train) > 10 else ''}; add images to them, remove "
                         "their folders, or raise --p-train")
    no_test = {name: n for name, n in sizes.items() if n - round(n * p_train) - round(n * p_val) < 1}
    if no_test:
        warnings.warn(f"{len(no_test)} class(es) are left without test images by the split (p_train {p_train:g}, "
                      f"p_val {p_val:g}) and are not scored: "
                      + ", ".join(f"{name!r} ({n})" for name, n in list(no_test.items())[:10]), stacklevel=3)


# ---------------------------------------------------------------------- protocols
def few_shot(
    records: Sequence[Record], shots: int, rng: random.Random | int = 0, repeat: bool = True, split: str = ""
) -> list[Record]:
    """``shots`` records per class (all of them when ``shots < 1``), as Dassl's ``generate_fewshot_dataset``.

    Classes are visited in order of first appearance; a class with at least ``shots`` images gets
    ``rng.sample(items, shots)``, a smaller one ``rng.choices(items, k=shots)`` (``repeat=True``) or all its
    images.

    Args:
        rng: a ``random.Random`` (shared across calls, as Dassl's global RNG) or an int seed.
        split: the split's name for the warning that names the classes with fewer than ``shots`` images.
    """
    _check_shots(shots)
    if shots < 1:
        return list(records)
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    short = short_classes(records, shots)
    if short:
        how = "sampled with replacement (repeats)" if repeat else "used whole (fewer than asked)"
        warnings.warn(f"{split + ' split: ' if split else ''}{len(short)} class(es) have fewer than {shots} images and are {how}: "
                      + ", ".join(f"{name!r} ({n})" for name, n in list(short.items())[:10])
                      + (" ..." if len(short) > 10 else ""), stacklevel=2)
    out: list[Record] = []
    for items in _by_label(records).values():
        if len(items) >= shots:
            out += rng.sample(items, shots)
        else:
            out += rng.choices(items, k=shots) if repeat else items
    return out


def short_classes(records: Sequence[Record], shots: int) -> dict[str, int]:
    """``{class name: image count}`` of the classes in ``records`` with fewer than ``shots`` images."""
    return {items[0].classname: len(items) for items in _by_label(records).values() if len(items) < shots}


def _check_shots(shots: int) -> None:
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise ValueError(f"shots must be an integer >= 1 (or 0 for all images), got {shots!r}")


def sample_few_shot(dataset: DatasetSplits, shots: int, seed: int) -> DatasetSplits:
    """K-shot training set and ``min(K, 4)``-shot validation set drawn with one ``random.Random(seed)``
    (CoOp's order: train first, then val); the test set is kept whole."""
    _check_shots(shots)
    if shots < 1:
        return dataset
    rng = random.Random(seed)
    train = few_shot(dataset.train, shots, rng, split="train")
    val = few_shot(dataset.val, min(shots, 4), rng, split="val")
    return replace(dataset, train=train, val=val)


def base_novel_split(n_classes: int) -> tuple[list[int], list[int]]:
    """Labels of the base (first ``ceil(C / 2)``) and novel (the rest) classes."""
    m = math.ceil(n_classes / 2)
    return list(range(m)), list(range(m, n_classes))


def subsample_classes(dataset: DatasetSplits, subsample: str = "all") -> DatasetSplits:
    """Keep the ``"base"`` or ``"new"`` (novel) half of the classes, relabelled from 0; ``"all"`` keeps all.

    As Dassl: the labels are those present in the training split (all classes when it is empty), sorted;
    the first ``ceil(n / 2)`` are base.
    """
    if subsample not in ("all", "base", "new", "novel"):
        raise ValueError(f"subsample must be 'all', 'base' or 'new', got {subsample!r}")
    if subsample == "all":
        return dataset
    labels = sorted({r.label for r in dataset.train}) or list(range(dataset.n_classes))
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {label: i for i, label in enumerate(selected)}

    def keep(records: Iterable[Record]) -> list[Record]:
        return [replace(r, label=relabel[r.label]) for r in records if r.label in relabel]

    return replace(
        dataset,
        classnames=[dataset.classnames[label] for label in selected],
        train=keep(dataset.train),
        val=keep(dataset.val),
        test=keep(dataset.test),
    )


# ---------------------------------------------------------------------- torch dataset
class ImageDataset(torch.utils.data.Dataset):
    """Records as a torch dataset of ``(image, label, index)``; ``transform`` maps a PIL RGB image to a tensor.

    The index lets a training loop look up cached image features.
    """

    def __init__(self, records: Sequence[Record], transform: Callable | None = None):
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        try:
            image = load_rgb(record.path)
        except (OSError, ValueError) as err:
            text = str(err)
            raise OSError(text if text.startswith(str(record.path)) else f"cannot read image {record.path}: {text}") \
                from err
        if self.transform is not None:
            image = self.transform(image)
        return image, record.label, index

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]


def load_rgb(path: str | os.PathLike):
    """The image at ``path`` as a PIL RGB image, converted faithfully from any mode Pillow opens.

    * 16- and 32-bit greyscale (``I;16*``, ``I``) is scaled from its range to 8 bits (``I;16``: value / 257),
      not clipped at 255; floating-point greyscale (``F``) is read as [0, 1] when it lies there, else as
      [0, 255], and a warning names the file when values fall outside that range;
    * transparency is dropped the same way in every mode (``RGBA``, ``LA``, ``PA``, ``La``, ``RGBa``, a palette
      or greyscale image with a transparent colour): the stored colours are kept, as Dassl's and open_clip's
      ``convert("RGB")`` reads them, so features match the reference pipelines; premultiplied modes are
      un-premultiplied first;
    * ``CMYK``, ``YCbCr``, ``HSV``, ``LAB``, ``1``, ``L``, ``P`` convert with Pillow's own conversions.

    Raises ``ValueError`` naming the file for a decompression bomb (a header claiming more pixels than
    Pillow's ``Image.MAX_IMAGE_PIXELS`` limit), ``OSError`` for a file Pillow cannot read or decode.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image, path)
    except Image.DecompressionBombError as err:
        raise ValueError(f"{path}: refused as a possible decompression bomb ({err}); shrink or remove the "
                         "image") from None
    except SyntaxError as err:  # Pillow raises SyntaxError for some corrupt headers
        raise OSError(f"{path}: not a readable image ({err})") from None


def _to_rgb(image, path) -> "Image.Image":
    """``image`` (loaded) as RGB; see :func:`load_rgb`."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        return _scaled_grey(image, path).convert("RGB")
    if mode in ("P", "PA", "La", "RGBa"):  # a palette's colours, un-premultiplied colours; alpha dropped below
        image = image.convert("RGBA")
    return image.convert("RGB")


def _scaled_grey(image, path) -> "Image.Image":
    """A 16- / 32-bit integer or floating-point greyscale image as 8-bit ``L``, scaled (never clipped)."""
    import numpy as np
    from PIL import Image

    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):  # 16-bit samples
        scaled = values / 257.0
    elif image.mode == "F" and values.size and values.min() >= 0.0 and values.max() <= 1.0:
        scaled = values * 255.0
    elif image.mode == "F":
        scaled = values
    elif values.size and values.min() >= 0 and values.max() > 255:  # I: 16-bit data (PNG, TIFF) in 32 bits
        scaled = values / (257.0 if values.max() <= 65535 else 16843009.0)
    else:
        scaled = values
    if values.size and (scaled.min() < 0 or scaled.max() > 255 or not np.isfinite(scaled).all()):
        warnings.warn(f"{path}: {image.mode} pixel values {values.min():g}..{values.max():g} fall outside the "
                      "range read as 8 bits; they are clipped", stacklevel=3)
    return Image.fromarray(np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8))  # 2-D uint8: L


def make_synthetic_image_folder(
    root: str | os.PathLike,
    classnames: Sequence[str] = ("circle", "square", "stripe", "cross"),
    per_class: int = 12,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Write a small ImageFolder of synthetic PNGs (one colour and shape per class, with noise).

    For offline demos and tests of the runner: ``root/<class>/<n>.png``.  Returns ``root``.
    """
    from PIL import Image

    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for c, name in enumerate(classnames):
        folder = root / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        colour = torch.rand(3, 1, 1, generator=g)
        for n in range(per_class):
            dy, dx = torch.randint(-size // 8, size // 8 + 1, (2,), generator=g).tolist()
            mask = _shape_mask(c, yy - dy, xx - dx, size).float()
            image = colour * mask + 0.25 * torch.rand(3, size, size, generator=g)
            pixels = (image.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).contiguous()
            Image.frombytes("RGB", (size, size), bytes(pixels.flatten().tolist())).save(folder / f"{n:04d}.png")
    return root


def _shape_mask(kind: int, yy: torch.Tensor, xx: torch.Tensor, size: int) -> torch.Tensor:
    c = size / 2
    shapes = [
        (yy - c) ** 2 + (xx - c) ** 2 < (size / 3) ** 2,
        ((yy - c).abs() < size / 4) & ((xx - c).abs() < size / 4),
        (yy // 4) % 2 == 0,
        ((yy - c).abs() < size / 10) | ((xx - c).abs() < size / 10),
        (xx // 4) % 2 == 0,
        (yy + xx) % 8 < 4,
    ]
    return shapes[kind % len(shapes)]


# ---------------------------------------------------------------------- helpers
def _by_label(records: Iterable[Record]) -> dict[int, list[Record]]:
    groups: dict[int, list[Record]] = {}
    for record in records:
        groups.setdefault(record.label, []).append(record)
    return groups


def _holds_files(folder: Path) -> bool:
    """Whether ``folder`` (recursively) holds a non-hidden file."""
    return any(not name.startswith(".") for _, _, names in os.walk(folder) for name in names)


def _refuse_split_level(root: Path, folders: Sequence[str], classnames_map: dict[str, str] | None) -> None:
    """Refuse class folders that are a dataset's split folders (``imagenet/images``: train, val) or ImageNet-V2's
    numbered folders read without their ``classnames.txt``: either would be scored as meaningless classes."""
    if set(folders) <= _SPLIT_FOLDERS:
        raise ValueError(f"{root}: the class folders {list(folders)} are split folders, not classes: pass the "
                         f"dataset folder above (e.g. DATA/imagenet, holding images/train, images/val and "
                         "classnames.txt) or a folder with train/ and test/")
    v2_like = "imagenetv2" in root.name.lower() or (root.parent / CLASSNAMES_FILE).is_file()
    if not classnames_map and v2_like and all(f.isdigit() for f in folders):
        raise ValueError(f"{root}: the class folders are numbers ({list(folders)[:5]} ...), as ImageNet-V2's label "
                         "indices: pass the folder above holding imagenetv2-matched-frequency-format-val/ and "
                         "ImageNet's classnames.txt (CoOp's DATASETS.md), or add a classnames.txt naming them")
    if not classnames_map and all(_WNID.match(f) for f in folders):
        raise ValueError(f"{root}: the class folders are WordNet ids ({list(folders)[:3]} ...), which CLIP cannot read "
                         "as class names: pass the dataset folder above that holds ImageNet's classnames.txt "
                         "('<wnid> <class name>' lines; CoOp's DATASETS.md), or put that file in this folder")


def _image_files(folder: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in filenames:
            if filename.lower().endswith(IMAGE_EXTENSIONS) and not filename.startswith("."):
                yield Path(dirpath) / filename


def _clean_name(name: str) -> str:
    return " ".join(name.replace("_", " ").split())


def _refuse_colliding(sources: Sequence[str], names: Sequence[str], what: str) -> None:
    """Refuse two sources (folders, labels) whose class names are one class after normalisation."""
    seen: dict[str, str] = {}
    for source, name in zip(sources, names):
        other = seen.setdefault(class_key(name), source)
        if other != source:
            raise ValueError(
                f"{what} {other!r} and {source!r} name the same class ({class_key(name)!r}: '_' reads as a space "
                "and case is ignored, as CLIP's tokenizer does); merge or rename them"
            )


def _find_split_file(root: Path) -> Path | None:
    for pattern in SPLIT_FILE_PATTERNS:
        found = sorted(root.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"{root} holds several split files {[f.name for f in found]}: pass one explicitly")
    return None


def _guess_image_root(split_json: Path, root: Path) -> Path:
    """The directory in which the split file's first image exists (``root`` or one of its sub-directories)."""
    raw = read_json(split_json, f"split file not found: {split_json}")
    if not isinstance(raw, dict):
        raise ValueError(f"{split_json} is not a CoOp split file: expected keys 'train', 'val', 'test'")
    first = next((rows[0][0] for rows in (raw.get("train"), raw.get("test"), raw.get("val")) if rows), None)
    if first is None:
        return root
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    for candidate in candidates:
        if (candidate / first).is_file():
            return candidate
    raise FileNotFoundError(
        f"cannot find {first!r} (the first image of {split_json.name}) under {root} or its sub-directories; "
        "pass the image directory explicitly (--image-root)"
    )
