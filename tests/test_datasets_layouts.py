"""Every dataset layout of CoOp's DATASETS.md read as CoOp's ``datasets/*.py`` read it, the refusals, and Dassl's
few-shot files read without unpickling code (fixtures: ``tests/coop_layouts.py``)."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest

from anchoropt.datasets import dassl_fewshot, layouts
from anchoropt.datasets import folders as D
from coop_layouts import (  # noqa: F401 (data: a fixture)
    DATASETS,
    SPLIT_DATASETS,
    VARIANTS,
    WNIDS,
    data,
    make_layout,
    write_dassl_fewshot,
)

# key: (layout, Dassl class, classes as source, (train, val, test) as source, classes / test images as target)
EXPECTED = {
    **{key: ("split_json", split[len("split_zhou_"):-len(".json")], 3, (12, 6, 9), (3, 9))
       for key, (_, split, _, _) in SPLIT_DATASETS.items()},
    "imagenet": ("imagenet", "ImageNet", 6, (24, 0, 18), (6, 18)),
    "fgvc_aircraft": ("fgvc_aircraft", "FGVCAircraft", 3, (12, 6, 9), (3, 9)),
    "imagenetv2": ("imagenetv2", "ImageNetV2", 6, None, (6, 12)),
    "imagenet_sketch": ("imagenet_sketch", "ImageNetSketch", 6, None, (6, 12)),
    "imagenet_a": ("imagenet_a", "ImageNetA", 3, None, (3, 6)),
    "imagenet_r": ("imagenet_r", "ImageNetR", 3, None, (3, 6)),
}


@pytest.mark.parametrize("key", sorted(DATASETS))
def test_every_layout_is_recognised_and_read_as_coop_reads_it(data, key):
    layout, dassl, n_classes, sizes, (target_classes, target_images) = EXPECTED[key]
    root = data / DATASETS[key]
    assert layouts.detect_layout(root) == layout
    target = layouts.open_dataset(root, holdout=False)
    assert (target.layout, target.dataset, target.n_classes, len(target.test)) == (
        layout, dassl, target_classes, target_images)
    assert "split fewshot" not in target.classnames and all(Path(r.path).is_file() for r in target.test)
    assert {r.classname for r in target.test} == set(target.classnames)
    assert all(target.classnames[r.label] == r.classname for r in target.test)
    if sizes is not None:
        source = layouts.open_dataset(root)
        assert source.n_classes == n_classes
        assert (len(source.train), len(source.val), len(source.test)) == sizes


def test_split_files_keep_their_labels_and_image_folder(data):
    pets = layouts.open_dataset(data / "oxford_pets")
    assert pets.classnames == ["abyssinian", "american bulldog", "beagle"]  # '_' read as a space, as CoOp's prompts
    assert Path(pets.train[0].path).parent.parent == data / "oxford_pets" / "images"
    cars = layouts.open_dataset(data / "stanford_cars")  # paths relative to the dataset folder itself
    assert Path(cars.train[0].path).parent.name == "cars_train"
    caltech = layouts.open_dataset(data / "caltech-101")  # BACKGROUND_Google is not in the split file
    assert "BACKGROUND Google" not in caltech.classnames


def test_fgvc_aircraft_reads_the_variant_files(data):
    root = data / "fgvc_aircraft"
    ds = layouts.open_dataset(root)
    assert ds.classnames == VARIANTS  # labels in variants.txt order, names as written ('/' kept)
    first = (root / "images_variant_train.txt").read_text().splitlines()[0].split(" ", 1)
    assert ds.train[0].path == str(root / "images" / f"{first[0]}.jpg") and ds.train[0].classname == first[1]
    assert {r.label for r in ds.test} == {0, 1, 2}


def test_imagenet_uses_val_as_test_and_a_target_reads_val_only(data):
    root = data / "imagenet"
    ds = layouts.open_dataset(root)
    assert ds.classnames == list(WNIDS.values())  # sorted wnid folders, named by classnames.txt
    assert all("/images/val/" in Path(r.path).as_posix() for r in ds.test)
    assert all("/images/train/" in Path(r.path).as_posix() for r in ds.train)
    assert layouts.open_dataset(root, holdout=False).train == []


def test_imagenet_v2_folders_are_indices_into_classnames_txt(data):
    ds = layouts.open_dataset(data / "imagenetv2", holdout=False)
    assert ds.classnames == list(WNIDS.values())
    for record in ds.test:
        assert Path(record.path).parent.name == str(record.label)
        assert record.classname == list(WNIDS.values())[record.label]


def test_imagenet_a_and_r_are_scored_over_their_own_classes(data):
    for folder in ("imagenet-adversarial", "imagenet-rendition"):
        ds = layouts.open_dataset(data / folder, holdout=False)
        assert ds.classnames == list(WNIDS.values())[1:4]  # the subset present, relabelled 0..n-1 (README.txt ignored)
        assert sorted({r.label for r in ds.test}) == [0, 1, 2]


def test_a_test_set_given_as_data_is_split_per_class(data):
    ds = layouts.open_dataset(data / "imagenet-sketch")
    assert ds.layout == "imagenet_sketch" and len(ds.train) == 6 and len(ds.test) + len(ds.val) == 6


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize("sub, message", [
    ("imagenet/images", r"split folders, not classes.*DATA/imagenet"),
    ("imagenetv2/imagenetv2-matched-frequency-format-val", r"numbers .*ImageNet-V2's label indices"),
    ("imagenet-adversarial/imagenet-a", r"WordNet ids .*classnames.txt"),
    ("fgvc_aircraft/images", r"none of the layouts tried.*fgvc_aircraft: images/<id>.jpg.*folder: one sub-folder"),
])
def test_a_part_of_a_dataset_is_refused_with_the_folder_to_pass(data, sub, message):
    for holdout in (True, False):
        with pytest.raises(ValueError, match=f"(?s){message}"):
            layouts.open_dataset(data / sub, holdout=holdout)


def test_fewer_than_two_classes_is_refused_as_source_and_target(tmp_path):
    D.make_synthetic_image_folder(tmp_path / "one", ["cat"], per_class=6, size=8)
    for holdout, role in ((True, "a dataset"), (False, "a target")):
        with pytest.raises(layouts.LayoutError, match=f"1 class.*{role} needs at least two classes"):
            layouts.open_dataset(tmp_path / "one", holdout=holdout)


def test_a_folder_in_no_layout_lists_every_layout_tried(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(layouts.LayoutError) as err:
        layouts.open_dataset(tmp_path)
    for name, needs in layouts.LAYOUTS.items():
        assert f"{name}: {needs}" in str(err.value)


@pytest.mark.parametrize("key, remove, missing", [
    ("imagenet", "classnames.txt", "classnames.txt"),
    ("fgvc_aircraft", "images_variant_val.txt", "images_variant_val.txt"),
    ("imagenetv2", "classnames.txt", "classnames.txt"),
])
def test_a_layout_with_a_part_missing_names_it(tmp_path, key, remove, missing):
    root = make_layout(tmp_path, key)
    (root / remove).unlink()
    with pytest.raises(layouts.LayoutError, match=f"looks like the {key} layout but lacks .*{missing}"):
        layouts.open_dataset(root)


def test_imagenet_v2_with_a_missing_or_stray_folder_is_refused(tmp_path):
    root = make_layout(tmp_path, "imagenetv2")
    image_dir = root / "imagenetv2-matched-frequency-format-val"
    (image_dir / "6").mkdir()
    with pytest.raises(layouts.LayoutError, match=r"\['6'\] are not class indices 0..5"):
        layouts.open_dataset(root, holdout=False)
    (image_dir / "6").rmdir()
    for path in (image_dir / "3").iterdir():
        path.unlink()
    (image_dir / "3").rmdir()
    with pytest.raises(layouts.LayoutError, match=r"no folder for class index\(es\) \[3\]"):
        layouts.open_dataset(root, holdout=False)


def test_wnid_folders_missing_from_classnames_txt_are_named(tmp_path):
    root = make_layout(tmp_path, "imagenet_r")
    (root / "imagenet-r" / "n09999999").mkdir()
    with pytest.raises(layouts.LayoutError, match=r"\['n09999999'\] are not in .*classnames.txt"):
        layouts.open_dataset(root, holdout=False)


def test_split_fewshot_and_non_image_folders_are_never_classes(tmp_path):
    D.make_synthetic_image_folder(tmp_path, ("circle", "square"), per_class=5, size=8)
    (tmp_path / "split_fewshot").mkdir()
    (tmp_path / "split_fewshot" / "shot_1-seed_1.pkl").write_bytes(b"x")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "list.txt").write_text("x")
    with pytest.warns(UserWarning, match=r"\['annotations'\] hold files but no images"):
        ds = layouts.open_dataset(tmp_path)
    assert ds.classnames == ["circle", "square"]


# ---------------------------------------------------------------------- Dassl's few-shot files
def _pick(records, per_class):
    out, seen = [], {}
    for record in records:
        if seen.setdefault(record.label, 0) < per_class:
            seen[record.label] += 1
            out.append(record)
    return out[::-1]  # another order than the split's: the file's order is kept


@pytest.mark.parametrize("protocol", [pickle.HIGHEST_PROTOCOL, 2, 0])
def test_dassl_fewshot_file_written_elsewhere_gives_dasls_images(tmp_path, protocol):
    root = make_layout(tmp_path, "oxford_pets")
    ds = layouts.open_dataset(root)
    train, val = _pick(ds.train, 2), _pick(ds.val, 1)
    write_dassl_fewshot(root, train, val, shots=2, seed=3, moved_from="/cluster/alice/DATA/oxford_pets",
                        protocol=protocol)
    few = dassl_fewshot.dassl_few_shot(ds, 2, 3)
    assert few.train == train and few.val == val and few.test == ds.test
    raw = dassl_fewshot.read_fewshot_file(dassl_fewshot.fewshot_path(root, 2, 3))
    assert raw["train"][0].impath.startswith("/cluster/alice/DATA/oxford_pets/images/")


def test_dassl_fewshot_for_imagenet_has_train_only(tmp_path):
    root = make_layout(tmp_path, "imagenet")
    ds = layouts.open_dataset(root)
    train = _pick(ds.train, 1)
    write_dassl_fewshot(root, train, None, shots=1, seed=1)
    few = dassl_fewshot.dassl_few_shot(ds, 1, 1)
    assert few.train == train and few.val == ds.val
    assert dassl_fewshot.available_fewshot(root) == [(1, 1)]


def test_a_missing_fewshot_file_names_what_is_there(tmp_path):
    root = make_layout(tmp_path, "dtd")
    ds = layouts.open_dataset(root)
    write_dassl_fewshot(root, _pick(ds.train, 1), _pick(ds.val, 1), shots=1, seed=2)
    with pytest.raises(FileNotFoundError, match=r"shot_16-seed_1.pkl is absent.*\(shots, seed\) \[\(1, 2\)\]"):
        dassl_fewshot.dassl_few_shot(ds, 16, 1)


def test_a_fewshot_file_of_another_split_is_refused(tmp_path):
    root = make_layout(tmp_path, "eurosat")
    ds = layouts.open_dataset(root)
    write_dassl_fewshot(root, _pick(ds.test, 1), None, shots=1, seed=1)  # test images: not in the train split
    with pytest.raises(ValueError, match="not in the train split"):
        dassl_fewshot.dassl_few_shot(ds, 1, 1)
    write_dassl_fewshot(root, _pick(ds.train, 1)[:2], None, shots=1, seed=1)  # a class without images
    with pytest.raises(ValueError, match=r"no training image of 1 class"):
        dassl_fewshot.dassl_few_shot(ds, 1, 1)
    renamed = [D.Record(r.path, r.label, "other class") for r in _pick(ds.train, 1)]
    write_dassl_fewshot(root, renamed, None, shots=1, seed=1)
    with pytest.raises(ValueError, match="is class 'other class' there"):
        dassl_fewshot.dassl_few_shot(ds, 1, 1)


class _Payload:
    """Unpickling this would create a file: the reader must refuse it before calling anything."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


