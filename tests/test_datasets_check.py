"""``anchoropt datasets check`` and the runner (``train``: base-to-novel, cross-dataset, domain generalisation,
``--shots-from dassl``) over tiny copies of CoOp's DATASETS.md layouts (``tests/coop_layouts.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anchoropt.datasets import layouts
from anchoropt.runner import cli
from coop_layouts import DATASETS, data, make_layout, write_dassl_fewshot  # noqa: F401 (data: a fixture)

FAST = ["--model", "tiny-test", "--pretrained", "none", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8",
        "--no-progress", "--no-plots", "--method", "coop", "--seed", "1"]


def _descriptions(folder: Path, name: str, classnames) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({c: [f"a photo of a {c}, a kind of thing."] for c in classnames}))
    return path


# ---------------------------------------------------------------------- datasets check
def test_check_reports_every_layout_and_passes(data, tmp_path, capsys):
    descriptions = tmp_path / "cupl"
    _descriptions(descriptions, "oxford_pets", ["abyssinian", "american bulldog", "beagle"])
    folders = [str(data / folder) for folder in DATASETS.values()]
    assert cli.main(["datasets", "check", *folders, "--descriptions", str(descriptions)]) == 0
    out = capsys.readouterr().out
    for layout in ("split_json (Dassl OxfordPets)", "imagenet (Dassl ImageNet)", "fgvc_aircraft (Dassl FGVCAircraft)",
                   "imagenetv2 (Dassl ImageNetV2)", "imagenet_a (Dassl ImageNetA)", "imagenet_r (Dassl ImageNetR)",
                   "imagenet_sketch (Dassl ImageNetSketch)", "split_json (Dassl EuroSAT)"):
        assert f"layout: {layout}" in out
    assert "classes: 3 (707-320, A300B4, F-16A/B)" in out and "images: 24 train / 0 val / 18 test" in out
    assert "preset: fgvc_aircraft" in out and "preset: dtd" in out and out.count("preset: imagenet\n") == 5
    assert f"descriptions: {descriptions / 'oxford_pets.json'} (covers all 3 classes)" in out
    assert "none for this dataset" in out and "no errors" in out


def test_check_fails_on_what_the_runner_refuses(data, tmp_path, capsys):
    D = __import__("anchoropt.datasets.folders", fromlist=["x"])
    one = D.make_synthetic_image_folder(tmp_path / "one", ["cat"], per_class=3, size=8)
    bad_descriptions = _descriptions(tmp_path / "cupl", "dtd", ["banded"])  # two classes missing
    code = cli.main(["datasets", "check", str(data / "imagenet" / "images"), str(one), str(tmp_path / "absent"),
                     str(data / "dtd"), "--descriptions", str(tmp_path / "cupl")])
    out = capsys.readouterr().out
    assert code == 1
    assert "split folders, not classes" in out and "needs at least two classes" in out
    assert "not a directory" in out and f"descriptions {bad_descriptions}" in out and "4 error(s)" in out


def test_check_reads_the_requested_dassl_fewshot_files(data, tmp_path, capsys):
    root = make_layout(tmp_path, "fgvc_aircraft")
    ds = layouts.open_dataset(root)
    write_dassl_fewshot(root, ds.train[::4], ds.val[::2], shots=1, seed=1)
    assert cli.main(["datasets", "check", str(root), "--shots", "1", "--seeds", "1", "2"]) == 1
    out = capsys.readouterr().out
    assert "Dassl few-shot files: 1 shots, seeds 1" in out
    assert "--shots 1 --seed 1: readable, matches the dataset" in out and "shot_1-seed_2.pkl is absent" in out


# ---------------------------------------------------------------------- the runner over the layouts
def test_train_base_to_novel_on_imagenet_and_fgvc_with_split_fewshot_present(data, tmp_path):
    for folder in ("imagenet", "fgvc_aircraft"):
        out = tmp_path / folder
        assert cli.main(["train", "--data", str(data / folder), "--shots", "2", "-o", str(out), *FAST]) == 0
        results = json.loads((out / "results.json").read_text())["results"]
        n = 6 if folder == "imagenet" else 3
        assert results["base"]["n_classes"] + results["novel"]["n_classes"] == n


def test_cross_dataset_and_domain_generalisation_over_imagenet_and_its_variants(data, tmp_path):
    xd = tmp_path / "xd"
    assert cli.main(["train", "--data", str(data / "imagenet"), "--shots", "2", "-o", str(xd), *FAST,
                     "--protocol", "cross-dataset", "--target", str(data / "fgvc_aircraft"),
                     "--target", str(data / "imagenetv2")]) == 0
    targets = json.loads((xd / "results.json").read_text())["results"]["targets"]
    assert {k: (v["n_classes"], v["n_images"]) for k, v in targets.items()} == {
        "fgvc_aircraft": (3, 9), "imagenetv2": (6, 12)}
    dg = tmp_path / "dg"
    variants = ["imagenetv2", "imagenet-sketch", "imagenet-adversarial", "imagenet-rendition"]
    assert cli.main(["train", "--data", str(data / "imagenet"), "--shots", "2", "-o", str(dg), *FAST,
                     "--protocol", "domain-generalization",
                     *[arg for v in variants for arg in ("--target", str(data / v))]]) == 0
    targets = json.loads((dg / "results.json").read_text())["results"]["targets"]
    assert {k: v["n_classes"] for k, v in targets.items()} == {
        "imagenetv2": 6, "imagenet-sketch": 6, "imagenet-adversarial": 3, "imagenet-rendition": 3}


def test_a_one_class_target_is_refused_before_training(data, tmp_path, capsys):
    D = __import__("anchoropt.datasets.folders", fromlist=["x"])
    one = D.make_synthetic_image_folder(tmp_path / "one", ["tench"], per_class=3, size=8)
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(data / "imagenet"), "--shots", "2", "-o", str(out), *FAST,
                     "--protocol", "cross-dataset", "--target", str(one)]) == 2
    assert "a target needs at least two classes" in capsys.readouterr().err
    assert not (out / "results.json").exists()


def test_train_with_dassl_shots(tmp_path):
    from anchoropt.runner import RunConfig
    from anchoropt.runner.protocols import _source_dataset, _training_view

    root = make_layout(tmp_path, "oxford_pets")
    ds = layouts.open_dataset(root)
    chosen = [r for r in ds.train if r.path.endswith("_0001.jpg")]  # one image per class, not the sampler's pick
    write_dassl_fewshot(root, chosen, ds.val[:3], shots=1, seed=7, moved_from="/elsewhere/oxford_pets")
    cfg = RunConfig(data=str(root), shots=1, seed=7, shots_from="dassl")
    few, novel = _training_view(_source_dataset(cfg), cfg)
    assert [r.path for r in few.train] + [r.path for r in novel.train] == [r.path for r in chosen]
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(root), "--shots", "1", "-o", str(out), *FAST[:-1], "7",
                     "--shots-from", "dassl"]) == 0
    assert json.loads((out / "run_config.json").read_text())["shots_from"] == "dassl"
    assert cli.main(["train", "--data", str(root), "--shots", "2", "-o", str(tmp_path / "r2"), *FAST,
                     "--shots-from", "dassl"]) == 2  # no shot_2-seed_1.pkl: refused before training


# ---------------------------------------------------------------------- the grid's per-dataset recipes
def test_each_dataset_gets_its_preset_and_descriptions_in_a_grid(tmp_path):
    from anchoropt.runner.grid import _run_config, plan_grid
    from anchoropt.runner import RunConfig

    data = tmp_path / "DATA"
    pets, dtd, imagenet = (make_layout(data, key) for key in ("oxford_pets", "dtd", "imagenet"))
    cupl = tmp_path / "cupl"
    _descriptions(cupl, "oxford_pets", ["abyssinian", "american bulldog", "beagle"])
    _descriptions(cupl, "dtd", ["banded", "blotchy", "braided"])
    base = RunConfig(descriptions=str(cupl))
    runs = plan_grid(["coop+anchoropt"], [str(pets), str(dtd)], [1], tmp_path / "grid")
    chosen = {Path(c.data).name: (c.preset, Path(c.descriptions).name) for c in (_run_config(base, r) for r in runs)}
    assert chosen == {"oxford_pets": ("oxford_pets", "oxford_pets.json"), "dtd": ("dtd", "dtd.json")}
    xd = plan_grid(["coop"], [str(imagenet)], [1], tmp_path / "xd")[0]
    assert _run_config(RunConfig(protocol="cross-dataset", targets=[str(dtd)]), xd).preset == "xd"
    with pytest.warns(UserWarning, match="--preset eurosat is another dataset's preset: .*holds oxford_pets"):
        assert _run_config(RunConfig(preset="eurosat"), runs[0]).preset == "eurosat"  # explicit: kept
    with pytest.raises(FileNotFoundError, match=r"no descriptions file for .*imagenet \(looked for imagenet.json"):
        _run_config(base, xd)


def test_a_grid_over_two_datasets_trains_each_with_its_recipe(tmp_path):
    data = tmp_path / "DATA"
    pets, dtd = make_layout(data, "oxford_pets"), make_layout(data, "dtd")
    cupl = tmp_path / "cupl"
    _descriptions(cupl, "oxford_pets", ["abyssinian", "american bulldog", "beagle"])
    _descriptions(cupl, "dtd", ["banded", "blotchy", "braided"])
    out = tmp_path / "grid"
    assert cli.main(["grid", "--methods", "coop", "--data", str(pets), str(dtd), "--seeds", "1", "-o", str(out),
                     "--descriptions", str(cupl), "--shots", "2", "--stage1-steps", "1",
                     *FAST[:-4]]) == 0
    configs = [json.loads(p.read_text()) for p in sorted(out.rglob("run_config.json"))]
    assert sorted((c["preset"], Path(c["descriptions"]).name) for c in configs) == [
        ("dtd", "dtd.json"), ("oxford_pets", "oxford_pets.json")]


# ---------------------------------------------------------------------- the documented commands, as written
def _documented_commands(page: Path, starts: tuple[str, ...]) -> list[list[str]]:
    import re
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith(starts):
                commands.append(shlex.split(line)[1:])
    return commands


def test_the_documented_cross_dataset_and_dg_commands_run_on_the_layouts(data, tmp_path, monkeypatch):
    docs = Path(__file__).resolve().parents[1] / "docs"
    starts = ("anchoropt train --protocol cross-dataset", "anchoropt eval")
    commands = _documented_commands(docs / "howto/get-the-data.md", starts)
    assert [c[0] for c in commands] == ["train", "eval"]
    assert _documented_commands(docs / "howto/reproduce.md", starts) == commands  # the same commands there
    monkeypatch.chdir(tmp_path)
    imagenet = layouts.open_dataset(data / "imagenet")
    _descriptions(tmp_path / "descriptions", "imagenet", imagenet.classnames)
    for args in commands:
        args = [a.replace("DATA/", f"{data}/", 1) if a.startswith("DATA/") else a for a in args]
        if args[0] == "train":  # the tiny model and a short schedule; everything else as written
            args += FAST[:-4] + ["--shots", "2", "--stage1-steps", "1"]
        assert cli.main(args) == 0, args
    xd = json.loads((tmp_path / "runs/xd/seed1/results.json").read_text())["results"]["targets"]
    assert len(xd) == 10 and all(t["n_classes"] == 3 for t in xd.values())
    dg = json.loads((tmp_path / "runs/xd/seed1/eval_results.json").read_text())["results"]["targets"]
    assert {k: v["n_classes"] for k, v in dg.items()} == {
        "imagenetv2": 6, "imagenet-sketch": 6, "imagenet-adversarial": 3, "imagenet-rendition": 3}


def test_a_grid_runs_domain_generalisation_over_imagenet_and_its_variants_in_one_call(data, tmp_path):
    out = tmp_path / "grid"
    variants = [str(data / v) for v in ("imagenetv2", "imagenet-sketch", "imagenet-adversarial", "imagenet-rendition")]
    assert cli.main(["grid", "--methods", "coop", "--data", str(data / "imagenet"), "--seeds", "1", "-o", str(out),
                     "--protocol", "domain-generalization", "--target", *variants, "--shots", "2",
                     *FAST[:-4]]) == 0
    (config,) = [json.loads(p.read_text()) for p in out.rglob("run_config.json")]
    assert config["preset"] == "xd"  # ImageNet as the source of the transfer protocols: the released xd settings
    (results,) = [json.loads(p.read_text())["results"] for p in out.rglob("runs/**/results.json")]
    assert {k: v["n_classes"] for k, v in results["targets"].items()} == {
        "imagenetv2": 6, "imagenet-sketch": 6, "imagenet-adversarial": 3, "imagenet-rendition": 3}
