"""The dataset layouts of CoOp's DATASETS.md, recognised by the files a folder holds, read as Dassl / CoOp do.

:func:`open_dataset` is the runner's entry point: it recognises the layout of a dataset folder (see
:data:`LAYOUTS`), reads it into a :class:`~anchoropt.datasets.folders.DatasetSplits` and refuses a dataset with
fewer than two classes (one class always scores 100 %).  The layouts, in the order they are tried, each read
as the CoOp dataset class named in brackets reads it:

* ``split_json``: ``split_zhou_<Name>.json`` (``{"train"|"val"|"test": [[relpath, label, classname], ...]}``)
  and the image folder it lists (``OxfordPets.read_split``: the file's splits and labels);
* ``fgvc_aircraft``: ``images/<id>.jpg``, ``variants.txt``, ``images_variant_{train,val,test}.txt`` (lines
  ``<id> <variant>``; ``FGVCAircraft``: labels in ``variants.txt`` order);
* ``imagenet``: ``images/train/<wnid>/``, ``images/val/<wnid>/``, ``classnames.txt`` (lines
  ``<wnid> <class name>``; ``ImageNet``: labels in sorted folder order, val as test);
* ``imagenetv2``: ``imagenetv2-*-format-val/<i>/`` for ``i`` in ``0..C-1`` and ``classnames.txt``
  (``ImageNetV2``: folder ``i`` is line ``i`` of classnames.txt);
* ``imagenet_a`` / ``imagenet_r``: ``imagenet-a/<wnid>/`` / ``imagenet-r/<wnid>/`` (200 classes) and
  ``classnames.txt`` (``ImageNetA`` / ``ImageNetR``: their 200 classes only);
* ``imagenet_sketch``: ``images/<wnid>/`` and ``classnames.txt`` (``ImageNetSketch``);
* ``subfolders``: ``train/<class>/`` and ``test/<class>/`` (``val/`` optional), labels from ``train/``;
* ``folder``: one sub-folder of images per class, split per class.

ImageNet-V2 / -Sketch / -A / -R are test sets (Dassl reads them whole as ``test``); given as ``--data`` they
are split per class like a plain folder.  ImageNet has no validation split here (CoOp reuses its test set
as ``val``); read as a target, only ``images/val`` is read.  Folders named ``split_fewshot`` (Dassl's few-shot
cache, :mod:`~anchoropt.datasets.dassl_fewshot`) and folders without images are never classes.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

from . import folders as F
from .folders import DatasetSplits, Record

__all__ = ["LAYOUTS", "DASSL_NAMES", "open_dataset", "detect_layout", "recognise", "LayoutError"]

LAYOUTS: dict[str, str] = {
    "split_json": "a CoOp split file split_zhou_<Name>.json ({\"train\": [[relpath, label, classname], ...], "
                  "\"val\": ..., \"test\": ...}) next to the image folder it lists",
    "fgvc_aircraft": "images/<id>.jpg with variants.txt and images_variant_train.txt / _val.txt / _test.txt "
                     "('<id> <variant>' lines), as FGVC-Aircraft's data/ folder",
    "imagenet": "images/train/<wnid>/ and images/val/<wnid>/ with classnames.txt ('<wnid> <class name>' lines)",
    "imagenetv2": "imagenetv2-matched-frequency-format-val/0..999/ with classnames.txt (folder i = line i)",
    "imagenet_a": "imagenet-a/<wnid>/ (200 class folders) with ImageNet's classnames.txt",
    "imagenet_r": "imagenet-r/<wnid>/ (200 class folders) with ImageNet's classnames.txt",
    "imagenet_sketch": "images/<wnid>/ with ImageNet's classnames.txt",
    "subfolders": "train/<class>/ and test/<class>/ image folders (val/<class>/ optional)",
    "folder": "one sub-folder of images per class (<class>/*.jpg), split per class with --split-seed",
}
"""Every layout :func:`open_dataset` recognises and what it needs, in the order they are tried."""

DASSL_NAMES: dict[str, str] = {
    "imagenet": "ImageNet", "fgvc_aircraft": "FGVCAircraft", "imagenetv2": "ImageNetV2",
    "imagenet_a": "ImageNetA", "imagenet_r": "ImageNetR", "imagenet_sketch": "ImageNetSketch",
}
"""The Dassl / CoOp dataset class of each dataset-specific layout (the split files name theirs)."""

_SPLIT_NAME = re.compile(r"^split_zhou_(\w+)\.json$")
_V2_DIR = re.compile(r"^imagenetv2-.+-format-val$")


class LayoutError(ValueError):
    """A folder in no recognised layout, or in one with a part missing; the message says what each needs."""


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
    """Read a dataset folder in any layout of :data:`LAYOUTS`; the arguments are those of
    :func:`anchoropt.datasets.folders.open_dataset` (``holdout=False``: a target, read for its ``test`` split).

    ``DatasetSplits.layout`` names the layout, ``DatasetSplits.dataset`` the Dassl dataset class when known
    (``"OxfordPets"`` from ``split_zhou_OxfordPets.json``, ``"ImageNet"``, ...).  Raises :class:`LayoutError`
    (a ``ValueError``) for a folder in no layout, or read as fewer than two classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {root}")
    layout = "split_json" if split_json is not None else detect_layout(root, classnames_file)
    if layout in _READERS:
        data = _READERS[layout](root, holdout, Path(classnames_file or root / F.CLASSNAMES_FILE))
        if holdout and not data.train:  # a test set given as --data: split it per class as a plain folder
            train, val, test = F.split_per_class(data.test, p_train, p_val, split_seed)
            data = replace(data, train=train, val=val, test=test)
        data = replace(data, name=name or root.name, root=str(root), layout=layout,
                       dataset=DASSL_NAMES.get(layout, ""))
    else:
        try:
            data = F.open_dataset(root, split_json, image_root, classnames_file, holdout, p_train, p_val,
                                  split_seed, name)
        except ValueError as err:
            if "no class sub-directories" in str(err) or "holds no images" in str(err):
                raise LayoutError(f"{err}\n{_tried(root)}") from None
            raise
        if data.layout == "split_json":
            found = _SPLIT_NAME.match(Path(split_json or F._find_split_file(root) or "").name)
            data = replace(data, dataset=found.group(1) if found else "")
    _refuse_few_classes(data, root, holdout)
    return data


