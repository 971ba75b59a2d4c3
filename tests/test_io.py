"""Save / load: safetensors + JSON round trips, base -> novel reload, and the authors' checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from anchoropt import (
    AnchorLearner,
    AnchorOPTPromptLearner,
    load_anchors,
    load_prompt_learner,
    save_anchors,
    save_prompt_learner,
)
from anchoropt._files import MANIFEST_NAME
from anchoropt.io import CONFIG_NAME, WEIGHTS_NAME, IncompleteSaveError
from anchoropt.testing import tiny_open_clip

BASE = ["cat", "dog", "golden retriever"]
NOVEL = ["tree frog", "fire truck", "sailboat", "sea turtle", "red fox"]


@pytest.fixture(scope="module")
def model():
    return tiny_open_clip()


@pytest.fixture()
def trained(model):
    torch.manual_seed(0)
    learner = AnchorOPTPromptLearner(model, BASE, torch.randn(1, 64) * 0.02, n_soft=4, tau=0.5)
    with torch.no_grad():
        learner.soft.add_(torch.randn_like(learner.soft))
        learner.position.logits.add_(torch.randn_like(learner.position.logits))
    return learner.eval()


def test_round_trip_gives_identical_features(model, trained, tmp_path):
    trained.save_pretrained(tmp_path)
    loaded = AnchorOPTPromptLearner.from_pretrained(tmp_path, model, BASE).eval()
    torch.testing.assert_close(loaded.normal_features(), trained.normal_features(), rtol=0, atol=0)
    torch.testing.assert_close(loaded.anchor_features(), trained.anchor_features(), rtol=0, atol=0)
    assert loaded.position.tau == 0.5
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["trained_classnames"] == BASE and config["width"] == 64 and config["n_soft"] == 4


def test_only_learned_class_independent_tensors_are_saved(trained, tmp_path):
    save_prompt_learner(trained, tmp_path)
    assert set(load_file(str(tmp_path / WEIGHTS_NAME))) == {"soft", "anchors", "position.logits"}


def test_reload_for_novel_classes(model, trained, tmp_path):
    save_prompt_learner(trained, tmp_path)
    novel = load_prompt_learner(tmp_path, model, NOVEL).eval()
    assert novel.classnames == NOVEL
    assert novel.predict(torch.randn(2, 32), "novel").shape == (2, len(NOVEL))
    torch.testing.assert_close(novel.slot_tokens(), trained.slot_tokens())


def test_fixed_arrangement_survives_reload(model, tmp_path):
    learner = AnchorOPTPromptLearner(model, BASE, torch.randn(1, 64), n_soft=4, arrangement="anchor_middle")
    learner.save_pretrained(tmp_path)
    loaded = AnchorOPTPromptLearner.from_pretrained(tmp_path, model, BASE)
    assert loaded.position.arrangement == "anchor_middle"
    assert loaded.position.assignment().tolist() == [0, 1, 4, 2, 3]
    assert not loaded.position.logits.requires_grad


def test_load_refuses_another_width(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    wide = tiny_open_clip(width=128)
    with pytest.raises(ValueError, match="width 64, but this tower has width 128"):
        load_prompt_learner(tmp_path, wide, BASE)


def test_load_reports_missing_or_tampered_files(model, trained, tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_prompt_learner(tmp_path, model, BASE)
    trained.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    tensors["soft"] = tensors["soft"][:2]
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="'soft' has shape \\(2, 64\\), but the config says \\(4, 64\\)"):
        load_prompt_learner(tmp_path, model, BASE)  # the specific problem first, not only "differs from manifest"
    tensors["soft"] = torch.zeros(4, 64)
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(IncompleteSaveError, match="does not match .*anchoropt_manifest.json"):
        load_prompt_learner(tmp_path, model, BASE)
    tensors["soft"] = tensors["soft"][:2]
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    (tmp_path / MANIFEST_NAME).unlink()  # a directory saved before manifests: the shapes are still checked
    with pytest.warns(UserWarning, match="no anchoropt_manifest.json"), \
            pytest.raises(ValueError, match="'soft' has shape \\(2, 64\\), but the config says \\(4, 64\\)"):
        load_prompt_learner(tmp_path, model, BASE)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"not safetensors")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="not a readable safetensors file"):
        load_prompt_learner(tmp_path, model, BASE)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format": "anchoropt", "kind": "anchors"}))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="not an anchoropt prompt_learner config"):
        load_prompt_learner(tmp_path, model, BASE)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format": "anchoropt", "kind": "prompt_learner", "format_version": 99}))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="newer anchoropt"):
        load_prompt_learner(tmp_path, model, BASE)


def test_anchor_file_round_trip_and_width_check(model, tmp_path):
    learner = AnchorLearner(model, BASE, n_anchor=2)
    path = save_anchors(learner, tmp_path / "anchors.safetensors")
    anchors = load_anchors(path, expected_width=64)
    torch.testing.assert_close(anchors, learner.anchors.detach())
    with pytest.raises(ValueError, match="width 64, but this tower has width 512"):
        load_anchors(path, expected_width=512)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_anchors(tmp_path / "nothing.safetensors")
    save_file({"other": torch.zeros(1, 64)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no 'anchors' tensor"):
        load_anchors(tmp_path / "other.safetensors")


def test_official_checkpoint_through_load_anchors(shared_data):
    path = shared_data / "official_anchors" / "EuroSAT_anchor.pth.tar"
    anchors = load_anchors(path, expected_width=512)
    assert anchors.shape == (1, 512) and anchors.dtype == torch.float32
    with pytest.raises(ValueError, match="512"):
        load_anchors(path, expected_width=64)


def test_official_anchor_plugs_into_a_512_wide_tower(shared_data):
    model = tiny_open_clip(width=512, layers=1, heads=8)
    anchors = load_anchors(shared_data / "official_anchors" / "Caltech101_anchor.pth.tar", expected_width=512)
    learner = AnchorOPTPromptLearner(model, BASE, anchors)
    assert learner.anchor_features().shape == (len(BASE), 32)


def test_saved_files_get_the_usual_file_mode(trained, tmp_path):
    """safetensors writes 0600; our files follow the umask like every other file of a run (0644 with 022)."""
    import os

    old = os.umask(0o022)
    try:
        save_anchors(trained.anchors, tmp_path / "anchors.safetensors")
        save_prompt_learner(trained, tmp_path / "learner")
    finally:
        os.umask(old)
    for path in (tmp_path / "anchors.safetensors", tmp_path / "learner" / WEIGHTS_NAME,
                 tmp_path / "learner" / CONFIG_NAME):
        assert path.stat().st_mode & 0o777 == 0o644, path
