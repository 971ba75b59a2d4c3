"""Tiny copies of every dataset layout of CoOp's DATASETS.md, with the exact file and folder names.

``make_layout(DATA, key)`` writes ``DATA/<folder>`` for one key of :data:`DATASETS` and returns its path;
``write_dassl_fewshot`` writes ``split_fewshot/shot_K-seed_S.pkl`` the way CoOp's dataset classes do (a
pickled ``{"train": [Datum, ...], "val": [...]}`` of ``dassl.data.datasets.base_dataset.Datum`` objects, made
here with a stand-in module of that name).  Images are 32 x 32 JPEGs (PNG for EuroSAT's own name, .jpg too).
"""

from __future__ import annotations

import json
import pickle
import random
import sys
import types
from pathlib import Path

import pytest

# wnid -> class name, as lines of CoOp's imagenet/classnames.txt (the first four ImageNet classes, and two more)
WNIDS = {
    "n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
    "n01491361": "tiger shark", "n01494475": "hammerhead shark", "n01496331": "electric ray",
}

# key: (folder under DATA, split file, image folder under the dataset folder ("" = itself), class names)
SPLIT_DATASETS = {
    "caltech101": ("caltech-101", "split_zhou_Caltech101.json", "101_ObjectCategories", ["accordion", "airplane", "anchor"]),
    "oxford_pets": ("oxford_pets", "split_zhou_OxfordPets.json", "images", ["abyssinian", "american_bulldog", "beagle"]),
    "stanford_cars": ("stanford_cars", "split_zhou_StanfordCars.json", "", ["2000 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 Audi A5 Coupe"]),
    "oxford_flowers": ("oxford_flowers", "split_zhou_OxfordFlowers.json", "jpg", ["pink primrose", "globe thistle", "blanket flower"]),
    "food101": ("food-101", "split_zhou_Food101.json", "images", ["apple_pie", "baby_back_ribs", "baklava"]),
    "sun397": ("sun397", "split_zhou_SUN397.json", "SUN397", ["abbey", "airplane cabin", "airport terminal"]),
    "dtd": ("dtd", "split_zhou_DescribableTextures.json", "images", ["banded", "blotchy", "braided"]),
    "eurosat": ("eurosat", "split_zhou_EuroSAT.json", "2750", ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land"]),
    "ucf101": ("ucf101", "split_zhou_UCF101.json", "UCF-101-midframes", ["Apply_Eye_Makeup", "Apply_Lipstick", "Archery"]),
}
OTHER_DATASETS = {
    "imagenet": "imagenet", "fgvc_aircraft": "fgvc_aircraft", "imagenetv2": "imagenetv2",
    "imagenet_sketch": "imagenet-sketch", "imagenet_a": "imagenet-adversarial", "imagenet_r": "imagenet-rendition",
}
DATASETS = {**{k: v[0] for k, v in SPLIT_DATASETS.items()}, **OTHER_DATASETS}
"""Every layout key -> its folder name under ``$DATA`` (CoOp's DATASETS.md)."""

VARIANTS = ["707-320", "A300B4", "F-16A/B"]
PER_SPLIT = {"train": 4, "val": 2, "test": 3}


def _image(path: Path, seed: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    colour = tuple(rng.randrange(256) for _ in range(3))
    Image.new("RGB", (32, 32), colour).save(path, format="JPEG")


def _classnames_txt(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in WNIDS.items()))


def make_layout(data: Path, key: str, n_classes: int = 3) -> Path:
    """Write the tiny copy of dataset ``key`` under ``data``; returns the dataset folder."""
    data = Path(data)
    seed = 0
    if key in SPLIT_DATASETS:
        folder, split_file, image_dir, names = SPLIT_DATASETS[key]
        root = data / folder
        split = {}
        for name in ("train", "val", "test"):
            rows = []
            for label, classname in enumerate(names[:n_classes]):
                for i in range(PER_SPLIT[name]):
                    rel = f"{classname.replace(' ', '_')}/{name}_{i:04d}.jpg"
                    if key == "stanford_cars":
                        rel = f"cars_{'test' if name == 'test' else 'train'}/{label:02d}{name}{i:03d}.jpg"
                    _image(root / image_dir / rel, seed := seed + 1)
                    rows.append([rel, label, classname])
            split[name] = rows
        (root / split_file).write_text(json.dumps(split, indent=4, separators=(",", ": ")))
        (root / "split_fewshot").mkdir()
        if key == "oxford_flowers":
            (root / "cat_to_name.json").write_text(json.dumps({str(i + 1): n for i, n in enumerate(names)}))
        if key == "caltech101":  # ignored by the split file: BACKGROUND_Google
            _image(root / image_dir / "BACKGROUND_Google" / "image_0001.jpg", 999)
        return root
    root = data / OTHER_DATASETS[key]
    wnids = list(WNIDS)
    if key == "imagenet":  # all six classes: the variants below are drawn from them
        for split, n in (("train", 4), ("val", 3)):
            for w in wnids:
                for i in range(n):
                    _image(root / "images" / split / w / f"{w}_{split}{i}.JPEG", seed := seed + 1)
        _classnames_txt(root)
        (root / "split_fewshot").mkdir()
    elif key == "fgvc_aircraft":
        root.mkdir(parents=True)
        (root / "variants.txt").write_text("".join(f"{v}\n" for v in VARIANTS[:n_classes]))
        (root / "families.txt").write_text("Boeing 707\nA300\nF-16\n")
        image_id = 1000000
        for split in ("train", "val", "test"):
            lines = []
            for variant in VARIANTS[:n_classes]:
                for _ in range(PER_SPLIT[split]):
                    image_id += 1
                    _image(root / "images" / f"{image_id}.jpg", image_id)
                    lines.append(f"{image_id} {variant}\n")
            (root / f"images_variant_{split}.txt").write_text("".join(lines))
            (root / f"images_family_{split}.txt").write_text("")
        (root / "split_fewshot").mkdir()
    elif key == "imagenetv2":
        for label in range(len(WNIDS)):  # every class of classnames.txt has its numbered folder
            for i in range(2):
                _image(root / "imagenetv2-matched-frequency-format-val" / str(label) / f"{label}_{i}.jpeg",
                       seed := seed + 1)
        _classnames_txt(root)
    else:
        sub = {"imagenet_sketch": "images", "imagenet_a": "imagenet-a", "imagenet_r": "imagenet-r"}[key]
        chosen = wnids if key == "imagenet_sketch" else wnids[1:1 + n_classes]  # A / R: a subset of the classes
        for w in chosen:
            for i in range(2):
                _image(root / sub / w / f"{i}.jpg", seed := seed + 1)
        if key != "imagenet_sketch":
            (root / sub / "README.txt").write_text("a subset of ImageNet's classes\n")
        _classnames_txt(root)
    return root


def write_dassl_fewshot(root: Path, train, val=None, shots: int = 2, seed: int = 1, moved_from: str | None = None,
                        protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    """``root/split_fewshot/shot_{shots}-seed_{seed}.pkl`` pickled as CoOp does, of the records ``train``/``val``
    (:class:`~anchoropt.datasets.folders.Record`); ``moved_from`` replaces ``root`` in the stored paths (the
    absolute paths of the machine that wrote the file)."""
    module = types.ModuleType("dassl.data.datasets.base_dataset")

    class Datum:  # Dassl's attributes and constructor (without its file check)
        def __init__(self, impath="", label=0, domain=0, classname=""):
            self._impath, self._label, self._domain, self._classname = impath, label, domain, classname

    Datum.__module__, Datum.__qualname__ = module.__name__, "Datum"
    module.Datum = Datum
    names = ["dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset"]
    saved = {name: sys.modules.get(name) for name in names}
    for name in names[:-1]:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[module.__name__] = module

    def datum(record):
        path = str(record.path)
        if moved_from:
            path = path.replace(str(root), moved_from)
        return Datum(impath=path, label=record.label, classname=record.classname)

    data = {"train": [datum(r) for r in train]}
    if val is not None:
        data["val"] = [datum(r) for r in val]
    path = Path(root) / "split_fewshot" / f"shot_{shots}-seed_{seed}.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=protocol)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """``$DATA`` with a tiny copy of every dataset of CoOp's DATASETS.md (a fixture: import it into a test module)."""
    root = tmp_path_factory.mktemp("DATA")
    for key in DATASETS:
        make_layout(root, key)
    return root
