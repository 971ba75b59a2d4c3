"""The toy benchmark: eleven datasets that mirror the paper's base-to-novel benchmark in kind, plus the
domain-generalisation variants of the ImageNet-like source.

``make_suite(DIR, seed)`` writes every dataset with :func:`~anchoropt.toyworld.make.make` (so the runner reads
each like real data) and ``DIR/suite.json``: names, what each mirrors, its kind, class count, style, split
sizes and protocol roles (base-to-novel, the cross-dataset / domain-generalisation source and targets), plus
``DIR/descriptions/<name>.json`` (each dataset's descriptions: the folder ``anchoropt grid --descriptions`` takes).

Kinds (what makes each dataset hard, as on the real benchmark):

* coarse objects with many classes (ImageNet / Caltech-like), photos;
* fine-grained clusters whose classes differ in one attribute (Pets / Cars / Aircraft-like);
* texture-only classes, close-ups without outline (DTD-like);
* a style never seen in pretraining (EuroSAT-like);
* small objects in cluttered scenes (SUN-like);
* styles the hand prompt ``"a photo of a {}."`` does not name (sketches, blur, paintings, dark photos).

Test splits hold at least :data:`MIN_TEST_IMAGES` images per base / novel half, so one half's binomial
standard error is at most 1.5 points.  Classes are fixed (the world never changes); ``seed`` draws the images.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .concepts import Concept, world

__all__ = ["SuiteDataset", "SUITE", "DG_VARIANTS", "MIN_TEST_IMAGES", "TRAIN_PER_CLASS", "VAL_PER_CLASS",
           "QUICK_DATASETS", "suite_concepts", "suite_sizes", "make_suite", "read_suite", "suite_scope", "SUITE_FILE"]

SUITE_FILE = "suite.json"
MIN_TEST_IMAGES = 1112
"""Test images per base / novel half: sqrt(0.25 / 1112) = 1.5 points, the worst-case binomial standard error."""
TRAIN_PER_CLASS = 20
"""Training images per class (16 shots are drawn from them, another draw per seed)."""
VAL_PER_CLASS = 4


@dataclass(frozen=True)
class SuiteDataset:
    """One dataset of the suite.

    Attributes:
        name: folder name and table label.
        mirrors: the real dataset it stands in for.
        kind: what makes it hard, in words.
        domain: rendering style (:data:`~anchoropt.toyworld.render.DOMAINS`).
        selection: how its classes are picked (:func:`suite_concepts`).
        classes: class count.
    """

    name: str
    mirrors: str
    kind: str
    domain: str
    selection: str
    classes: int


SUITE = (
    SuiteDataset("toy_objects", "ImageNet", "coarse objects, many classes (cross-dataset / DG source)", "photo",
                 "group0", 120),
    SuiteDataset("toy_caltech", "Caltech101", "coarse objects", "photo", "group1", 100),
    SuiteDataset("toy_pets", "OxfordPets", "fine-grained: neighbours differ in one attribute", "photo", "clusters2", 40),
    SuiteDataset("toy_cars", "StanfordCars", "fine-grained, in paintings", "painting", "clusters1", 100),
    SuiteDataset("toy_flowers", "Flowers102", "colour- and pattern-defined, blurred", "blurry", "group2", 100),
    SuiteDataset("toy_food", "Food101", "coarse objects, under-exposed", "dark", "mixed", 100),
    SuiteDataset("toy_aircraft", "FGVCAircraft", "fine-grained, under-exposed (the hardest)", "dark", "clusters0", 100),
    SuiteDataset("toy_sun", "SUN397", "small objects in cluttered scenes", "scene", "mixed", 120),
    SuiteDataset("toy_dtd", "DTD", "textures: colour and pattern only, no outline", "texture", "textures", 47),
    SuiteDataset("toy_eurosat", "EuroSAT", "a style never seen in pretraining (hues shifted)", "shifted", "group1", 40),
    SuiteDataset("toy_ucf", "UCF101", "sketches", "sketch", "mixed", 100),
)
"""The base-to-novel datasets, in the paper's table order.  Every name starts with ``toy_``: the runner gives a
folder named like a real dataset (``dtd``, ``eurosat`` ...) that dataset's released preset and hand prompt."""

DG_VARIANTS = (
    SuiteDataset("toy_objects_v2", "ImageNetV2", "the source's classes, new images", "photo", "group0", 120),
    SuiteDataset("toy_objects_sketch", "ImageNet-Sketch", "the source's classes as sketches", "sketch", "group0", 120),
    SuiteDataset("toy_objects_a", "ImageNet-A", "the source's classes under heavy noise (unseen)", "noisy", "group0", 120),
    SuiteDataset("toy_objects_r", "ImageNet-R", "the source's classes as paintings", "painting", "group0", 120),
)
"""Domain-generalisation targets of ``toy_objects`` (same classes, other styles)."""

