"""The shipped toy CLIP: its checkpoint, its loading, and that prompt learning means something with it.

Everything runs on cached image features of one toy-world dataset (100 classes, 36 images each), so the suite stays fast.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from anchoropt import AnchorLearner, AnchorOPTPromptLearner
from anchoropt.methods.baselines import SoftPromptLearner
from anchoropt.datasets.folders import ImageDataset, open_dataset, sample_few_shot, subsample_classes
from anchoropt.functional import anchoropt_loss
from anchoropt.toyworld import model as toy_model
from anchoropt.toyworld.make import make
from anchoropt.toyworld.zeroshot import class_text_features, image_features

N_CLASSES, SHOTS = 100, 16


@pytest.fixture(scope="module")
def toy():
    model, preprocess, tokenizer = toy_model.load_model()
    return model, preprocess, tokenizer


def _features(model, preprocess, records) -> tuple[torch.Tensor, torch.Tensor]:
    loader = torch.utils.data.DataLoader(ImageDataset(records, preprocess), batch_size=256)
    feats = torch.cat([image_features(model, images) for images, _, _ in loader])
    return feats, torch.tensor([r.label for r in records])


@pytest.fixture(scope="module")
def world(toy, tmp_path_factory):
    """A 100-class toy world: base / novel halves with cached features (train = 16 shots of the base classes)."""
    model, preprocess, _ = toy
    root = tmp_path_factory.mktemp("toyworld") / "w"
    make(root, seed=7, classes=N_CLASSES, per_class=36)  # 18 train / 7 val / 11 test per class
    dataset = open_dataset(root)
    base = subsample_classes(sample_few_shot(dataset, SHOTS, seed=1), "base")
    novel = subsample_classes(dataset, "new")
    return {
        "root": root, "base": base.classnames, "novel": novel.classnames,
        "train": _features(model, preprocess, base.train), "base_test": _features(model, preprocess, base.test),
        "novel_test": _features(model, preprocess, novel.test),
    }


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def _zero_shot(toy, classnames, feats) -> float:
    model, _, tokenizer = toy
    return _accuracy(feats[0] @ class_text_features(model, tokenizer, classnames).T, feats[1])


# ---------------------------------------------------------------------- the checkpoint
def test_shipped_checkpoint_hash_size_and_record():
    path = toy_model.shipped_weights()
    card = toy_model.model_card()
    assert toy_model.sha256_file(path) == card["sha256"]
    assert path.stat().st_size <= 25 * 2**20
    assert card["command"].startswith("anchoropt toyworld pretrain")
    assert 0.35 <= card["calibration"]["zero_shot"]["photo"] <= 0.80
    assert card["calibration"]["zero_shot"]["shifted"] < card["calibration"]["zero_shot"]["photo"]


def test_the_card_records_the_learned_temperature_and_the_suite_calibration(toy):
    card = toy_model.model_card()
    scale = toy[0].logit_scale.exp().item()
    assert scale >= 50  # learned, CLIP-like (the first checkpoint stayed at open_clip's 14.3 start: 14.6)
    suite = card["calibration"]["suite"]
    assert suite["properties"]["logit_scale"] == pytest.approx(scale, abs=0.01)
    assert card["probe"][-1]["logit_scale"] == pytest.approx(scale, abs=0.05)  # fp32 in training, fp16 stored
    world = suite["properties"]["targets"]
    assert all(t["holds"] for t in world.values()), world  # logit scale, template spread, CuPL gain
    gains = [d["cupl"] - d["hand_prompt"] for d in suite["properties"]["datasets"].values()]
    assert world["CuPL - hand prompt >= 2 pts (suite mean)"]["value"] == pytest.approx(sum(gains) / len(gains),
                                                                                       abs=0.011)
    targets = suite["baselines"]["targets"]
    assert set(targets) >= {"CoOp base >= zero-shot base + 6.5", "CoCoOp novel >= CoOp novel + 4",
                            "MaPLe HM >= CoOp HM + 3.5"}
    rows = suite["baselines"]["rows"]
    assert set(rows) >= {"zeroshot", "coop_m4", "coop", "cocoop", "maple", "dept"}
    delta = rows["coop"]["mean"]["base"] - rows["zeroshot"]["mean"]["base"]
    assert targets["CoOp base >= zero-shot base + 6.5"]["value"] == pytest.approx(delta, abs=0.011)


def test_a_changed_checkpoint_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "toy_clip.safetensors"
    shutil.copyfile(toy_model.shipped_weights(), bad)
    with open(bad, "r+b") as f:
        f.seek(-3, 2)
        byte = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(toy_model, "shipped_weights", lambda: bad)
    with pytest.raises(ValueError, match="sha256"):
        toy_model.load_model()


def test_load_model_is_open_clip_shaped(toy):
    import open_clip
    from PIL import Image

    model, preprocess, tokenizer = toy
    assert isinstance(model, open_clip.CLIP) and not model.training
    assert model.token_embedding.num_embeddings == 49408 and model.context_length == 77
    assert not any(p.requires_grad for p in model.parameters())
    ids = tokenizer(["a photo of a vina.", "two small red striped squares on a dark background."])
    assert ids.shape == (2, 77)
    torch.testing.assert_close(toy_model.encode_text(model, ids), model.encode_text(ids), atol=1e-5, rtol=1e-5)
    x = preprocess(Image.new("RGB", (32, 32), (200, 30, 30)))
    assert x.shape == (3, 32, 32)
    assert model.encode_image(x[None]).shape == (1, 128)


def test_runner_builds_toy_clip_offline_with_the_cli_default_tag():
    from anchoropt.runner.models import build_model

    bundle = build_model("toy-clip", "openai")
    assert bundle.name == "toy-clip" and bundle.tokenizer is not None
    shipped = toy_model.load_model()[0]
    torch.testing.assert_close(bundle.model.visual.conv1.weight, shipped.visual.conv1.weight)
    random = build_model("toy-clip", "none").model  # 'none' is random weights, as for every model
    assert not torch.equal(random.visual.conv1.weight, shipped.visual.conv1.weight)
    with pytest.raises(ValueError, match="fp32"):
        build_model("toy-clip", None, precision="fp16")


# ---------------------------------------------------------------------- it learns
def test_zero_shot_is_well_above_chance_but_not_solved(toy, world):
    acc = _zero_shot(toy, world["base"] + world["novel"], (
        torch.cat([world["base_test"][0], world["novel_test"][0]]),
        torch.cat([world["base_test"][1], world["novel_test"][1] + len(world["base"])]),
    ))
    assert 5 / N_CLASSES < acc < 0.98


def test_coop_on_16_shots_beats_zero_shot_on_base_classes(toy, world):
    model, _, tokenizer = toy
    zero_shot = _zero_shot(toy, world["base"], world["base_test"])
    torch.manual_seed(0)
    learner = SoftPromptLearner(model, world["base"], n_soft=4, soft_init="a photo of a", tokenizer=tokenizer)
    optimizer = torch.optim.SGD([learner.soft], lr=0.05, momentum=0.9)
    feats, labels = world["train"]
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch = torch.randint(0, len(labels), (32,), generator=g)
        loss = F.cross_entropy(learner(feats[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    learner.eval()
    with torch.no_grad():
        coop = _accuracy(learner(world["base_test"][0]), world["base_test"][1])
    assert coop > zero_shot + 0.02, (coop, zero_shot)


def test_stage1_lowers_description_mse_and_its_anchor_prompt_classifies(toy, world):
    model, _, tokenizer = toy
    torch.manual_seed(0)
    stage1 = AnchorLearner(model, world["base"], n_anchor=1, tokenizer=tokenizer)
    history = stage1.fit(world["root"] / "descriptions.json", steps=150, progress=False)  # the released lr 0.002
    assert history[-1] < 0.95 * history[0]
    with torch.no_grad():
        acc = _accuracy(world["base_test"][0] @ stage1.anchor_features().T, world["base_test"][1])
    assert acc > 3 / len(world["base"]), acc


def test_saved_on_base_reloaded_for_novel_gives_the_same_novel_accuracy(toy, world, tmp_path):
    model, _, tokenizer = toy
    torch.manual_seed(0)
    anchors = AnchorLearner(model, world["base"], tokenizer=tokenizer).frozen_anchors()
    learner = AnchorOPTPromptLearner(model, world["base"], anchors, n_soft=2, tokenizer=tokenizer)
    optimizer = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    feats, labels = world["train"]
    for _ in range(10):
        loss = anchoropt_loss(*learner(feats), labels, 1.0, 1.0, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    learner.eval()
    learner.set_classnames(world["novel"])
    with torch.no_grad():
        before = learner.predict(world["novel_test"][0], mode="novel")
    learner.set_classnames(world["base"])
    learner.save_pretrained(tmp_path / "learner")
    reloaded = AnchorOPTPromptLearner.from_pretrained(tmp_path / "learner", model, world["novel"], tokenizer=tokenizer)
    with torch.no_grad():
        after = reloaded.eval().predict(world["novel_test"][0], mode="novel")
    assert _accuracy(after, world["novel_test"][1]) == _accuracy(before, world["novel_test"][1])
    torch.testing.assert_close(after, before)
    assert _accuracy(after, world["novel_test"][1]) > 1 / len(world["novel"])


def test_the_runner_trains_on_a_toy_world_with_toy_clip(tmp_path):
    from anchoropt.runner.cli import main

    assert main(["toyworld", "make", str(tmp_path / "toy"), "--classes", "4", "--per-class", "20"]) == 0
    out = tmp_path / "run"
    status = main(["train", "--model", "toy-clip", "--data", str(tmp_path / "toy"),
                   "--descriptions", str(tmp_path / "toy" / "descriptions.json"), "--shots", "4", "--epochs", "1",
                   "--warmup-epochs", "0", "--batch-size", "8", "--stage1-steps", "5", "--output", str(out),
                   "--no-progress", "--device", "cpu"])
    assert status == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "toy-clip"
