"""anchoropt.datasets.folders: dataset layouts, CoOp split files, Dassl's few-shot sampling and base/novel subsampling."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict

import pytest
import torch

from anchoropt.datasets import folders as D


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 5-class synthetic ImageFolder, 10 images per class (names with underscores and spaces)."""
    root = tmp_path_factory.mktemp("folder")
    return D.make_synthetic_image_folder(root, ["b_class", "a class", "e", "d", "c"], per_class=10, size=16)


def _records(n_classes: int, per_class: int) -> list[D.Record]:
    return [D.Record(f"img_{c}_{i}.jpg", c, f"class{c}") for c in range(n_classes) for i in range(per_class)]


# ---------------------------------------------------------------------- layouts
def test_image_folder_sorts_classes_and_cleans_names(folder):
    records, names = D.read_image_folder(folder)
    assert names == ["a class", "b class", "c", "d", "e"]  # sorted by folder name, "_" read as a space
    assert len(records) == 50
    assert {r.label for r in records if r.classname == "b class"} == {1}
    assert all(r.path.endswith(".png") for r in records)


def test_image_folder_skips_non_images_and_hidden(tmp_path):
    root = D.make_synthetic_image_folder(tmp_path / "d", ["x", "y"], per_class=2, size=8)
    (root / "x" / "notes.txt").write_text("not an image")
    (root / "x" / ".hidden.png").write_bytes(b"")
    (root / ".cache").mkdir()
    records, names = D.read_image_folder(root)
    assert names == ["x", "y"] and len(records) == 4


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        D.read_image_folder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no class sub-directories"):
        D.read_image_folder(tmp_path / "flat")


def test_plain_folder_holdout_split_is_per_class_and_seeded(folder):
    a = D.open_dataset(folder, split_seed=3)
    b = D.open_dataset(folder, split_seed=3)
    c = D.open_dataset(folder, split_seed=4)
    assert a.layout == "folder_split"
    assert (len(a.train), len(a.val), len(a.test)) == (25, 10, 15)  # 5 / 2 / 3 per class
    assert a.train == b.train and a.train != c.train
    assert not set(a.train) & set(a.test)
    whole = D.open_dataset(folder, holdout=False)
    assert whole.layout == "folder" and len(whole.test) == 50 and not whole.train


def test_train_test_subfolders(tmp_path):
    D.make_synthetic_image_folder(tmp_path / "ds" / "train", ["cat", "dog"], per_class=3, size=8)
    D.make_synthetic_image_folder(tmp_path / "ds" / "test", ["dog"], per_class=2, size=8)
    ds = D.open_dataset(tmp_path / "ds")
    assert ds.layout == "subfolders" and ds.classnames == ["cat", "dog"]
    assert {r.label for r in ds.test} == {1}  # labelled with the training split's classes
    D.make_synthetic_image_folder(tmp_path / "ds" / "test", ["owl"], per_class=1, size=8)
    with pytest.raises(ValueError, match="not among the classes"):
        D.open_dataset(tmp_path / "ds")


def _write_split(root, image_dir="images", labels=(0, 1, 2)):
    images = root / image_dir
    D.make_synthetic_image_folder(images, [f"k{l}" for l in labels], per_class=4, size=8)
    rows = {s: [] for s in ("train", "val", "test")}
    for label in labels:
        for i in range(4):
            split = "train" if i < 2 else ("val" if i == 2 else "test")
            rows[split].append([f"k{label}/{i:04d}.png", label, f"name_{label}"])
    (root / "split_zhou_Toy.json").write_text(json.dumps(rows))
    return root


def test_coop_split_json_is_found_with_its_image_root(tmp_path):
    ds = D.open_dataset(_write_split(tmp_path / "toy"))
    assert ds.layout == "split_json" and ds.name == "toy"
    assert ds.classnames == ["name 0", "name 1", "name 2"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 3, 3)
    assert all(r.path.startswith(str(tmp_path / "toy" / "images")) for r in ds.train)
    image, label, index = D.ImageDataset(ds.test, lambda im: torch.tensor(im.size))[1]
    assert image.tolist() == [8, 8] and label == 1 and index == 1


