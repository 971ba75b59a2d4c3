"""load_descriptions: the CuPL / ATPrompt ``{class name: [sentences]}`` format, real file and bad files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from anchoropt import DescriptionsError, load_descriptions

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write(tmp_path: Path, content, name: str = "d.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def _has_letter(sentence: str) -> bool:
    return re.search(r"[^\W\d_]", sentence) is not None


# ---------------------------------------------------------------- the real file


@pytest.fixture(scope="module")
def cifar10_file(shared_data) -> Path:
    path = shared_data / "descriptions" / "cifar10.json"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    return path


@pytest.mark.shared_data
def test_real_cifar10_file(cifar10_file) -> None:
    raw = json.loads(cifar10_file.read_text(encoding="utf-8"))
    loaded = load_descriptions(cifar10_file, CIFAR10)
    assert list(loaded) == CIFAR10
    for name in CIFAR10:
        assert loaded[name] == [s.strip() for s in raw[name] if _has_letter(s)]
        assert all(_has_letter(s) for s in loaded[name])
    # The real file has junk sentences (a lone "."): they must be gone.
    junk = {name: [s for s in raw[name] if not _has_letter(s)] for name in CIFAR10}
    assert sum(map(len, junk.values())) > 0
    for name, bad in junk.items():
        assert len(loaded[name]) == len(raw[name]) - len(bad)
        assert not set(bad) & set(loaded[name])


@pytest.mark.shared_data
def test_real_file_all_classes_and_order(cifar10_file) -> None:
    raw = json.loads(cifar10_file.read_text(encoding="utf-8"))
    assert list(load_descriptions(cifar10_file)) == list(raw)  # no class list: every key, file order
    reordered = ["truck", "cat", "airplane"]
    assert list(load_descriptions(cifar10_file, reordered)) == reordered


@pytest.mark.shared_data
def test_real_file_max_per_class(cifar10_file) -> None:
    full = load_descriptions(cifar10_file, CIFAR10)
    first3 = load_descriptions(str(cifar10_file), CIFAR10, max_per_class=3)
    for name in CIFAR10:
        assert first3[name] == full[name][:3]


# ---------------------------------------------------------------- behaviour on small files


def test_junk_dropped_and_first_n_in_file_order(tmp_path) -> None:
    path = _write(tmp_path, {"cat": [".", "third is a cat.", "  ", "A cat!", "...", "1234", " a purring cat "]})
    assert load_descriptions(path) == {"cat": ["third is a cat.", "A cat!", "a purring cat"]}
    assert load_descriptions(path, max_per_class=2) == {"cat": ["third is a cat.", "A cat!"]}
    assert load_descriptions(path, max_per_class=99) == {"cat": ["third is a cat.", "A cat!", "a purring cat"]}


def test_keys_match_with_underscores_and_case(tmp_path) -> None:
    path = _write(tmp_path, {"Sea Lion": ["a sea lion."], "fire_truck": ["a red truck."], "Dog": ["a dog."]})
    loaded = load_descriptions(path, ["sea_lion", "Fire Truck", "dog"])
    assert loaded == {"sea_lion": ["a sea lion."], "Fire Truck": ["a red truck."], "dog": ["a dog."]}


def test_mapping_source_and_single_string(tmp_path) -> None:
    assert load_descriptions({"cat": "one sentence about a cat."}) == {"cat": ["one sentence about a cat."]}


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"descriptions file not found: .*nowhere\.json"):
        load_descriptions(tmp_path / "nowhere.json")


def test_invalid_json(tmp_path) -> None:
    path = _write(tmp_path, '{"cat": ["a cat."]', "broken.json")
    with pytest.raises(DescriptionsError, match=r"broken\.json is not valid JSON"):
        load_descriptions(path)


def test_top_level_list(tmp_path) -> None:
    path = _write(tmp_path, [["cat", "a cat."]], "list.json")
    with pytest.raises(DescriptionsError, match=r"list\.json must be a JSON object .*got list"):
        load_descriptions(path)


def test_missing_class_with_hint(tmp_path) -> None:
    path = _write(tmp_path, {"airplane": ["a plane."], "automobile": ["a car."]})
    message = r"no descriptions for 1 class\(es\): 'aeroplane' \(closest: 'airplane'\)$"
    with pytest.raises(DescriptionsError, match=message):
        load_descriptions(path, ["automobile", "aeroplane"])
    with pytest.raises(DescriptionsError) as info:  # nothing close: no empty "(closest: [])"
        load_descriptions(path, ["zebra"])
    assert str(info.value).endswith("'zebra'") and "closest" not in str(info.value)


def test_many_missing_classes_are_summarised(tmp_path) -> None:
    path = _write(tmp_path, {"cat": ["a cat."]})
    names = [f"class{i}" for i in range(8)]
    with pytest.raises(DescriptionsError, match=r"no descriptions for 8 class\(es\): 'class0'.*'class4' \.\.\.$"):
        load_descriptions(path, names)


def test_empty_list(tmp_path) -> None:
    path = _write(tmp_path, {"cat": ["a cat."], "dog": []})
    with pytest.raises(DescriptionsError, match=r"class 'dog' has an empty list of descriptions"):
        load_descriptions(path)


def test_non_list_value(tmp_path) -> None:
    path = _write(tmp_path, {"dog": {"text": "a dog."}})
    with pytest.raises(DescriptionsError, match=r"class 'dog' must map to a list of sentences, got dict"):
        load_descriptions(path)


def test_non_string_sentence(tmp_path) -> None:
    path = _write(tmp_path, {"dog": ["a dog.", 42]})
    with pytest.raises(DescriptionsError, match=r"description #1 of class 'dog' is a int, not a string"):
        load_descriptions(path)


def test_all_sentences_junk(tmp_path) -> None:
    path = _write(tmp_path, {"cat": ["a cat."], "frog": [".", " ", "42"]})
    with pytest.raises(DescriptionsError, match=r"class 'frog' has no usable description \(none contains a letter\)"):
        load_descriptions(path)
    assert load_descriptions(path, ["cat"]) == {"cat": ["a cat."]}  # only the requested classes are checked


@pytest.mark.parametrize("n", [0, -3])
def test_bad_max_per_class(tmp_path, n) -> None:
    path = _write(tmp_path, {"cat": ["a cat."]})
    with pytest.raises(DescriptionsError, match=rf"max_per_class must be >= 1, got {n}"):
        load_descriptions(path, max_per_class=n)


def test_errors_are_value_errors() -> None:
    assert issubclass(DescriptionsError, ValueError)


def test_classnames_given_as_one_string_is_refused():
    from anchoropt import load_descriptions

    with pytest.raises(TypeError, match="not a single string"):
        load_descriptions({"cat": ["A cat."]}, "cat")


def test_keys_equal_after_normalisation_are_refused():
    from anchoropt import DescriptionsError, load_descriptions

    with pytest.raises(DescriptionsError, match="two entries for the same class: 'Sea Lion' and 'sea_lion'"):
        load_descriptions({"Sea Lion": ["A sea lion."], "sea_lion": ["Another."]})
