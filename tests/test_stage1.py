"""Stage I: AnchorLearner against real description files and tiny towers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from anchoropt import AnchorLearner, DescriptionsError
from anchoropt.anchors import DescriptionTargets, description_mse
from anchoropt.testing import tiny_open_clip, tiny_openai_clip

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def model():
    return tiny_open_clip()


def test_real_descriptions_loss_goes_down_and_anchor_changes(model, shared_data):
    path = shared_data / "descriptions" / "cifar10.json"
    torch.manual_seed(0)
    learner = AnchorLearner(model, CIFAR10[:5])
    before = learner.anchors.detach().clone()
    history = learner.fit(path, steps=30, lr=0.05, progress=False)
    assert len(history) == 30
    assert history[-1] < history[0] * 0.9
    assert not torch.allclose(learner.anchors.detach(), before)
    assert learner.anchors.dtype == torch.float32


def test_description_features_are_normalised_per_sentence_and_computed_once(model, shared_data, monkeypatch):
    learner = AnchorLearner(model, CIFAR10[:3])
    targets = learner.targets(shared_data / "descriptions" / "cifar10.json", max_per_class=4)
    assert targets.features.shape == (12, model.text_projection.shape[1])
    torch.testing.assert_close(targets.features.norm(dim=-1), torch.ones(12))
    assert targets.class_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    calls = []
    original = learner.tower.encode_text
    monkeypatch.setattr(learner.tower, "encode_text", lambda ids: calls.append(1) or original(ids))
    learner.fit(targets, steps=3, progress=False)
    assert calls == []  # the frozen description features are not recomputed by fit


def test_description_mse_matches_hand_computation():
    anchor = torch.randn(2, 8)
    targets = DescriptionTargets(F.normalize(torch.randn(5, 8), dim=-1), torch.tensor([0, 0, 1, 1, 1]))
    a = F.normalize(anchor, dim=-1)
    expected = sum(((a[c] - targets.features[i]) ** 2).sum() for i, c in enumerate([0, 0, 1, 1, 1])) / (5 * 8)
    torch.testing.assert_close(description_mse(anchor, targets), expected)


def test_anchor_features_shape_and_gradient(model):
    learner = AnchorLearner(model, ["cat", "golden retriever"], n_anchor=2)
    features = learner.anchor_features()
    assert features.shape == (2, model.text_projection.shape[1])
    features.sum().backward()
    assert learner.anchors.grad is not None and learner.anchors.grad.abs().sum() > 0


def test_fp16_openai_tower_keeps_fp32_anchors():
    model = tiny_openai_clip(fp16=True)
    learner = AnchorLearner(model, ["cat", "dog"])
    history = learner.fit({"cat": ["A cat has fur."], "dog": ["A dog barks."]}, steps=2, progress=False)
    assert learner.anchors.dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(history)))


def test_progress_callback_reports_every_step(model):
    seen = []
    learner = AnchorLearner(model, ["cat"])
    learner.fit({"cat": ["A cat."]}, steps=4, progress=False, callback=lambda step, loss: seen.append(step))
    assert seen == [0, 1, 2, 3]


def test_tqdm_progress_bar_runs(model, capsys):
    AnchorLearner(model, ["cat"]).fit({"cat": ["A cat."]}, steps=2, progress=True)
    assert "Stage I" in capsys.readouterr().err


@pytest.mark.parametrize(
    "descriptions, message",
    [
        ({"cat": ["A cat."]}, "no descriptions for 1 class"),
        ({"cat": ["A cat."], "dog": []}, "'dog' has an empty list"),
        ({"cat": ["A cat."], "dog": ["ok", 3]}, "description #1 of class 'dog' is a int"),
        ({"cat": ["A cat."], "dog": [".", "  "]}, "'dog' has no usable description"),
    ],
)
def test_bad_descriptions_are_named(model, descriptions, message):
    learner = AnchorLearner(model, ["cat", "dog"])
    with pytest.raises(DescriptionsError, match=message):
        learner.fit(descriptions, steps=1, progress=False)


def test_bad_description_file(model, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(["cat"]))
    with pytest.raises(DescriptionsError, match="must be a JSON object"):
        AnchorLearner(model, ["cat"]).fit(bad, steps=1, progress=False)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        AnchorLearner(model, ["cat"]).fit(tmp_path / "missing.json", steps=1, progress=False)


def test_bad_steps_and_diverging_loss(model):
    learner = AnchorLearner(model, ["cat"])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        learner.fit({"cat": ["A cat."]}, steps=0, progress=False)
    with pytest.raises(ValueError, match="mse_weight must be > 0"):
        learner.fit({"cat": ["A cat."]}, steps=5, mse_weight=float("inf"), progress=False)
    with pytest.raises(FloatingPointError, match="Stage I loss is"):
        learner.fit({"cat": ["A cat."]}, steps=5, mse_weight=1e38, lr=1e38, momentum=0.0, progress=False)
