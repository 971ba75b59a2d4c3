"""The toy benchmark: its styles, captions, the suite's datasets, the world's property targets and the
baselines' calibration on a tiny suite."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from anchoropt.toyworld import concepts as C
from anchoropt.toyworld.captions import STYLE_PHRASES, CaptionMix, Captioner, name_keep_probability
from anchoropt.toyworld.pretrain import DEFAULT_STYLES, PretrainConfig
from anchoropt.toyworld.properties import TEMPLATES, dataset_properties, property_targets
from anchoropt.toyworld.render import DOMAINS, SEEN_DOMAINS, UNSEEN_DOMAINS, image_rng, render
from anchoropt.toyworld.suite import (DG_VARIANTS, MIN_TEST_IMAGES, SUITE, make_suite, read_suite, suite_concepts,
                                      suite_sizes)

TINY = lambda classes: {"train": 3, "val": 1, "test": 2}  # noqa: E731  (tiny image counts for tests)


# ---------------------------------------------------------------------- styles and captions
def test_styles_render_differently_and_unseen_ones_stay_out_of_pretraining():
    assert set(SEEN_DOMAINS) | set(UNSEEN_DOMAINS) == set(DOMAINS) and not set(SEEN_DOMAINS) & set(UNSEEN_DOMAINS)
    assert set(DEFAULT_STYLES) <= set(SEEN_DOMAINS) and set(STYLE_PHRASES) == set(SEEN_DOMAINS)
    concept = C.group(0)[3]
    photo = render(concept, image_rng(0, 0, concept, 0))
    for domain in DOMAINS[1:]:
        image = render(concept, image_rng(0, 0, concept, 0), domain=domain)
        assert image.shape == photo.shape and np.abs(image - photo).mean() > 0.01, domain
    dark = render(concept, image_rng(0, 0, concept, 0), domain="dark")
    assert dark.mean() < 0.5 * photo.mean() + 0.05
    with pytest.raises(ValueError, match="styles"):
        PretrainConfig(styles={"shifted": 1.0}).validate()  # an unseen style may not be pretrained on


def test_texture_close_ups_hide_the_outline():
    # two concepts that differ only in shape look alike as textures, unlike as photos
    by_look: dict = {}
    for c in C.world():
        by_look.setdefault((c.colour, c.pattern, c.habitat, c.size, c.count), []).append(c)
    a, b = next(v for v in by_look.values() if len(v) > 1 and v[0].pattern == "plain")[:2]
    assert a.shape != b.shape
    tex = [render(c, image_rng(0, 0, c, 0), domain="texture") for c in (a, b)]
    photo = [render(c, image_rng(0, 0, c, 0)) for c in (a, b)]
    assert np.abs(tex[0] - tex[1]).mean() < np.abs(photo[0] - photo[1]).mean()


def test_captions_name_the_style_and_rare_names_are_rarely_named():
    concepts = C.world()
    mix = CaptionMix(style_mention=1.0, name_zipf=1.0, fact=0.0)  # description-style facts name no style
    captioner = Captioner(concepts, mix)
    rng = np.random.default_rng(0)
    for style, phrases in STYLE_PHRASES.items():
        caption = captioner.caption(0, "dark", rng, style)
        assert caption.startswith(phrases), (style, caption)
    keep = name_keep_probability(concepts, mix)
    ranks = np.array([C.frequency_rank(c) for c in concepts])
    assert sorted(ranks) == list(range(len(concepts)))
    assert keep[ranks.argmin()] == 1.0 and keep.min() < 0.1 and np.all(np.diff(keep[np.argsort(ranks)]) < 0)
    common, rare = int(ranks.argmin()), int(ranks.argmax())
    named = {i: sum(bool(re.search(rf"\b{concepts[i].name}", captioner.caption(i, "dark", rng, "photo")))
                    for _ in range(300)) for i in (common, rare)}
    assert named[common] > 4 * named[rare]
    plain = Captioner(concepts[:10], CaptionMix())  # the defaults keep the old behaviour: no style, no Zipf
    assert (name_keep_probability(concepts[:10], CaptionMix()) == 1).all()
    assert not any(plain.caption(2, "dark", rng, "sketch").startswith(STYLE_PHRASES["sketch"]) for _ in range(30))
    with pytest.raises(ValueError, match="style_mention"):
        CaptionMix(style_mention=2).probabilities()


def test_specific_attribute_captions_keep_at_least_the_asked_axes():
    concepts = C.group(0)[:5]
    captioner = Captioner(concepts, CaptionMix(name=0, name_attr=0, attr=1, fact=0, attr_keep=0.0, attr_at_least=2))
    rng = np.random.default_rng(1)
    for _ in range(40):
        words = set(captioner.caption(1, "light", rng).replace(".", "").split())
        c = concepts[1]
        said = sum(v in words or v + "s" in words or v + "es" in words
                   for v in (c.size, c.colour, c.pattern, c.shape))
        assert said >= 2 - (c.pattern == "plain")  # "plain" is left unsaid


# ---------------------------------------------------------------------- the suite
def test_suite_mirrors_the_benchmark_in_kind_and_size():
    from anchoropt.runner.dataset_recipes import recognised_dataset

    assert all(recognised_dataset(f"x/{d.name}") is None for d in SUITE + DG_VARIANTS)  # no real preset applies
    assert len(SUITE) >= 8 and len({d.name for d in SUITE + DG_VARIANTS}) == len(SUITE + DG_VARIANTS)
    counts = [d.classes for d in SUITE]
    assert min(counts) <= 47 and max(counts) >= 120
    domains = {d.domain for d in SUITE}
    assert {"texture", "scene"} <= domains and domains & set(UNSEEN_DOMAINS)  # DTD-, SUN- and EuroSAT-like
    assert sum(d.domain != "photo" for d in SUITE) >= len(SUITE) // 2  # styles the hand prompt does not name
    for d in SUITE + DG_VARIANTS:
        concepts = suite_concepts(d)
        assert len(concepts) == d.classes and len({c.index for c in concepts}) == d.classes, d.name
        sizes = suite_sizes(d.classes)
        assert sizes["test"] * (d.classes // 2) >= MIN_TEST_IMAGES  # each half: binomial SE <= 1.5 points
        assert sizes["train"] >= 16
    assert (0.25 / MIN_TEST_IMAGES) ** 0.5 <= 0.015
    dtd = next(d for d in SUITE if d.mirrors == "DTD")
    looks = [(c.colour, c.pattern, c.habitat) for c in suite_concepts(dtd)]
    assert len(set(looks)) == len(looks)  # a close-up tells every texture class apart
    for d in SUITE:
        if d.selection.startswith("clusters"):
            concepts = suite_concepts(d)
            clusters = Counter(c.cluster for c in concepts)
            assert sum(clusters[c.cluster] > 1 for c in concepts) >= 0.8 * len(concepts), d.name
            half = len(concepts) - len(concepts) // 2
            base = {c.cluster for c in concepts[:half]}
            assert base & {c.cluster for c in concepts[half:]}  # neighbours on both sides of the cut
    source = suite_concepts(SUITE[0])
    for d in DG_VARIANTS:
        assert [c.name for c in suite_concepts(d)] == [c.name for c in source]


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite") / "s"
    chosen = [SUITE[0], next(d for d in SUITE if d.mirrors == "DTD"), DG_VARIANTS[0]]
    make_suite(root, seed=2, datasets=chosen, sizes=TINY, log=lambda line: None)
    return root


def test_make_suite_writes_datasets_the_runner_reads_and_suite_json(tiny_suite):
    from anchoropt.datasets.folders import open_dataset

    record = read_suite(tiny_suite)
    names = [e["name"] for e in record["datasets"]]
    assert names == ["toy_objects", "toy_dtd", "toy_objects_v2"]
    assert record["protocols"]["base2novel"] == ["toy_objects", "toy_dtd"]
    assert record["protocols"]["cross_dataset"] == {"source": "toy_objects", "targets": ["toy_dtd"]}
    assert record["protocols"]["domain_generalization"]["targets"] == ["toy_objects_v2"]
    for entry in record["datasets"]:
        root = tiny_suite / entry["name"]
        world = json.loads((root / "world.json").read_text())
        assert world["domain"] == entry["domain"] and world["suite"]["mirrors"] == entry["mirrors"]
        dataset = open_dataset(root)
        assert len(dataset.classnames) == entry["classes"]
        paths = {split: {r.path for r in dataset.split(split)} for split in ("train", "val", "test")}
        assert not (paths["train"] & paths["test"]) and not (paths["val"] & paths["test"])
        assert len(paths["test"]) == entry["classes"] * TINY(0)["test"]
        assert set(json.loads((root / "descriptions.json").read_text())) == set(dataset.classnames)
    # v2: the source's classes, other images
    a = sorted((tiny_suite / "toy_objects" / "test").rglob("*.png"))[0]
    b = tiny_suite / "toy_objects_v2" / a.relative_to(tiny_suite / "toy_objects")
    assert b.is_file() and a.read_bytes() != b.read_bytes()


def test_suite_refuses_occupied_folders_and_unknown_names(tiny_suite, tmp_path, capsys):
    from anchoropt.toyworld.cli import main

    with pytest.raises(FileExistsError, match="already holds a suite"):
        make_suite(tiny_suite, datasets=[SUITE[0]], sizes=TINY)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="holds no suite"):
        make_suite(tmp_path / "mine", datasets=[SUITE[0]], sizes=TINY)
    assert main(["suite", str(tmp_path / "new"), "--only", "imagenet"]) == 2
    assert "unknown suite datasets ['imagenet']" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="holds no suite.json"):
        read_suite(tmp_path / "mine")


# ---------------------------------------------------------------------- the world's targets
def test_dataset_properties_measure_templates_and_cupl(tiny_suite):
    from anchoropt.toyworld.model import load_model

    model, preprocess, tokenizer = load_model()
    figures = dataset_properties(tiny_suite / "toy_dtd", model, preprocess, tokenizer, templates=TEMPLATES[:3])
    values = list(figures["templates"].values())
    assert list(figures["templates"]) == list(TEMPLATES[:3]) and all(0 <= v <= 100 for v in values)
    assert figures["template_spread"] == pytest.approx(max(values) - min(values), abs=0.011)
    assert figures["cupl_gain"] == pytest.approx(figures["cupl"] - figures["hand_prompt"], abs=0.011)
    assert figures["style"] == "texture" and isinstance(figures["style_prompt_gain"], float)
    photo = dataset_properties(tiny_suite / "toy_objects", model, preprocess, tokenizer, templates=TEMPLATES[:2])
    assert "style_prompt_gain" not in photo  # the hand prompt already names the photo style


def test_the_suite_is_the_one_the_shipped_card_was_measured_on(tmp_path):
    """``toyworld suite`` draws the classes (and their base / novel cut) the shipped checkpoint was calibrated
    on: toy_dtd made again gives the card's zero-shot accuracy for every template and CuPL's, to the digit.
    (Keyed on the ``toy_``-prefixed names, the shuffle drew other classes: hand prompt 30.22 instead of 24.97.)"""
    from anchoropt.toyworld.model import load_model, model_card

    spec = {d.name: d for d in SUITE}["toy_dtd"]
    make_suite(tmp_path / "suite", datasets=[spec], log=lambda line: None)
    model, preprocess, tokenizer = load_model()
    figures = dataset_properties(tmp_path / "suite" / "toy_dtd", model, preprocess, tokenizer)
    card = model_card()["calibration"]["suite"]["properties"]["datasets"]["toy_dtd"]
    assert figures["test_images"] == card["test_images"]
    assert figures["templates"] == card["templates"] and figures["cupl"] == card["cupl"]


def test_a_suite_drawn_with_other_classes_is_refused_by_name(tmp_path):
    spec = {d.name: d for d in SUITE}["toy_dtd"]
    make_suite(tmp_path, datasets=[spec], sizes=TINY, log=lambda line: None)
    assert [e["name"] for e in read_suite(tmp_path)["datasets"]] == ["toy_dtd"]
    classes = tmp_path / "toy_dtd" / "classes.txt"
    names = classes.read_text().split()
    classes.write_text("\n".join([names[1], names[0], *names[2:]]) + "\n")  # another base / novel order
    with pytest.raises(ValueError, match=r"the classes of \['toy_dtd'\] are not the ones this version"):
        read_suite(tmp_path)


def test_property_targets_say_what_holds():
    def dataset(spread, gain):
        return {"template_spread": spread, "cupl_gain": gain}

    good = property_targets({"logit_scale": 60.0, "datasets": {"a": dataset(4, 3), "b": dataset(1, 2)}})
    assert all(t["holds"] for t in good.values())
    bad = property_targets({"logit_scale": 14.6, "datasets": {"a": dataset(2, 3), "b": dataset(1, -2)}})
    assert not any(t["holds"] for t in bad.values())


def test_calibration_targets_on_known_rows():
    from anchoropt.runner.toy_calibration import calibration_targets

    def row(base, novel, hm, std=0.5, **datasets):
        return {"mean": {"base": base, "novel": novel, "hm": hm}, "hm_std": std,
                "datasets": {k: {"base": v} for k, v in datasets.items()}}

    rows = {"zeroshot": row(60, 60, 60, a=60, b=60), "coop": row(70, 50, 58, a=71, b=69),
            "cocoop": row(68, 56, 61), "maple": row(72, 56, 63)}
    held = calibration_targets(rows)
    assert all(t["holds"] for t in held.values()), held
    rows["coop"] = row(64, 57, 60, std=1.4, a=66, b=59)
    missed = calibration_targets(rows)
    assert [t["holds"] for t in missed.values()] == [False, False, False, False, False, False]
    assert missed["CoOp base above zero-shot base on every dataset"]["value"] == ["b"]
    assert calibration_targets({"zeroshot": rows["zeroshot"]})["CoCoOp novel >= CoOp novel + 4"]["holds"] is None


def test_a_card_keeps_broader_suite_figures_than_a_narrower_run_brings(tmp_path):
    from anchoropt.toyworld.calibrate import model_card_for

    weights = tmp_path / "toy_clip.safetensors"
    weights.write_bytes(b"weights")
    weights.with_suffix(".json").write_text(json.dumps(
        {"config": {}, "wall_seconds": 1.0, "threads": 1, "torch": "x", "probe": []}))

    def suite(datasets, seeds, properties=None):
        figures = {"baselines": {"datasets": datasets, "seeds": seeds, "rows": {}}}
        if properties:
            figures["properties"] = {"datasets": {name: {} for name in properties}}
        return {"suite": figures}

    card = model_card_for(weights, suite(["a", "b", "c"], [1, 2, 3], properties=["a", "b", "c"]))
    with pytest.raises(ValueError, match=r"baselines cover datasets \['b', 'c'\]"):
        model_card_for(weights, suite(["a"], [1, 2, 3]), earlier=card)
    with pytest.raises(ValueError, match=r"baselines cover seeds \[2, 3\]"):
        model_card_for(weights, suite(["a", "b", "c"], [1]), earlier=card)
    properties_only = model_card_for(weights, {"suite": {"properties": {"datasets": {"a": {}, "b": {}, "c": {}}}}},
                                     earlier=card)
    assert properties_only["calibration"]["suite"]["baselines"]["seeds"] == [1, 2, 3]  # kept, not dropped
    broader = model_card_for(weights, suite(["a", "b", "c", "d"], [1, 2, 3, 4]), earlier=card)
    assert broader["calibration"]["suite"]["baselines"]["datasets"] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("options, with_weights, refusal", [
    (["--seeds", "1"], True, r"baselines cover seeds \[2\]"),
    (["--quick", "--datasets", "toy_objects", "toy_dtd"], True, r"baselines cover seeds \[2\]"),
    (["--datasets", "toy_dtd"], True, r"properties cover datasets \['toy_objects'\]"),
    ([], False, "--card needs --weights"),
])
def test_calibrate_card_refuses_before_any_run(tiny_suite, tmp_path, capsys, options, with_weights, refusal):
    """A card the run could not write is refused before the properties or the grid start, not after them."""
    from anchoropt.runner.cli import main
    from anchoropt.toyworld.model import sha256_file

    weights = tmp_path / "toy_clip.safetensors"
    weights.write_bytes(b"weights")
    names = read_suite(tiny_suite)["protocols"]["base2novel"]
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"sha256": sha256_file(weights), "calibration": {"suite": {
        "properties": {"datasets": {name: {} for name in names}},
        "baselines": {"datasets": names, "seeds": [1, 2], "rows": {}}}}}))
    output = tmp_path / "grid"
    weight_options = ["--weights", str(weights)] if with_weights else []
    code = main(["toyworld", "calibrate", "--suite", str(tiny_suite), "--card", str(card), "--output", str(output),
                 *weight_options, *options])
    assert code == 2 and re.search(refusal, capsys.readouterr().err)
    assert not output.exists()  # nothing ran
    assert json.loads(card.read_text())["calibration"]["suite"]["baselines"]["seeds"] == [1, 2]


def test_calibrate_suite_runs_the_baselines_and_writes_the_figures(tiny_suite, tmp_path):
    from anchoropt.runner.toy_calibration import calibrate_suite

    lines: list[str] = []
    figures = calibrate_suite(tiny_suite, tmp_path / "cal", seeds=[1, 2], rows=["zeroshot", "coop"],
                              log=lines.append, epochs=1, shots=2)
    assert set(figures["rows"]) == {"zeroshot", "coop"} and figures["datasets"] == ["toy_objects", "toy_dtd"]
    for row in figures["rows"].values():
        assert set(row["datasets"]) == {"toy_objects", "toy_dtd"} and len(row["seed_hm"]) == 2
    assert figures["rows"]["zeroshot"]["hm_std"] == 0.0  # nothing trained: every seed scores the same
    assert json.loads((tmp_path / "cal" / "calibration.json").read_text())["rows"] == figures["rows"]
    assert any(line.startswith("  [not run] CoCoOp") for line in lines)
    again = calibrate_suite(tiny_suite, tmp_path / "cal", seeds=[1, 2], rows=["zeroshot", "coop"],
                            log=lines.append, epochs=1, shots=2)
    assert again["ran"] == 0 and again["rows"] == figures["rows"]  # finished runs are reused
    one = calibrate_suite(tiny_suite, tmp_path / "cal", seeds=[1], datasets=["toy_dtd"], rows=["zeroshot", "coop"],
                          log=lines.append, epochs=1, shots=2)
    assert one["ran"] == 0  # a subset of the folder's finished runs, nothing new
    for row in one["rows"].values():  # only the datasets and seeds asked for, not every run in the folder
        assert set(row["datasets"]) == {"toy_dtd"} and len(row["seed_hm"]) == 1
    with pytest.raises(ValueError, match="not base-to-novel datasets"):
        calibrate_suite(tiny_suite, tmp_path / "x", datasets=["toy_objects_v2"])


def test_table1_runs_every_method_with_each_datasets_descriptions(tiny_suite, tmp_path):
    from anchoropt.runner.toy_table import QUICK_METHODS, TABLE1_METHODS, run_table1

    assert len(TABLE1_METHODS) == 13 and set(QUICK_METHODS) < set(TABLE1_METHODS)
    assert (tiny_suite / "descriptions" / "toy_dtd.json").read_bytes() == (tiny_suite / "toy_dtd" /
                                                                          "descriptions.json").read_bytes()
    out = run_table1(tiny_suite, tmp_path / "t1", quick=True, datasets=["toy_dtd"], log=lambda line: None,
                     methods=["zeroshot", "coop+atprompt", "coop+anchoropt", "cocoop+anchoropt"], epochs=1, shots=2,
                     stage1_steps=2)
    assert out["runs"] == 4
    table = (tmp_path / "t1" / "table.md").read_text()
    assert "coop+anchoropt" in table and "coop+atprompt" in table and "toy_dtd" in table
    runs = tmp_path / "t1" / "runs" / "toy_dtd"
    anchored = json.loads((runs / "coop+anchoropt" / "seed1" / "run_config.json").read_text())
    assert anchored["descriptions"].endswith("descriptions/toy_dtd.json")  # the dataset's own sentences
    atprompt = json.loads((runs / "coop+atprompt" / "seed1" / "run_config.json").read_text())
    assert atprompt["attributes"] == ["color", "shape"]
    study = _run_study(tmp_path / "t1")
    assert sorted(r["method"] for r in study["anchoropt_runs"]) == ["cocoop+anchoropt", "coop+anchoropt"]
    for run in study["anchoropt_runs"]:  # CoCoOp's position matrix is read inside its method module
        assert len(run["p_anchor"]) == 5 and all(0 <= p <= 1 for p in run["p_anchor"])  # M + N = 5 slots
        assert run["soft_norm"] > 0 and set(run["novel"]) == {"normal", "anchor", "ensemble"}
        assert 0 < run["p_sample_is_deterministic"] <= 1
    with pytest.raises(ValueError, match="not base-to-novel datasets"):
        run_table1(tiny_suite, tmp_path / "x", datasets=["toy_objects_v2"])


def test_pretraining_is_deterministic_and_learns_the_temperature_on_its_own_rate():
    import torch

    from anchoropt.toyworld.pretrain import _batch, pretrain

    cfg = PretrainConfig(steps=3, batch_size=16, pool_per_class=1, warmup_steps=1, probe_every=3, probe_classes=8,
                         probe_per_class=1, logit_scale_lr=0.5)
    rng = np.random.default_rng(0)
    assert len(set(_batch(rng, PretrainConfig(), len(C.world())) // PretrainConfig().pool_per_class)) == 256
    a, record = pretrain(cfg, log=lambda line: None)
    b, _ = pretrain(cfg, log=lambda line: None)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert record["probe"][-1]["logit_scale"] == pytest.approx(a.logit_scale.detach().exp().item(), abs=0.01)
    slow, _ = pretrain(PretrainConfig(**{**cfg.__dict__, "logit_scale_lr": 0.0}), log=lambda line: None)
    assert slow.logit_scale.item() == pytest.approx(np.log(1 / 0.07), abs=1e-5)  # its own rate: 0 keeps it
    assert abs(a.logit_scale.item() - slow.logit_scale.item()) > 0.1
    with pytest.raises(ValueError, match="distinct_classes"):
        PretrainConfig(batch_size=400).validate()


def _run_study(grid):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "study_toy_table1.py"
    done = subprocess.run([sys.executable, str(script), str(grid)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| toy_dtd | coop+anchoropt | 1 |" in done.stdout
    return json.loads((grid / "anchoropt_study.json").read_text())


def test_the_table1_command_passes_its_method_specs(monkeypatch, tmp_path):
    from anchoropt.runner import cli, toy_table

    seen = {}
    monkeypatch.setattr(toy_table, "run_table1", lambda suite, output, **kw: seen.update(kw, output=output) or {})
    specs = ["coop+anchoropt:kd_weight=0", "coop+anchoropt:pooling=released"]
    assert cli.main(["toyworld", "table1", "--suite", str(tmp_path), "--quick", "--methods", *specs]) == 0
    assert seen["methods"] == specs and seen["quick"] is True and seen["output"].endswith("table1-quick")
