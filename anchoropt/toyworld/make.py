"""Write a toy-world dataset as ordinary files, so it goes through the same data path as a real dataset.

``make(DIR, seed, classes, per_class, domain, group)`` writes::

    DIR/train/<class>/00000.png ...   DIR/val/<class>/...   DIR/test/<class>/...
    DIR/split.json          CoOp split_zhou format {"train": [[relpath, label, class], ...], "val": ..., "test": ...}
    DIR/classes.txt         one class name a line, in label order
    DIR/descriptions.json   {class: [sentences]} (CuPL format), Stage I's input
    DIR/world.json          how it was made and every class's attributes

Each class's ``per_class`` images are cut into ``round(0.5 K)`` train, ``round(0.2 K)`` val and the rest test.
The classes are the first ``classes`` of group ``group`` (labels in that order); ``seed`` only changes the
images.  An image is a function of (seed, split, class, index): the photo and the other domains of one
seed show the same scenes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from .concepts import GROUP_SIZE, N_GROUPS, group as group_concepts
from .descriptions import descriptions as make_descriptions
from .concepts import Concept
from .render import DOMAINS, IMAGE_SIZE, image_rng, render, scene_background, to_uint8

__all__ = ["make", "SPLITS", "split_sizes", "check_seed"]

SPLITS = ("train", "val", "test")
_STREAMS = {"train": 0, "val": 1, "test": 2}
_VERSION = 2


def split_sizes(per_class: int) -> dict[str, int]:
    """Images per class in each split for ``per_class`` images per class."""
    n_train, n_val = round(0.5 * per_class), round(0.2 * per_class)
    return {"train": n_train, "val": n_val, "test": per_class - n_train - n_val}


def check_seed(seed) -> int:
    """``seed`` if numpy's generators take it (a whole number in 0 .. 2**32 - 1), else a ``ValueError`` naming
    ``--seed``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed (--seed) must be a whole number in 0..{2**32 - 1} (numpy's seed range), got {seed!r}")
    return seed


def make(
    root: str | os.PathLike,
    seed: int = 0,
    classes: int = 100,
    per_class: int = 60,
    domain: str = "photo",
    group: int = 0,
    overwrite: bool = False,
    concepts: Sequence[Concept] | None = None,
    sizes: dict[str, int] | None = None,
    extra: dict | None = None,
) -> dict:
    """Write the dataset to ``root`` (see the module docstring); returns the ``world.json`` record.

    Args:
        seed: seed of the images (the classes never change).
        classes: number of classes, the first of the group (1 .. GROUP_SIZE).
        per_class: images per class before the split (>= 5: every split gets at least one).
        domain: one of :data:`~anchoropt.toyworld.render.DOMAINS`.
        group: class group (0 .. N_GROUPS - 1); groups are disjoint (cross-dataset transfer).
        overwrite: replace the toy-world files of an existing dataset in ``root``.
        concepts: the classes, in label order, instead of the first ``classes`` of ``group`` (a suite's
            selection; ``classes`` and ``group`` are then ignored).
        sizes: images per class of each split (``{"train": .., "val": .., "test": ..}``, each >= 1) instead of
            ``per_class``'s 50 / 20 / 30 % cut.
        extra: more fields for ``world.json`` (a suite's name, kind and role of the dataset).
    """
    check_seed(seed)
    if concepts is None:
        if not isinstance(classes, int) or not 1 <= classes <= GROUP_SIZE:
            raise ValueError(f"classes must be an int in 1..{GROUP_SIZE} (a group's size), got {classes!r}")
        if not isinstance(group, int) or not 0 <= group < N_GROUPS:
            raise ValueError(f"group must be an int in 0..{N_GROUPS - 1}, got {group!r}")
        concepts = group_concepts(group)[:classes]
    else:
        concepts, group = list(concepts), None
        if not concepts or len({c.index for c in concepts}) != len(concepts):
            raise ValueError("concepts must be a non-empty list of distinct toy-world concepts")
    if sizes is None:
        if not isinstance(per_class, int) or per_class < 5:
            raise ValueError(f"per_class must be an int >= 5 (so train, val and test each get an image), "
                             f"got {per_class!r}")
        sizes = split_sizes(per_class)
    elif set(sizes) != set(SPLITS) or any(not isinstance(v, int) or v < 1 for v in sizes.values()):
        raise ValueError(f"sizes must give each of {SPLITS} a whole number >= 1, got {sizes!r}")
    return _write_files(Path(root), seed, concepts, domain, sizes, group, overwrite, extra or {})


def _write_files(root: Path, seed: int, concepts: Sequence[Concept], domain: str, sizes: dict[str, int],
                 group: int | None, overwrite: bool, extra: dict) -> dict:
    """Render and write every split of ``concepts`` (see the module docstring); returns the world record."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} exists and is not empty; choose a new directory or pass overwrite=True")
        if not (root / "world.json").is_file():
            raise FileExistsError(f"{root} is not empty and holds no toy world (no world.json): refusing to overwrite")
    from PIL import Image

    split: dict[str, list] = {name: [] for name in SPLITS}
    for name in SPLITS:
        for label, concept in enumerate(concepts):
            folder = root / name / concept.name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(sizes[name]):
                rng = image_rng(seed, _STREAMS[name], concept, k)
                image = render(concept, rng, IMAGE_SIZE, domain, scene_background(concept, domain, rng))
                rel = f"{name}/{concept.name}/{k:05d}.png"
                Image.fromarray(to_uint8(image)).save(root / rel)
                split[name].append([rel, label, concept.name])
    _write_split(root / "split.json", split)
    (root / "classes.txt").write_text("".join(c.name + "\n" for c in concepts), encoding="utf-8")
    _write_json(root / "descriptions.json", make_descriptions(concepts, seed=0))
    record = {"toyworld_version": _VERSION, "seed": seed, "classes": len(concepts),
              "per_class": sum(sizes.values()), "domain": domain, "group": group, "image_size": IMAGE_SIZE,
              "split_sizes": dict(sizes), **extra, "concepts": [c.to_json() for c in concepts]}
    _write_json(root / "world.json", record)
    return record


def _write_split(path: Path, split: dict[str, list]) -> None:
    """The split file with one ``[relpath, label, class]`` row a line."""
    parts = []
    for name, rows in split.items():
        body = ",\n  ".join(json.dumps(row) for row in rows)
        parts.append(f' "{name}": [\n  {body}\n ]' if rows else f' "{name}": []')
    path.write_text("{\n" + ",\n".join(parts) + "\n}\n", encoding="utf-8")


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