def detect_layout(root: str | os.PathLike, classnames_file: str | os.PathLike | None = None) -> str:
    """The name of ``root``'s layout in :data:`LAYOUTS`, from the files and folders it holds.

    A folder that holds part of a dataset-specific layout (``images/train/`` without ``classnames.txt``,
    ``variants.txt`` without its split files) raises :class:`LayoutError` naming the missing part;
    ``classnames_file`` stands for a missing ``root/classnames.txt``.
    """
    root = Path(root)
    if F._find_split_file(root) is not None:
        return "split_json"
    names = {entry.name for entry in os.scandir(root) if not entry.name.startswith(".")}
    has_classnames = F.CLASSNAMES_FILE in names or classnames_file is not None
    need_names = [] if classnames_file is not None else [F.CLASSNAMES_FILE]
    fgvc = {"variants.txt", "images_variant_train.txt", "images_variant_val.txt", "images_variant_test.txt"}
    if names & fgvc:
        _require(root, sorted(fgvc) + ["images/"], "fgvc_aircraft")
        return "fgvc_aircraft"
    if (root / "images" / "train").is_dir() and (root / "images" / "val").is_dir():
        _require(root, need_names, "imagenet")
        return "imagenet"
    v2 = sorted(n for n in names if _V2_DIR.match(n) and (root / n).is_dir())
    for layout, found in (("imagenetv2", v2[:1]), ("imagenet_a", ["imagenet-a"] if "imagenet-a" in names else []),
                          ("imagenet_r", ["imagenet-r"] if "imagenet-r" in names else [])):
        if found:
            if len(v2) > 1 and layout == "imagenetv2":
                raise LayoutError(f"{root} holds several ImageNet-V2 image folders {v2}: keep one per dataset folder "
                                  "(CoOp reads imagenetv2-matched-frequency-format-val)")
            _require(root, need_names, layout)
            return layout
    others = [n for n in names if n not in ("images", *F.IGNORED_FOLDERS) and (root / n).is_dir()]
    if (root / "images").is_dir() and has_classnames and not others:  # else: a class named "images"
        return "imagenet_sketch"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "subfolders"
    return "folder"


