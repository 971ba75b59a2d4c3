"""Reliability against bad input (issue 21, part B): method specs, images, tiny classes, zero features, the
feature cache and the errors that named nothing.  Each test failed before the fix."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anchoropt import AnchorOPTPromptLearner
from anchoropt.methods import registry
from anchoropt.runner import cli
from anchoropt.datasets import folders as D
from anchoropt.runner import RunConfig
from anchoropt.runner import run as run_module

FAST = ["--model", "tiny-test", "--pretrained", "none", "--shots", "2", "--epochs", "1", "--warmup-epochs", "0",
        "--batch-size", "8", "--stage1-steps", "2", "--no-progress", "--no-plots"]


def _no_model(monkeypatch):
    """Make building the model an error: the bad input must be found before."""
    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was built before the bad input was found")

    monkeypatch.setattr(run_module, "build_model", no_model)


def _train_refused(folder, descriptions, out, capsys, *extra) -> str:
    """``anchoropt train`` exits 2 with one clear line (no traceback, no run written); returns stderr."""
    args = ["train", "--data", str(folder), "--descriptions", str(descriptions), "-o", str(out), *FAST, *extra]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (Path(out) / "run_config.json").exists(), err
    return err


# ---------------------------------------------------------------------- 1. method specs
def test_a_method_option_given_twice_is_refused_naming_it():
    with pytest.raises(ValueError, match="n_soft is given twice"):
        registry.parse_method("coop:n_soft=4,n_soft=8")


@pytest.mark.parametrize("spec, message", [
    ("coop:n_soft=abc", "n_soft takes a whole number"),
    ("maple:deep_depth=-1", "deep_depth must be a whole number >= 0"),
    ("coop+anchoropt:tau=0", "tau must be a finite number > 0"),
    ("coop+anchoropt:kd_weight=nan", "kd_weight must be a finite number >= 0"),
    ("coop:n_soft=-2", "n_soft must be a whole number >= 0"),
    ("coop+anchoropt:pooling=middle", "pooling must be one of eot, released"),
    ("zeroshot:templates=a {} and a {}", "needs exactly one '{}'"),
    ("zeroshot:templates=a {} of {x}", "needs exactly one '{}'"),
])
def test_method_option_values_are_checked_when_the_spec_is_parsed(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        registry.parse_method(spec)


def test_an_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown --precision 'no-such-precision'; choose one of fp32"):
        RunConfig(data="d", precision="no-such-precision").resolve()


@pytest.mark.parametrize("extra, message", [
    (["--method", "maple:deep_depth=-1"], "deep_depth must be a whole number >= 0"),
    (["--method", "coop:csc=true"], "cannot score the novel classes of --protocol base2novel"),
    (["--method", "maple", "--pae", "--deep-depth", "2"], "--pae regularises the deep AnchorOPT"),
    (["--method", "coop+anchoropt:kd_weight=-1"], "kd_weight must be a finite number >= 0"),
    (["--precision", "no-such-precision"], "unknown --precision"),
    (["--method", "zeroshot", "--template", "{} {x}"], "--template '{} {x}' needs exactly one"),
])
def test_bad_method_settings_are_refused_before_the_model_is_built(folder, descriptions, tmp_path, monkeypatch,
                                                                   capsys, extra, message):
    _no_model(monkeypatch)
    assert message in _train_refused(folder, descriptions, tmp_path / "run", capsys, *extra)


def test_class_specific_context_refused_for_a_target_of_other_classes(folder, descriptions, tmp_path, monkeypatch,
                                                                      capsys):
    _no_model(monkeypatch)
    target = D.make_synthetic_image_folder(tmp_path / "target", ["zebra", "yak"], per_class=2, size=16)
    err = _train_refused(folder, descriptions, tmp_path / "run", capsys, "--method", "coop:csc=true",
                         "--protocol", "cross-dataset", "--target", str(target))
    assert "cannot score target 'target'" in err


# ---------------------------------------------------------------------- 2. images
def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` RGB pixels (and holds none)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_a_16_bit_greyscale_image_keeps_its_grey_levels(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    pixels = np.asarray(D.load_rgb(tmp_path / "g16.png"))
    assert pixels.shape == (64, 64, 3) and len(np.unique(pixels)) == 256
    assert np.abs(pixels[..., 0].astype(float) - ramp / 257).max() <= 0.5 + 1e-9  # scaled, not clipped at 255


def test_transparency_is_dropped_alike_in_every_mode(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "rgba.png")
    palette = rgba.convert("P")
    palette.save(tmp_path / "p.png", transparency=palette.getpixel((1, 1)))
    Image.new("LA", (4, 4), (100, 0)).save(tmp_path / "la.png")
    Image.new("RGBa", (4, 4), (40, 40, 40, 128)).convert("RGBA").save(tmp_path / "rgba_half.png")
    expected = [[0, 0, 255], [255, 0, 0]]  # the stored colours, as Dassl's convert("RGB") reads them
    assert np.asarray(D.load_rgb(tmp_path / "rgba.png"))[0, :2].tolist() == expected
    assert np.asarray(D.load_rgb(tmp_path / "p.png"))[0, :2].tolist() == expected
    assert np.asarray(D.load_rgb(tmp_path / "la.png"))[0, 0].tolist() == [100, 100, 100]
    assert np.asarray(D.load_rgb(tmp_path / "rgba_half.png"))[0, 0].tolist() == \
        np.asarray(Image.open(tmp_path / "rgba_half.png").convert("RGB"))[0, 0].tolist()


def test_lab_images_are_converted_to_srgb(tmp_path):
    Image.new("LAB", (4, 4), (255, 128, 128)).save(tmp_path / "white.tif")  # L* 100, a* b* 0: white
    assert all(v >= 250 for v in np.asarray(D.load_rgb(tmp_path / "white.tif"))[0, 0].tolist())


def test_cmyk_and_32_bit_images_are_converted(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert np.asarray(D.load_rgb(tmp_path / "c.jpg"))[0, 0].tolist() == [255, 0, 0]
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "f.tif")
    assert np.asarray(D.load_rgb(tmp_path / "f.tif"))[0, 0].tolist() == [128, 128, 128]


def test_a_decompression_bomb_is_a_one_line_refusal(tmp_path):
    bomb = _png_claiming(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(ValueError, match="bomb.png: refused as a possible decompression bomb") as err:
        D.load_rgb(bomb)
    assert "\n" not in str(err.value)


def test_a_decompression_bomb_in_the_data_is_refused_before_the_model(folder, descriptions, tmp_path, monkeypatch,
                                                                      capsys):
    _no_model(monkeypatch)
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    for image in sorted((data / sorted(os.listdir(data))[0]).glob("*.png")):
        _png_claiming(image, 20000, 20000)
    err = _train_refused(data, descriptions, tmp_path / "run", capsys)
    assert "decompression bomb" in err and ".png" in err


def test_a_truncated_test_image_is_found_before_training(folder, descriptions, tmp_path, monkeypatch, capsys):
    _no_model(monkeypatch)
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    dataset = D.open_dataset(data)
    victim = Path(dataset.test[-1].path)  # a test image of a novel class: read only after Stage II before
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    err = _train_refused(data, descriptions, tmp_path / "run", capsys)
    assert "test image(s) cannot be read" in err and victim.name in err


# ---------------------------------------------------------------------- 3. a class too small to train on
def test_a_class_with_one_image_is_refused_by_name(tmp_path):
    root = D.make_synthetic_image_folder(tmp_path / "d", ["cat", "dog", "owl"], per_class=4, size=8)
    for extra in sorted((root / "dog").glob("*.png"))[1:]:
        extra.unlink()
    with pytest.raises(ValueError, match=r"'dog' \(1\).*add images"):
        D.open_dataset(root)


def test_a_class_left_without_test_images_is_named_in_a_warning(tmp_path):
    root = D.make_synthetic_image_folder(tmp_path / "d", ["cat", "dog"], per_class=3, size=8)
    with pytest.warns(UserWarning, match="without test images.*'cat' \\(3\\)"):
        D.open_dataset(root)


# ---------------------------------------------------------------------- 4. zero features, predict
def _learner(open_clip_model, tokenizer) -> AnchorOPTPromptLearner:
    torch.manual_seed(0)
    learner = AnchorOPTPromptLearner(open_clip_model, ["cat", "dog", "owl"], torch.randn(1, 64) * 0.02, n_soft=4,
                                     tokenizer=tokenizer)
    with torch.no_grad():
        learner.position.logits.add_(torch.randn_like(learner.position.logits))
    return learner


def test_an_all_zero_feature_row_is_refused(open_clip_model, tokenizer):
    learner = _learner(open_clip_model, tokenizer).eval()
    features = torch.randn(3, 32)
    features[1] = 0
    with pytest.raises(ValueError, match=r"image_features has all-zero rows \[1\]"):
        learner.predict(features)
    coop = registry.parse_method("coop").method.build(open_clip_model, ["cat", "dog"],
                                                      registry.MethodSettings(tokenizer=tokenizer))
    with pytest.raises(ValueError, match="all-zero rows"):
        coop(features)


def test_predict_is_deterministic_in_train_mode(open_clip_model, tokenizer):
    learner = _learner(open_clip_model, tokenizer)
    features = torch.randn(4, 32)
    expected = learner.eval().predict(features, "both")
    learner.train()
    for _ in range(5):
        got = learner.predict(features, "both")
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_predict_of_a_method_learner_is_deterministic_in_train_mode(open_clip_model, tokenizer):
    torch.manual_seed(0)
    settings = registry.MethodSettings(anchors=torch.randn(1, 64) * 0.02, tokenizer=tokenizer)
    learner = registry.parse_method("cocoop+anchoropt").method.build(open_clip_model, ["cat", "dog", "owl"], settings)
    with torch.no_grad():
        learner.text.learner.position.logits.add_(torch.randn_like(learner.text.learner.position.logits))
    features = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    expected = learner.eval().predict(features, "novel")
    learner.train()
    assert all(torch.equal(learner.predict(features, "novel"), expected) for _ in range(5)) and learner.training


# ---------------------------------------------------------------------- 5. feature cache
def test_the_feature_cache_follows_content_when_mtime_is_restored(tmp_path):
    from anchoropt.runner import build_model
    from anchoropt.runner.features import FeatureStore

    folder = D.make_synthetic_image_folder(tmp_path / "imgs", ["a", "b"], per_class=2, size=32, seed=3)
    records = D.read_image_folder(folder)[0]
    store = FeatureStore(build_model("tiny-test"), tmp_path / "f.safetensors")
    first = store.table(records)
    store.save()
    victim = Path(records[0].path)
    stat = victim.stat()
    other = D.make_synthetic_image_folder(tmp_path / "other", ["a"], per_class=1, size=32, seed=9)
    replacement = D.read_image_folder(other)[0][0].path
    victim.write_bytes(Path(replacement).read_bytes())
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the mtime set back
    again = FeatureStore(store.bundle, tmp_path / "f.safetensors")
    refreshed = again.table(records)
    assert again.encoded == 1 and not torch.equal(refreshed[0], first[0]) and torch.equal(refreshed[1:], first[1:])
    os.utime(records[1].path)  # touched, same content: kept (the digest is compared)
    assert again.add(records) == 0


def test_a_same_size_replacement_with_mtime_restored_is_reencoded(tmp_path):
    from anchoropt.runner import build_model
    from anchoropt.runner.features import FeatureStore

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "imgs" / name / "0.bmp")
    records = D.read_image_folder(tmp_path / "imgs")[0]
    store = FeatureStore(build_model("tiny-test"), tmp_path / "f.safetensors")
    first = store.table(records)
    store.save()
    victim = Path(records[0].path)
    stat = victim.stat()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(victim)  # BMP: the same size
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert victim.stat().st_size == stat.st_size and victim.stat().st_mtime_ns == stat.st_mtime_ns
    again = FeatureStore(store.bundle, tmp_path / "f.safetensors")
    refreshed = again.table(records)
    assert again.encoded == 1 and not torch.equal(refreshed[0], first[0]) and torch.equal(refreshed[1], first[1])


# ---------------------------------------------------------------------- 6. errors that name the input
def test_a_truncated_feature_file_is_named(tmp_path):
    from anchoropt.runner import build_model
    from anchoropt.runner.features import FeatureStore

    folder = D.make_synthetic_image_folder(tmp_path / "imgs", ["a"], per_class=2, size=16)
    store = FeatureStore(build_model("tiny-test"), tmp_path / "f.safetensors")
    store.table(D.read_image_folder(folder)[0])
    path = store.save()
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="f.safetensors is not a readable image-feature cache.*delete it"):
        FeatureStore(store.bundle, path)


def test_a_truncated_anchors_file_is_named(tmp_path):
    from anchoropt.io import anchors_run_id, load_anchors, save_anchors

    path = save_anchors(torch.randn(1, 64), tmp_path / "anchors.safetensors") or tmp_path / "anchors.safetensors"
    Path(path).write_bytes(Path(path).read_bytes()[:30])
    with pytest.raises(ValueError, match="anchors.safetensors is not a readable safetensors file"):
        anchors_run_id(path)
    with pytest.raises(ValueError, match="anchors.safetensors is not a readable safetensors file"):
        load_anchors(path)


def test_toyworld_make_refuses_a_negative_seed(tmp_path, capsys):
    assert cli.main(["toyworld", "make", str(tmp_path / "w"), "--seed", "-1", "--classes", "2", "--per-class", "5"]) == 2
    err = capsys.readouterr().err
    assert "--seed" in err and "0.." in err and "Traceback" not in err
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())
    assert cli.main(["toyworld", "pretrain", "-o", str(tmp_path / "toy.safetensors"), "--seed", "-1"]) == 2
    assert "--seed" in capsys.readouterr().err and not (tmp_path / "toy.safetensors").exists()


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory) -> Path:
    from anchoropt.toyworld.make import make

    root = tmp_path_factory.mktemp("toy") / "world"
    make(root, classes=2, per_class=5)
    return root


@pytest.mark.parametrize("template", ["{} and {}", "{} {x}", "a {"])
def test_toyworld_zeroshot_refuses_a_bad_template(toy_world, capsys, template):
    assert cli.main(["toyworld", "zeroshot", str(toy_world), "--template", template]) == 2
    err = capsys.readouterr().err
    assert "--template" in err and "'{}'" in err and "Traceback" not in err


def test_toy_weights_that_are_not_safetensors_or_of_another_architecture(toy_world, tmp_path, capsys):
    from safetensors.torch import save_file

    from anchoropt.testing import tiny_open_clip

    pickle = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, pickle)
    assert cli.main(["toyworld", "zeroshot", str(toy_world), "--weights", str(pickle)]) == 2
    err = capsys.readouterr().err
    assert "model.pt is not a safetensors file" in err and "Traceback" not in err
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_open_clip().state_dict().items()}, str(other))
    assert cli.main(["toyworld", "zeroshot", str(toy_world), "--weights", str(other)]) == 2
    assert "other.safetensors is not a checkpoint of the toy CLIP" in capsys.readouterr().err


def test_train_refuses_toy_weights_of_another_architecture_before_the_model(folder, descriptions, tmp_path,
                                                                           monkeypatch, capsys):
    from safetensors.torch import save_file

    from anchoropt.testing import tiny_open_clip

    _no_model(monkeypatch)
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_open_clip().state_dict().items()}, str(other))
    args = [a for a in FAST]
    args[args.index("tiny-test")], args[args.index("none")] = "toy-clip", str(other)
    assert cli.main(["train", "--data", str(folder), "--descriptions", str(descriptions), "-o",
                     str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert "--pretrained" in err and "not a checkpoint of the toy CLIP" in err and "Traceback" not in err


def _grid_output(tmp_path: Path, results: dict) -> Path:
    run = tmp_path / "grid" / "runs" / "coop" / "shapes" / "seed1"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))
    return tmp_path / "grid"


@pytest.mark.parametrize("content, message", [
    (b'{"methods": ["coop"', "grid.json is not valid JSON"),
    (b'["coop", "shapes"]', "grid.json must be a JSON object"),
    (b'{"methods": "coop"}', "'methods' must be a list of names"),
])
def test_a_damaged_grid_json_is_named_in_the_report(tmp_path, capsys, content, message):
    out = _grid_output(tmp_path, {"protocol": "base2novel", "dataset": "shapes", "seed": 1, "method": "coop",
                                  "results": {"base": {"accuracy": 50.0}, "novel": {"accuracy": 40.0}, "hm": 44.4}})
    (out / "grid.json").write_bytes(content)
    assert cli.main(["grid", "--report", str(out), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_a_results_json_without_results_base_is_named_in_the_report(tmp_path, capsys):
    out = _grid_output(tmp_path, {"protocol": "base2novel", "dataset": "shapes", "seed": 1, "method": "coop",
                                  "results": {"novel": {"accuracy": 40.0}, "hm": 44.4}})
    assert cli.main(["grid", "--report", str(out), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "seed1/results.json has no entry 'base'" in err and "Traceback" not in err, err
