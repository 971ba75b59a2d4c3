"""The experiment runner: presets, configuration, the ``anchoropt`` commands end to end on tiny random towers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anchoropt.runner import cli
from anchoropt import runner
from anchoropt.runner import cli as runner_cli
from anchoropt.runner import training
from anchoropt.datasets import folders as D
from anchoropt.methods.presets import available_presets, canonical_name, preset

FAST = ["--pretrained", "none", "--shots", "4", "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "8",
        "--stage1-steps", "3", "--no-progress", "--seed", "1"]


@pytest.fixture(scope="module")
def b2n_run(tmp_path_factory, folder, descriptions):
    """One base-to-novel run of the CLI (tiny open_clip CLIP), shared by several tests."""
    out = tmp_path_factory.mktemp("runs") / "b2n"
    code = cli.main(["train", "--data", str(folder), "--descriptions", str(descriptions), "--model", "tiny-test",
                     "-o", str(out), *FAST])
    assert code == 0
    return out


# ---------------------------------------------------------------------- presets and configuration
def test_presets_follow_the_released_tables():
    cal = preset("caltech101")
    assert (cal.n_soft, cal.epochs, cal.ce_weight, cal.kd_weight, cal.kd_temperature) == (4, 100, 100, 1000, 2.0)
    assert cal.kd_normalization == "released" and cal.shots == 16 and cal.lr == 0.002
    assert (preset("StanfordCars").n_soft, preset("stanford_cars").stage1_mse_weight) == (8, 100)
    assert (preset("EuroSAT").ce_weight, preset("eurosat").kd_weight) == (1, 0)
    assert preset("imagenet").max_descriptions == 5 and preset("ImageNet-Sketch").name == "imagenet"
    assert preset("oxford_flowers") == preset("Flowers102") == preset("OxfordFlowers")
    assert preset("dtd", "dept").extra == {"linear_probe_weight": 0.8}
    assert preset("caltech101", "cocoop").batch_size == 1
    assert preset("xd").epochs == 20 and preset("xd").ce_weight == 1
    # Stage I: epochs x floor(shots x classes / 32), the released schedule
    assert cal.stage1_steps(50) == 100 * 25
    with pytest.raises(KeyError, match="no preset"):
        canonical_name("mnist")
    assert "caltech101" in available_presets()


def test_config_resolution_explicit_beats_preset_beats_default():
    cfg = runner.RunConfig(data="x", preset="dtd", kd_weight=5.0).resolve()
    assert (cfg.kd_weight, cfg.ce_weight, cfg.kd_temperature, cfg.kd_normalization) == (5.0, 100, 4.0, "released")
    plain = runner.RunConfig(data="x").resolve()
    # no preset: CoOp+AnchorOPT's released recipe (scripts/coop/anchoropt_base2new_train.sh:13-17)
    assert (plain.ce_weight, plain.kd_weight, plain.kd_normalization, plain.epochs) == (100.0, 1000.0, "released", 100)
    assert plain.stage1_step_count(5) == 100 * 2  # 16 shots x 5 classes / 32
    with pytest.raises(ValueError, match="--augment none"):
        runner.RunConfig(cache_image_features=True).resolve()
    with pytest.raises(ValueError, match="target"):
        runner.RunConfig(protocol="cross-dataset").resolve()
    with pytest.raises(ValueError, match="cross-dataset or domain-generalization"):
        runner.RunConfig(targets=["elsewhere"]).resolve()
    assert runner.epoch_lr(0, plain) == 1e-5 and runner.epoch_lr(1, plain) == pytest.approx(0.002)


def test_parser_maps_flags_onto_the_config():
    args = cli.build_parser().parse_args(["train", "--data", "d", "--anchors", "a.safetensors", "--preset",
                                          "caltech101", "--kd-weight", "3", "--target", "t1", "--target", "t2"])
    cfg = runner_cli._config(args)
    assert cfg.kd_weight == 3 and cfg.ce_weight is None and cfg.targets == ["t1", "t2"] and cfg.preset == "caltech101"


# ---------------------------------------------------------------------- end to end
def test_base_to_novel_run_writes_everything(b2n_run, capsys):
    results = json.loads((b2n_run / "results.json").read_text())
    r = results["results"]
    assert results["trained_classes"] == ["circle", "cross"]  # first ceil(4 / 2) of the sorted classes
    assert r["base"]["n_classes"] == r["novel"]["n_classes"] == 2
    assert r["base"]["n_images"] == r["novel"]["n_images"] == 8  # 4 test images per class
    assert r["base"]["accuracy"] == r["base"]["accuracy_normal"]  # base classes: normal prompt
    assert r["novel"]["accuracy"] == r["novel"]["accuracy_ensemble"]  # novel classes: the ensemble
    assert r["hm"] == pytest.approx(runner.harmonic_mean(r["base"]["accuracy"], r["novel"]["accuracy"]), abs=1e-3)
    assert results["stage1"]["steps"] == 3 and len(results["stage2"]["epoch_losses"]) == 2
    assert results["summary"].startswith("base2novel shapes coop+anchoropt seed 1 | base ")
    for name in ("run_config.json", "anchors.safetensors", "prompt_learner/anchoropt.safetensors"):
        assert (b2n_run / name).is_file(), name
    pytest.importorskip("matplotlib")
    assert (b2n_run / "plots" / "position_matrix.png").stat().st_size > 5000


def test_eval_reloads_the_run_and_reproduces_it(b2n_run, capsys):
    assert cli.main(["eval", str(b2n_run), "--no-progress"]) == 0
    again = json.loads((b2n_run / "eval_results.json").read_text())["results"]
    first = json.loads((b2n_run / "results.json").read_text())["results"]
    for part in ("base", "novel"):
        for key in ("accuracy_normal", "accuracy_anchor", "accuracy_ensemble", "n_images"):
            assert again[part][key] == first[part][key], (part, key)
    assert capsys.readouterr().out.strip().startswith("base2novel shapes coop+anchoropt seed 1 | base")


def test_plot_command_redraws_a_run(b2n_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(["plot", str(b2n_run), "--k", "3", "-o", str(tmp_path / "p")]) == 0
    assert {p.name for p in (tmp_path / "p").iterdir()} == {"position_matrix.png", "anchor_tokens.png",
                                                           "anchor_tokens.json"}
    assert capsys.readouterr().out.startswith("anchor 1 (norm ")


def test_learn_anchors_then_train_from_them(tmp_path, folder, descriptions):
    assert cli.main(["learn-anchors", "--descriptions", str(descriptions), "--data", str(folder), "--model",
                     "tiny-test", "--pretrained", "none", "--stage1-steps", "2", "-o", str(tmp_path / "s1"),
                     "--no-progress"]) == 0
    info = json.loads((tmp_path / "s1" / "stage1.json").read_text())
    assert info["classnames"] == ["circle", "cross"] and info["steps"] == 2
    out = tmp_path / "s2"
    assert cli.main(["train", "--data", str(folder), "--anchors", str(tmp_path / "s1" / "anchors.safetensors"),
                     "--model", "tiny-test", "-o", str(out), "--no-plots", "--epochs", "1", *FAST[:2]]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["stage1"] == {"anchors_from": str((tmp_path / "s1" / "anchors.safetensors").resolve())}


def test_deep_variant_through_the_runner(tmp_path, folder, descriptions):
    out = tmp_path / "deep"
    assert cli.main(["train", "--data", str(folder), "--descriptions", str(descriptions), "--model", "tiny-test",
                     "--deep-depth", "1", "-o", str(out), "--no-plots", *FAST]) == 0
    saved = json.loads((out / "prompt_learner" / "anchoropt_config.json").read_text())
    assert saved["deep_depth"] == 1
    assert cli.main(["eval", str(out), "--no-progress"]) == 0  # reloads the deep learner
    first = json.loads((out / "results.json").read_text())["results"]
    again = json.loads((out / "eval_results.json").read_text())["results"]
    assert again["base"]["accuracy_normal"] == first["base"]["accuracy_normal"]


@pytest.mark.parametrize("model, protocol, causal, target_classes, mode", [
    # CustomTextCLIP with a causal tower pooled at EOT (EVA-CLIP-style); a target with an unseen class
    ("tiny-eva-test", "cross-dataset", True, ["square", "hexagon"], "novel"),
    # SigLIP-like: bidirectional tower pooled at the last position; a target with the source's classes
    ("tiny-siglip-test", "domain-generalization", False, ["square", "circle"], "base"),
])
def test_custom_text_families_through_the_runner(tmp_path, folder, descriptions, model, protocol, causal,
                                                 target_classes, mode):
    from anchoropt.towers import TextTower

    bundle = runner.build_model(model)
    tower = TextTower.from_model(bundle.model)
    assert (tower.layout, tower.causal) == ("open_clip_custom", causal)
    target = D.make_synthetic_image_folder(tmp_path / "target", target_classes, per_class=3, size=32, seed=5)
    cfg = runner.RunConfig(protocol=protocol, data=str(folder), targets=[str(target)], model=model,
                           pretrained=None, descriptions=str(descriptions), output=str(tmp_path / "run"),
                           shots=2, epochs=1, warmup_epochs=0, batch_size=8, stage1_steps=2, progress=False,
                           plots=False)
    result = runner.run_training(cfg, bundle=bundle)
    r = result.results["results"]
    assert r["source"]["n_classes"] == 4 and r["source"]["n_images"] == 16
    assert r["targets"]["target"]["n_images"] == 6 and r["targets"]["target"]["n_classes"] == 2
    # seen classes are scored with the normal prompt; a class set with unseen classes with the ensemble
    assert r["targets"]["target"]["mode"] == mode


def test_domain_generalization_refuses_unknown_classes_before_training(tmp_path, folder, descriptions, capsys):
    other = D.make_synthetic_image_folder(tmp_path / "other", ["zebra", "yak"], per_class=2, size=32)
    code = cli.main(["train", "--data", str(folder), "--descriptions", str(descriptions), "--model", "tiny-test",
                     "-o", str(tmp_path / "r"), "--protocol", "domain-generalization", "--target", str(other), *FAST])
    assert code == 2
    assert "unknown class" in capsys.readouterr().err
    assert not (tmp_path / "r" / "prompt_learner").exists()  # refused before any training


def test_image_feature_cache_gives_the_same_training(tmp_path, folder, descriptions):
    bundle = runner.build_model("tiny-test", augment="none")
    learned = []
    for cache in (False, True):
        cfg = runner.RunConfig(data=str(folder), model="tiny-test", pretrained=None, descriptions=str(descriptions),
                               output=str(tmp_path / f"c{cache}"), shots=4, epochs=2, warmup_epochs=0, batch_size=4,
                               stage1_steps=2, augment="none", cache_image_features=cache, progress=False,
                               plots=False)
        result = runner.run_training(cfg, bundle=bundle, evaluate_after=False)
        learned.append({k: v.clone() for k, v in result.learner.state_dict().items()})
        if cache:
            assert "cache_seconds" in result.results["stage2"]
    for key in learned[0]:
        torch.testing.assert_close(learned[0][key], learned[1][key], rtol=1e-4, atol=1e-5)


def test_cached_augmented_views(tmp_path, folder, descriptions):
    """K augmented views per image are encoded once; training then only looks them up."""
    bundle = runner.build_model("tiny-test")
    calls = []
    original = training.encode_images  # train_stage2 and its feature cache look it up there
    cfg = runner.RunConfig(data=str(folder), model="tiny-test", pretrained=None, descriptions=str(descriptions),
                           output=str(tmp_path / "views"), shots=4, epochs=3, warmup_epochs=0, batch_size=4,
                           stage1_steps=2, cache_image_features=True, cache_views=2, progress=False, plots=False)
    try:
        training.encode_images = lambda model, images: calls.append(len(images)) or original(model, images)
        result = runner.run_training(cfg, bundle=bundle, evaluate_after=False)
    finally:
        training.encode_images = original
    n_images = result.results["stage2"]["images"]
    assert sum(calls) == 2 * n_images  # two views per image, none encoded during the 3 epochs
    assert len(result.results["stage2"]["epoch_losses"]) == 3
    with pytest.raises(ValueError, match="--cache-views K goes with"):
        runner.RunConfig(cache_views=2).resolve()


def test_pretrained_weights_from_a_local_file(tmp_path):
    # a tiny model's weights
    donor = runner.TINY_MODELS["tiny-test"]()
    torch.nn.init.normal_(donor.token_embedding.weight, std=0.5)
    torch.save(donor.state_dict(), tmp_path / "tiny.pt")
    loaded = runner.build_model("tiny-test", str(tmp_path / "tiny.pt")).model
    torch.testing.assert_close(loaded.token_embedding.weight, donor.token_embedding.weight)
    with pytest.raises(ValueError, match="random-weight test model"):
        runner.build_model("tiny-test", "openai")
    # open_clip's own loader: a model config file + a local checkpoint, as for any open_clip model
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8,
                                              "head_width": 32},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    (tmp_path / "anchoropt-tiny-json.json").write_text(json.dumps(config))
    import open_clip

    open_clip.add_model_config(tmp_path / "anchoropt-tiny-json.json")
    reference = open_clip.create_model("anchoropt-tiny-json")
    torch.save(reference.state_dict(), tmp_path / "ckpt.pt")
    bundle = runner.build_model(str(tmp_path / "anchoropt-tiny-json.json"), str(tmp_path / "ckpt.pt"))
    torch.testing.assert_close(bundle.model.text_projection, reference.text_projection)
    assert bundle.test_transform(__import__("PIL.Image").Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_user_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path / "missing"), "--anchors", "a.safetensors", "--model",
                     "tiny-test", "--pretrained", "none", "-o", str(tmp_path / "o")]) == 2
    assert "dataset directory not found" in capsys.readouterr().err
    # AnchorOPT with neither --descriptions nor --anchors: refused before anything is read
    assert cli.main(["train", "--data", "x"]) == 2
    assert "coop+anchoropt needs anchors: pass --descriptions" in capsys.readouterr().err


def test_module_entry_point_runs():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "anchoropt", "presets", "caltech101"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "caltech101" in done.stdout and "1000" in done.stdout


@pytest.mark.shared_data
def test_cifar10_mini_end_to_end(shared_data, tmp_path):
    """Real JPEGs and real CuPL descriptions through decode / split / Stage I / Stage II / eval / report."""
    images, desc = shared_data / "cifar10_mini", shared_data / "descriptions" / "cifar10.json"
    if not images.is_dir() or not desc.is_file():
        pytest.skip(f"{images} or {desc} absent")
    out = tmp_path / "cifar"
    assert cli.main(["train", "--data", str(images), "--descriptions", str(desc), "--model", "tiny-test",
                     "-o", str(out), "--no-plots", *FAST]) == 0
    results = json.loads((out / "results.json").read_text())
    r = results["results"]
    assert results["trained_classes"] == ["airplane", "automobile", "bird", "cat", "deer"]
    # 20 images per class: 10 train / 4 val / 6 test; 5 base and 5 novel classes
    assert r["base"]["n_images"] == r["novel"]["n_images"] == 30
    assert 0 <= r["hm"] <= 100 and results["summary"].startswith("base2novel cifar10_mini coop+anchoropt seed 1")