def recognise(root: str | os.PathLike) -> str:
    """The Dassl dataset class a folder holds, from its files alone (no image is listed): ``"OxfordPets"`` for
    ``split_zhou_OxfordPets.json``, ``"ImageNet"`` for the ImageNet layout, ...; ``""`` when the layout names none
    (a plain folder) or the folder is unreadable."""
    root = Path(root)
    try:
        layout = detect_layout(root)
        if layout == "split_json":
            found = _SPLIT_NAME.match(F._find_split_file(root).name)
            return found.group(1) if found else ""
    except (OSError, ValueError):
        return ""
    return DASSL_NAMES.get(layout, "")


# ---------------------------------------------------------------------- readers
def _read_imagenet(root: Path, holdout: bool, names: Path) -> DatasetSplits:
    """``images/train/<wnid>/`` (train) and ``images/val/<wnid>/`` (test); a target reads ``val`` alone."""
    mapping = _wnid_names(names, [root / "images" / "val"] + ([root / "images" / "train"] if holdout else []))
    if not holdout:
        test, classnames = F.read_image_folder(root / "images" / "val", mapping)
        return DatasetSplits(root.name, classnames, [], [], test)
    train, classnames = F.read_image_folder(root / "images" / "train", mapping)
    test = F.read_image_folder(root / "images" / "val", mapping, classnames)[0]
    return DatasetSplits(root.name, classnames, train, [], test)


def _read_fgvc_aircraft(root: Path, holdout: bool, names: Path) -> DatasetSplits:
    """``images_variant_<split>.txt`` lines ``<id> <variant>`` -> ``images/<id>.jpg``, labelled by the line of
    the variant in ``variants.txt``."""
    classnames = [line.strip() for line in _text(root / "variants.txt").splitlines() if line.strip()]
    if len(set(classnames)) != len(classnames):
        raise LayoutError(f"{root / 'variants.txt'} lists a variant twice")
    label_of = {name: i for i, name in enumerate(classnames)}
    splits = {}
    for split in ("train", "val", "test"):
        path = root / f"images_variant_{split}.txt"
        records = []
        for n, line in enumerate(_text(path).splitlines(), 1):
            image, _, variant = line.strip().partition(" ")
            if not image:
                continue
            variant = variant.strip()
            if variant not in label_of:
                raise LayoutError(f"{path}:{n}: variant {variant!r} is not in variants.txt")
            records.append(Record(str(root / "images" / f"{image}.jpg"), label_of[variant], F._clean_name(variant)))
        splits[split] = records
    names = [F._clean_name(name) for name in classnames]
    return DatasetSplits(root.name, names, splits["train"], splits["val"], splits["test"])