QUICK_DATASETS = ("toy_caltech", "toy_dtd", "toy_eurosat")
"""``--quick``: one seed on three datasets of different kinds."""

_V2_SEED_OFFSET = 1000  # toy_objects_v2 draws its images from another seed


def _shuffled(concepts: list[Concept], key: int) -> list[Concept]:
    """A fixed shuffle, so fine-grained neighbours fall on both sides of the base / novel cut."""
    order = np.random.default_rng([17, key]).permutation(len(concepts))
    return [concepts[int(i)] for i in order]


def _shuffle_key(dataset: SuiteDataset) -> int:
    """The shuffle's key: the character codes of the dataset's name without its ``toy_`` prefix, as the suite was
    drawn before its names took the prefix.  That draw is the suite the shipped checkpoint was calibrated on and
    every toy-world figure in the docs was measured on (keyed on the prefixed names, every dataset but
    ``toy_objects`` had other classes and another base / novel cut)."""
    return sum(map(ord, dataset.name.removeprefix("toy_")))


def _in_clusters(group: int) -> list[Concept]:
    """The concepts of ``group`` that have a fine-grained neighbour, the largest clusters first (whole
    clusters, so a dataset's classes have as many one-attribute neighbours as the group allows)."""
    members: dict[int, list[Concept]] = {}
    for c in world():
        if c.group == group:
            members.setdefault(c.cluster, []).append(c)
    clusters = sorted((m for m in members.values() if len(m) > 1), key=lambda m: (-len(m), m[0].index))
    return [c for cluster in clusters for c in cluster]


def _textures() -> list[Concept]:
    """One concept per (colour, pattern, habitat): a close-up shows only these."""
    seen: dict[tuple[str, str, str], Concept] = {}
    for c in world():
        seen.setdefault((c.colour, c.pattern, c.habitat), c)
    return list(seen.values())


_SELECTIONS: dict[str, Callable[[], list[Concept]]] = {
    **{f"group{g}": (lambda g=g: [c for c in world() if c.group == g]) for g in range(3)},
    **{f"clusters{g}": (lambda g=g: _in_clusters(g)) for g in range(3)},
    "mixed": lambda: list(world()),
    "textures": _textures,
}


def suite_concepts(dataset: SuiteDataset) -> list[Concept]:
    """The classes of ``dataset`` in label order (the first half are its base classes)."""
    pool = _SELECTIONS[dataset.selection]()
    if len(pool) < dataset.classes:
        raise ValueError(f"{dataset.name}: selection {dataset.selection!r} has {len(pool)} classes, "
                         f"{dataset.classes} asked")
    if dataset.selection.startswith("group") and dataset.name.startswith("toy_objects"):
        return pool[: dataset.classes]  # the source and its DG variants: one class list, the group's order
    if dataset.selection.startswith("clusters"):
        pool = pool[: dataset.classes]  # whole clusters, largest first, then shuffled across the cut
    return _shuffled(pool, _shuffle_key(dataset))[: dataset.classes]


def suite_sizes(classes: int) -> dict[str, int]:
    """Images per class of each split: enough test images for :data:`MIN_TEST_IMAGES` per half."""
    half = classes // 2  # the smaller half (base is ceil(C / 2))
    return {"train": TRAIN_PER_CLASS, "val": VAL_PER_CLASS, "test": math.ceil(MIN_TEST_IMAGES / half)}


