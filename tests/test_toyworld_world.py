"""The toy world's generator: concepts, names, rendering, descriptions and the files `make` writes."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest

from anchoropt.datasets.folders import open_dataset, sample_few_shot, subsample_classes
from anchoropt.toyworld import concepts as C
from anchoropt.toyworld.captions import CaptionMix, Captioner
from anchoropt.toyworld.descriptions import descriptions
from anchoropt.toyworld.make import make, split_sizes
from anchoropt.toyworld.render import DOMAINS, apply_domain, image_rng, render


def _tree_digest(root) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "world"
    make(root, seed=3, classes=6, per_class=10)
    return root


def test_world_size_groups_and_unique_bundles():
    world = C.world()
    assert len(world) == C.N_GROUPS * C.GROUP_SIZE >= 200
    assert Counter(c.group for c in world) == {g: C.GROUP_SIZE for g in range(C.N_GROUPS)}
    assert len({c.bundle() for c in world}) == len(world)  # no two classes share all defining attributes
    assert len({c.name for c in world}) == len(world)
    assert [c.index for c in world] == list(range(len(world)))


def test_fine_grained_neighbours_differ_in_one_attribute():
    by_cluster: dict[int, list] = {}
    for c in C.world():
        by_cluster.setdefault(c.cluster, []).append(c)
    pairs = one_apart = 0
    for members in by_cluster.values():
        assert len({m.group for m in members}) == 1
        for i, a in enumerate(members):
            for b in members[:i]:
                pairs += 1
                one_apart += sum(x != y for x, y in zip(a.bundle(), b.bundle())) == 1
    assert pairs >= 150 and one_apart >= pairs // 2  # roots and their neighbours differ in exactly one


def test_names_are_1_to_4_bpe_tokens_and_not_attribute_words():
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    for concept in C.world():
        assert re.fullmatch(r"[a-z]+", concept.name), concept.name
        assert 1 <= len(bpe.encode(concept.name)) <= 4, concept.name
        assert concept.name not in C.ATTRIBUTE_WORDS
        assert not any(word in concept.name for word in C.ATTRIBUTE_WORDS if len(word) >= 3), concept.name


def test_render_is_deterministic_and_domains_differ():
    concept = C.group(0)[0]
    a = render(concept, image_rng(0, 0, concept, 0))
    b = render(concept, image_rng(0, 0, concept, 0))
    assert a.shape == (32, 32, 3) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, render(concept, image_rng(0, 0, concept, 1)))
    images = {d: render(concept, image_rng(0, 0, concept, 0), domain=d) for d in DOMAINS}
    for d in DOMAINS[1:]:
        assert np.abs(images[d] - images["photo"]).mean() > 0.005, d
    red = np.full((4, 4, 3), (0.9, 0.1, 0.1), np.float32)
    shifted = apply_domain(red, "shifted", np.random.default_rng(0))
    assert shifted[..., 1].mean() > red[..., 1].mean() + 0.05  # red drifts towards orange
    assert images["sketch"].mean() > images["photo"].mean()  # lines on white paper
    with pytest.raises(ValueError, match="unknown domain"):
        render(concept, image_rng(0, 0, concept, 0), domain="cartoon")


def test_make_layout_goes_through_the_data_path(tiny_world):
    names = (tiny_world / "classes.txt").read_text().split()
    assert names == [c.name for c in C.group(0)[:6]]
    sizes = split_sizes(10)
    assert sizes == {"train": 5, "val": 2, "test": 3}
    split = json.loads((tiny_world / "split.json").read_text())
    for name in ("train", "val", "test"):
        assert len(split[name]) == 6 * sizes[name]
        for rel, label, classname in split[name]:
            assert rel.startswith(f"{name}/{classname}/") and (tiny_world / rel).is_file()
            assert names[label] == classname
    dataset = open_dataset(tiny_world)
    assert dataset.layout == "split_json" and dataset.classnames == names
    assert len(dataset.train) == 30 and len(dataset.test) == 18
    base = subsample_classes(sample_few_shot(dataset, 2, seed=1), "base")
    assert base.classnames == names[:3] and len(base.train) == 6
    from PIL import Image

    with Image.open(dataset.test[0].path) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    world = json.loads((tiny_world / "world.json").read_text())
    assert world["seed"] == 3 and [c["name"] for c in world["concepts"]] == names


def test_make_is_deterministic_and_seed_changes_images(tiny_world, tmp_path):
    make(tmp_path / "again", seed=3, classes=6, per_class=10)
    assert _tree_digest(tmp_path / "again") == _tree_digest(tiny_world)
    make(tmp_path / "other", seed=4, classes=6, per_class=10)
    assert (tmp_path / "other/classes.txt").read_text() == (tiny_world / "classes.txt").read_text()
    first = json.loads((tiny_world / "split.json").read_text())["train"][0][0]
    assert (tmp_path / "other" / first).read_bytes() != (tiny_world / first).read_bytes()


def test_make_refuses_bad_input_and_occupied_directories(tiny_world, tmp_path):
    with pytest.raises(ValueError, match="classes must be"):
        make(tmp_path / "a", classes=C.GROUP_SIZE + 1)
    with pytest.raises(ValueError, match="per_class"):
        make(tmp_path / "a", per_class=2)
    with pytest.raises(ValueError, match="unknown domain"):
        make(tmp_path / "a", domain="cartoon")
    with pytest.raises(ValueError, match="group"):
        make(tmp_path / "a", group=C.N_GROUPS)
    with pytest.raises(FileExistsError, match="not empty"):
        make(tiny_world, classes=2, per_class=5)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="no toy world"):
        make(tmp_path / "mine", classes=2, per_class=5, overwrite=True)


def test_groups_are_disjoint_for_cross_dataset(tmp_path):
    record = make(tmp_path / "g1", classes=3, per_class=5, group=1, domain="sketch")
    assert record["domain"] == "sketch"
    names = {c["name"] for c in record["concepts"]}
    assert not names & {c.name for c in C.group(0)}


def test_descriptions_are_cupl_format_with_attributes_and_vague_sentences():
    concepts = C.group(0)[:20]
    desc = descriptions(concepts)
    assert list(desc) == [c.name for c in concepts]
    assert desc == descriptions(concepts)  # reproducible
    vague = 0
    for concept in concepts:
        sentences = desc[concept.name]
        assert len(sentences) >= 5 and len(set(sentences)) == len(sentences)
        assert all(concept.name in s.lower() for s in sentences)
        text = " ".join(sentences).lower()
        assert concept.colour in text or concept.shape in text
        vague += sum(not any(w in s.lower() for w in C.ATTRIBUTE_WORDS - {"a", "of", "the", "object", "photo"})
                     for s in sentences)
    assert vague >= len(concepts)  # some uninformative sentences, as LLM output has
    wordings = {s.replace(c.name, "X").replace(c.name.capitalize(), "X") for c in concepts for s in desc[c.name]}
    assert len(wordings) > 40  # varied wording, not one template


def test_captions_bind_names_and_attributes_with_noise():
    concepts = C.group(0)[:30]
    rng = np.random.default_rng(0)
    clean = Captioner(concepts, CaptionMix(name=1, name_attr=0, attr=0, fact=0, name_noise=0.0))
    assert all(concepts[4].name in clean.caption(4, "dark", rng) for _ in range(20))
    noisy = Captioner(concepts, CaptionMix(name=1, name_attr=0, attr=0, fact=0, name_noise=1.0))
    assert not any(re.search(rf"\b{concepts[4].name}\b", noisy.caption(4, "dark", rng)) for _ in range(20))
    attrs = Captioner(concepts, CaptionMix(name=0, name_attr=0, attr=1, fact=0))
    captions = [attrs.caption(4, "dark", rng) for _ in range(30)]
    assert not any(concepts[4].name in c for c in captions)
    assert any(concepts[4].shape in c or "object" in c for c in captions)
    with pytest.raises(ValueError, match="caption probabilities"):
        CaptionMix(name=-1).probabilities()