def _read_imagenetv2(root: Path, holdout: bool, names: Path) -> DatasetSplits:
    """``imagenetv2-*-format-val/<i>/``: folder ``i`` is class ``i`` of ``classnames.txt`` (file order)."""
    image_dir = next(p for p in sorted(root.iterdir()) if _V2_DIR.match(p.name) and p.is_dir())
    mapping = F.read_classnames_file(names)
    classnames = [F._clean_name(name) for name in mapping.values()]
    F._refuse_colliding(list(mapping), classnames, f"{names}: classes")
    folders = _class_folders(image_dir)
    bad = [f for f in folders if not (f.isdigit() and int(f) < len(classnames))]
    if bad:
        raise LayoutError(f"{image_dir}: folder(s) {bad[:5]} are not class indices 0..{len(classnames) - 1} of "
                          f"{names} (ImageNet-V2's folders are numbered by ImageNet label)")
    missing = sorted(set(range(len(classnames))) - {int(f) for f in folders})
    if missing:
        raise LayoutError(f"{image_dir}: no folder for class index(es) {missing[:10]}"
                          f"{' ...' if len(missing) > 10 else ''} of {names} "
                          f"({len(classnames)} classes): copy ImageNet's classnames.txt and the whole image folder")
    test = []
    for label in range(len(classnames)):
        files = sorted(F._image_files(image_dir / str(label)))
        test += [Record(str(path), label, classnames[label]) for path in files]
    return DatasetSplits(root.name, classnames, [], [], test)


def _wnid_reader(folder: str):
    def read(root: Path, holdout: bool, names: Path) -> DatasetSplits:
        image_dir = root / folder
        test, classnames = F.read_image_folder(image_dir, _wnid_names(names, [image_dir]))
        return DatasetSplits(root.name, classnames, [], [], test)

    read.__doc__ = f"``{folder}/<wnid>/`` with class names from ``classnames.txt``; only the classes present."
    return read


_READERS = {
    "fgvc_aircraft": _read_fgvc_aircraft,
    "imagenet": _read_imagenet,
    "imagenetv2": _read_imagenetv2,
    "imagenet_a": _wnid_reader("imagenet-a"),
    "imagenet_r": _wnid_reader("imagenet-r"),
    "imagenet_sketch": _wnid_reader("images"),
}


# ---------------------------------------------------------------------- helpers
def _wnid_names(names: Path, image_dirs: list[Path]) -> dict[str, str]:
    """The mapping of ``names`` (a ``classnames.txt``), checked to name every class folder of ``image_dirs``."""
    mapping = F.read_classnames_file(names)
    for image_dir in image_dirs:
        unknown = [f for f in _class_folders(image_dir) if f not in mapping]
        if unknown:
            raise LayoutError(f"{image_dir}: class folder(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} are "
                              f"not in {names}: use ImageNet's classnames.txt (CoOp's "
                              "DATASETS.md), whose lines are '<wnid> <class name>'")
    return mapping


def _class_folders(image_dir: Path) -> list[str]:
    if not image_dir.is_dir():
        raise LayoutError(f"image folder not found: {image_dir}")
    return sorted(e.name for e in os.scandir(image_dir) if e.is_dir() and not e.name.startswith(".")
                  and e.name not in F.IGNORED_FOLDERS)


def _text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise LayoutError(f"{path} not found") from None
    except UnicodeDecodeError as err:
        raise LayoutError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason})") from None


def _require(root: Path, parts: list[str], layout: str) -> None:
    missing = [p for p in parts if not (root / p.rstrip("/")).exists()]
    if missing:
        raise LayoutError(f"{root} looks like the {layout} layout but lacks {missing}; that layout needs "
                          f"{LAYOUTS[layout]}")


def _tried(root: Path) -> str:
    lines = [f"{root} is in none of the layouts tried:"]
    lines += [f"  - {name}: {needs}" for name, needs in LAYOUTS.items()]
    return "\n".join(lines)


def _refuse_few_classes(data: DatasetSplits, root: Path, holdout: bool) -> None:
    if data.n_classes < 2:
        role = "a dataset" if holdout else "a target"
        raise LayoutError(f"{root} reads as {data.n_classes} class(es) {data.classnames} in the {data.layout} layout: "
                          f"{role} needs at least two classes (one class always scores 100 %).\n{_tried(root)}")