def test_split_json_relabels_sparse_labels_and_rejects_conflicts(tmp_path):
    ds = D.open_dataset(_write_split(tmp_path / "sparse", labels=(3, 7, 9)))
    assert sorted({r.label for r in ds.train}) == [0, 1, 2] and ds.classnames == ["name 3", "name 7", "name 9"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": [["a.png", 0, "x"], ["b.png", 0, "y"]], "val": [], "test": []}))
    with pytest.raises(ValueError, match="label 0 is both"):
        D.read_split_json(bad, tmp_path)
    bad.write_text(json.dumps({"train": [["a.png", 0]], "test": []}))
    with pytest.raises(ValueError, match=r"\[path, label, classname\]"):
        D.read_split_json(bad, tmp_path)


def test_split_json_missing_images_says_how_to_fix(tmp_path):
    root = _write_split(tmp_path / "moved")
    (root / "images").rename(root / "elsewhere_pics_renamed")
    ds = D.open_dataset(root)  # still found: a sub-directory holds the first image
    assert "elsewhere_pics_renamed" in ds.train[0].path
    (root / "elsewhere_pics_renamed").rename(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="--image-root"):
        D.open_dataset(root)


def test_classnames_file_maps_folders(tmp_path):
    root = D.make_synthetic_image_folder(tmp_path / "inet", ["n01440764", "n01443537"], per_class=2, size=8)
    (root / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    ds = D.open_dataset(root, holdout=False)
    assert ds.classnames == ["tench", "goldfish"]


# ---------------------------------------------------------------------- protocols
def _dassl_fewshot(records, shots, seed):
    """Dassl's generate_fewshot_dataset procedure, spelled out: global random seeded, per label in order of
    first appearance, random.sample (random.choices when short)."""
    random.seed(seed)
    tracker = defaultdict(list)
    for r in records:
        tracker[r.label].append(r)
    out = []
    for items in tracker.values():
        out += random.sample(items, shots) if len(items) >= shots else random.choices(items, k=shots)
    return out


def test_few_shot_follows_dassls_procedure():
    records = _records(6, 9)
    random.Random(0).shuffle(records)
    for seed in (1, 2, 3):
        assert D.few_shot(records, 4, seed) == _dassl_fewshot(records, 4, seed)
    short = _records(2, 3)
    assert D.few_shot(short, 5, 1) == _dassl_fewshot(short, 5, 1)  # repeats, as Dassl's repeat=True
    assert len(D.few_shot(short, 5, 1, repeat=False)) == 6
    assert D.few_shot(records, 0, 1) == records


def test_sample_few_shot_draws_train_then_val_from_one_rng(folder):
    ds = D.open_dataset(folder)
    few = D.sample_few_shot(ds, 4, seed=1)
    rng = random.Random(1)
    assert few.train == D.few_shot(ds.train, 4, rng)
    assert few.val == D.few_shot(ds.val, 4, rng)  # min(K, 4)
    assert few.test == ds.test
    assert D.sample_few_shot(ds, 4, seed=2).train != few.train


@pytest.mark.parametrize("n_classes", [4, 5, 101])
def test_subsample_classes_takes_ceil_half_as_base(n_classes):
    records = _records(n_classes, 2)
    ds = D.DatasetSplits("toy", [f"class{c}" for c in range(n_classes)], records, [], records)
    base, new = D.subsample_classes(ds, "base"), D.subsample_classes(ds, "new")
    m = math.ceil(n_classes / 2)
    assert base.classnames == [f"class{c}" for c in range(m)]
    assert new.classnames == [f"class{c}" for c in range(m, n_classes)]
    assert sorted({r.label for r in new.test}) == list(range(n_classes - m))  # relabelled from 0
    assert all(new.classnames[r.label] == r.classname for r in new.test)
    assert D.base_novel_split(n_classes) == (list(range(m)), list(range(m, n_classes)))
    assert D.subsample_classes(ds, "all") is ds
    with pytest.raises(ValueError):
        D.subsample_classes(ds, "half")


def test_image_dataset_reports_unreadable_files(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match="cannot read image"):
        D.ImageDataset([D.Record(str(broken), 0, "x")])[0]
