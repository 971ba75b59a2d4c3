"""``anchoropt datasets check DIR...``: what the runner would read from each dataset folder, before any run.

Per folder it prints the recognised layout (:data:`anchoropt.datasets.layouts.LAYOUTS`) and Dassl dataset, the
class count and the first class names, the images per split, the Dassl few-shot files present
(``split_fewshot/shot_K-seed_S.pkl``), the preset that ``--preset`` would pick from the folder
(:func:`anchoropt.methods.presets.canonical_name`) and the descriptions file that would apply
(``--descriptions DIR``: ``DIR/<preset>.json``; a file: itself).  Every problem the runner would refuse the
folder for (an unreadable layout, fewer than two classes, a missing image, descriptions that do not cover the
classes, a requested Dassl few-shot file that is absent or does not match) is printed as ``ERROR`` and makes
:func:`check_datasets` return 1.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

from ..datasets import dassl_fewshot, layouts
from ..datasets.folders import DatasetSplits

__all__ = ["TEST_ONLY_LAYOUTS", "check_datasets", "check_folder", "preset_for", "descriptions_for"]

TEST_ONLY_LAYOUTS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
"""Layouts Dassl reads as test sets only (domain-generalisation targets): checked as targets."""


def preset_for(dataset: DatasetSplits | None, root: str | os.PathLike) -> str | None:
    """The preset for a dataset: from its Dassl name (``OxfordPets``), else its folder's name; ``None`` when
    neither names a dataset of the released tables."""
    from ..methods.presets import canonical_name

    for name in ((dataset.dataset if dataset is not None else ""), Path(root).name):
        if name:
            try:
                return canonical_name(name)
            except KeyError:
                continue
    return None


def descriptions_for(descriptions: str | os.PathLike | None, preset: str | None,
                     root: str | os.PathLike) -> Path | None:
    """The descriptions file for a dataset: ``descriptions`` itself when it is a file, else (a folder of CuPL
    files) ``<preset>.json`` or ``<folder name>.json`` in it; ``None`` when none applies."""
    if not descriptions:
        return None
    path = Path(descriptions)
    if not path.is_dir():
        return path
    for stem in dict.fromkeys(s for s in (preset, Path(root).name) if s):
        if (path / f"{stem}.json").is_file():
            return path / f"{stem}.json"
    return None


def check_folder(root: str | os.PathLike, descriptions: str | os.PathLike | None = None,
                 shots: int | None = None, seeds: Sequence[int] = (), print_: Callable[[str], None] = print) -> int:
    """Check one dataset folder and print its report; returns the number of errors found."""
    root = Path(root)
    errors = 0

    def error(text: str) -> None:
        nonlocal errors
        errors += 1
        print_(f"  ERROR: {text}")

    print_(f"{root}")
    if not root.is_dir():
        error(f"not a directory: {root}")
        return errors
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            layout = layouts.detect_layout(root)
            target_only = layout in TEST_ONLY_LAYOUTS
            data = layouts.open_dataset(root, holdout=not target_only)
        except (ValueError, FileNotFoundError, OSError) as err:
            error(str(err).replace("\n", "\n    "))
            _report_preset(root, None, descriptions, print_, error)
            return errors
    role = "target only (domain generalisation: read whole as test)" if target_only else "source or target"
    print_(f"  layout: {data.layout}" + (f" (Dassl {data.dataset})" if data.dataset else "") + f"; {role}")
    shown = ", ".join(data.classnames[:5]) + (", ..." if data.n_classes > 5 else "")
    print_(f"  classes: {data.n_classes} ({shown})")
    print_(f"  images: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test")
    for warning in caught:
        print_(f"  warning: {warning.message}")
    missing = [r.path for r in (*data.train, *data.val, *data.test) if not os.path.isfile(r.path)]
    if missing:
        error(f"{len(missing)} image file(s) listed but absent, e.g. {missing[:3]}")
    have = dassl_fewshot.available_fewshot(root)
    if have:
        by_shots: dict[int, list[int]] = {}
        for k, s in have:
            by_shots.setdefault(k, []).append(s)
        print_("  Dassl few-shot files: " + "; ".join(f"{k} shots, seeds {' '.join(map(str, v))}"
                                                     for k, v in sorted(by_shots.items())))
    else:
        print_("  Dassl few-shot files: none (split_fewshot/ holds no shot_K-seed_S.pkl; --shots-from dassl "
               "would be refused)")
    for seed in seeds if shots else ():
        try:
            dassl_fewshot.dassl_few_shot(data, shots, seed)
            print_(f"  --shots-from dassl --shots {shots} --seed {seed}: readable, matches the dataset")
        except (ValueError, FileNotFoundError, OSError) as err:
            error(str(err))
    _report_preset(root, data, descriptions, print_, error)
    return errors


def _report_preset(root: Path, data: DatasetSplits | None, descriptions, print_, error) -> None:
    preset = preset_for(data, root)
    print_(f"  preset: {preset}" if preset else
           "  preset: none recognised from the folder (the runner's defaults; pass --preset NAME)")
    path = descriptions_for(descriptions, preset, root)
    if descriptions and path is None:
        print_(f"  descriptions: none for this dataset in {descriptions} (expected {preset or root.name}.json)")
    elif path is not None and data is not None:
        from ..descriptions import load_descriptions

        try:
            load_descriptions(path, data.classnames)
            print_(f"  descriptions: {path} (covers all {data.n_classes} classes)")
        except (ValueError, FileNotFoundError) as err:
            error(f"descriptions {path}: {err}")


def check_datasets(folders: Sequence[str | os.PathLike], descriptions: str | os.PathLike | None = None,
                   shots: int | None = None, seeds: Sequence[int] = (),
                   print_: Callable[[str], None] = print) -> int:
    """Check every folder (see the module docstring); returns the exit status: 0 when all pass, else 1."""
    errors = 0
    for root in folders:
        errors += check_folder(root, descriptions, shots, seeds, print_)
    print_(f"{len(folders)} folder(s) checked: " + (f"{errors} error(s)" if errors else "no errors"))
    return 1 if errors else 0