def make_suite(root: str | os.PathLike, seed: int = 0, overwrite: bool = False,
               log: Callable[[str], None] = print, datasets=None, sizes: Callable[[int], dict] | None = None) -> dict:
    """Write every dataset of the suite (and its DG variants) under ``root``, and ``root/suite.json``.

    Args:
        seed: seed of the images (classes never change); ``toy_objects_v2`` uses ``seed + 1000``.
        overwrite: replace the datasets of an existing suite.
        datasets: a subset of :data:`SUITE` + :data:`DG_VARIANTS` (tests write a tiny suite).
        sizes: ``sizes(classes) -> {"train", "val", "test"}`` instead of :func:`suite_sizes` (tests).
    Returns the suite record written to ``suite.json``.
    """
    from .make import check_seed, make

    check_seed(seed)
    root = Path(root)
    if (root / SUITE_FILE).exists() and not overwrite:
        raise FileExistsError(f"{root} already holds a suite ({SUITE_FILE}); choose a new directory or pass "
                              "--overwrite")
    if root.exists() and any(root.iterdir()) and not (root / SUITE_FILE).exists():
        raise FileExistsError(f"{root} exists, is not empty and holds no suite: choose a new directory")
    chosen = list(datasets) if datasets is not None else list(SUITE + DG_VARIANTS)
    entries = []
    for dataset in chosen:
        concepts = suite_concepts(dataset)
        split = (sizes or suite_sizes)(len(concepts))
        image_seed = seed + _V2_SEED_OFFSET if dataset.name == "toy_objects_v2" else seed
        role = _role(dataset)
        make(root / dataset.name, seed=image_seed, domain=dataset.domain, overwrite=overwrite, concepts=concepts,
             sizes=split, extra={"suite": {"name": dataset.name, "mirrors": dataset.mirrors, "kind": dataset.kind,
                                           "role": role}})
        (root / "descriptions").mkdir(exist_ok=True)  # <name>.json per dataset: the grid's --descriptions folder
        (root / "descriptions" / f"{dataset.name}.json").write_bytes(
            (root / dataset.name / "descriptions.json").read_bytes())
        entries.append({**asdict(dataset), "seed": image_seed, "split_sizes": split, "role": role,
                        "test_images": split["test"] * len(concepts)})
        log(f"wrote {root / dataset.name}: {len(concepts)} classes, {dataset.domain}, "
            f"{split['train']}/{split['val']}/{split['test']} train/val/test per class ({dataset.mirrors}-like)")
    names = [e["name"] for e in entries]
    record = {
        "suite_version": 1, "seed": seed, "datasets": entries,
        "protocols": {
            "base2novel": [d.name for d in SUITE if d.name in names],
            "cross_dataset": {"source": "toy_objects", "targets": [d.name for d in SUITE[1:] if d.name in names]},
            "domain_generalization": {"source": "toy_objects",
                                      "targets": [d.name for d in DG_VARIANTS if d.name in names]},
        },
    }
    (root / SUITE_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def _role(dataset: SuiteDataset) -> str:
    if dataset in DG_VARIANTS:
        return "domain-generalization target"
    if dataset.name == "toy_objects":
        return "base-to-novel; cross-dataset and domain-generalization source"
    return "base-to-novel; cross-dataset target"


def read_suite(root: str | os.PathLike) -> dict:
    """``root/suite.json``, with each dataset's folder checked to exist; a clear error when it is not a suite."""
    root = Path(root)
    path = root / SUITE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{root} holds no {SUITE_FILE}: write a suite with 'anchoropt toyworld suite {root}'")
    record = json.loads(path.read_text(encoding="utf-8"))
    missing = [e["name"] for e in record.get("datasets", []) if not (root / e["name"] / "world.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{path} lists datasets whose folders are missing or incomplete: {missing}")
    _check_classes(root, record)
    return record


def _check_classes(root: Path, record: dict) -> None:
    """Each dataset's ``classes.txt`` must be the classes, in the order, this version draws for it: a suite made by
    anchoropt between b6e7f35 and 8cf94bd (other classes on every dataset but toy_objects) is refused by name."""
    specs = {d.name: d for d in SUITE + DG_VARIANTS}
    drawn_otherwise = []
    for entry in record.get("datasets", []):
        spec = specs.get(entry["name"])
        file = root / entry["name"] / "classes.txt"
        if spec is None or not file.is_file():
            continue
        found = [line for line in file.read_text(encoding="utf-8").splitlines() if line]
        if found != [c.name for c in suite_concepts(spec)]:
            drawn_otherwise.append(entry["name"])
    if drawn_otherwise:
        raise ValueError(f"{root}: the classes of {drawn_otherwise} are not the ones this version of the suite draws "
                         "(a suite written by an anchoropt whose class shuffle was keyed on the toy_ names: its "
                         "figures are not comparable with the shipped card's); write it again with "
                         "'anchoropt toyworld suite NEW_DIR'")


def suite_scope(suite: dict, datasets: Sequence[str] | None, seeds: Sequence[int],
                quick: bool = False) -> tuple[list[str], list[int]]:
    """The base-to-novel datasets and seeds a suite command covers: ``datasets`` (default: all of them, or
    :data:`QUICK_DATASETS` with ``quick``) and ``seeds`` (only the first with ``quick``).

    Raises:
        ValueError: a name that is not a base-to-novel dataset of ``suite`` (the record :func:`read_suite` reads).
    """
    known = suite["protocols"]["base2novel"]
    names = list(datasets or (QUICK_DATASETS if quick else known))
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"not base-to-novel datasets of the suite: {unknown} (it has {', '.join(known)})")
    return names, list(seeds)[:1] if quick else list(seeds)