@pytest.mark.parametrize("content", ["payload", "dict_global"])
def test_a_fewshot_file_with_code_is_refused_and_nothing_runs(tmp_path, content):
    marker = tmp_path / "ran"
    path = tmp_path / "split_fewshot" / "shot_1-seed_1.pkl"
    path.parent.mkdir()
    obj = {"train": [_Payload(marker)]} if content == "payload" else {"train": [], "val": [warnings.warn]}
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(dassl_fewshot.UnsafePickleError, match="refused .*nothing from the file was run"):
        dassl_fewshot.read_fewshot_file(path)
    assert not marker.exists()


def test_a_damaged_fewshot_file_is_named(tmp_path):
    path = tmp_path / "shot_1-seed_1.pkl"
    path.write_bytes(pickle.dumps({"train": []})[:5])
    with pytest.raises(ValueError, match="not a readable Dassl few-shot file"):
        dassl_fewshot.read_fewshot_file(path)
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a dict with 'train'"):
        dassl_fewshot.read_fewshot_file(path)


def test_a_classnames_file_given_elsewhere_serves_the_imagenet_layouts(tmp_path):
    root = make_layout(tmp_path, "imagenet_a")
    names = tmp_path / "names.txt"
    (root / "classnames.txt").rename(names)
    with pytest.raises(layouts.LayoutError, match="looks like the imagenet_a layout but lacks"):
        layouts.open_dataset(root, holdout=False)
    ds = layouts.open_dataset(root, holdout=False, classnames_file=names)
    assert ds.layout == "imagenet_a" and ds.classnames == list(WNIDS.values())[1:4]


def test_a_class_named_images_is_not_imagenet_sketch(tmp_path):
    D.make_synthetic_image_folder(tmp_path, ("images", "cats"), per_class=5, size=8)
    (tmp_path / "classnames.txt").write_text("images pictures\ncats cats\n")
    assert layouts.detect_layout(tmp_path) == "folder"
    assert layouts.open_dataset(tmp_path).classnames == ["cats", "pictures"]
