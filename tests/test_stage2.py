"""Stage II: the shallow prompt learner, its loss, inference switch and the one-stage variant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anchoropt import (
    AnchorLearner,
    AnchorOPTPromptLearner,
    OneStageTrainer,
    PositionMatrix,
    StageIILoss,
    TextTower,
)
from anchoropt.template import default_tokenizer
from anchoropt.testing import tiny_custom_text_clip, tiny_open_clip, tiny_openai_clip

CLASSES = ["cat", "dog", "golden retriever", "sea turtle"]
NOVEL = ["tree frog", "fire truck", "sailboat"]


@pytest.fixture(scope="module")
def model():
    return tiny_open_clip()


def _word_embeddings(tower: TextTower, words: str) -> torch.Tensor:
    ids = default_tokenizer()([words])
    return tower.embed(ids)[0, 1 : 1 + len(words.split())].float()


def _learner(model, classnames=CLASSES, **kwargs):
    torch.manual_seed(0)
    anchors = torch.randn(kwargs.pop("n_anchor", 1), TextTower(model).width) * 0.02
    return AnchorOPTPromptLearner(model, classnames, anchors, **kwargs)


@pytest.mark.parametrize("make", [tiny_open_clip, tiny_custom_text_clip, lambda: tiny_openai_clip(fp16=False)])
def test_normal_prompt_equals_real_sentence(make):
    """soft = 'a photo of', anchor = 'a', anchor after the soft tokens -> 'a photo of a {class}.'"""
    model = make()
    tower = TextTower(model)
    learner = AnchorOPTPromptLearner(model, CLASSES, _word_embeddings(tower, "a"), n_soft=3, arrangement="anchor_after")
    with torch.no_grad():
        learner.soft.copy_(_word_embeddings(tower, "a photo of"))
        expected = model.encode_text(default_tokenizer()([f"a photo of a {c}." for c in CLASSES]))
    torch.testing.assert_close(learner.normal_features(), F.normalize(expected.float(), dim=-1), atol=2e-5, rtol=1e-4)


def test_anchor_prompt_equals_real_sentence(model):
    tower = TextTower(model)
    learner = AnchorOPTPromptLearner(model, CLASSES, _word_embeddings(tower, "photo"))
    expected = model.encode_text(default_tokenizer()([f"photo of {c}." for c in CLASSES]))
    torch.testing.assert_close(learner.anchor_features(), F.normalize(expected, dim=-1), atol=2e-5, rtol=1e-4)


def test_anchor_sits_where_the_position_matrix_puts_it(model):
    learner = _learner(model, n_soft=4).eval()
    with torch.no_grad():
        learner.position.logits.zero_()
        learner.position.logits[torch.arange(5), torch.tensor([4, 0, 1, 4, 2])] = 5.0  # anchor at slots 0 and 3
    slots = learner.slot_tokens()
    torch.testing.assert_close(slots[0], learner.anchors[0])
    torch.testing.assert_close(slots[3], learner.anchors[0])
    torch.testing.assert_close(slots[1], learner.soft[0].detach())
    prompts = learner.template.normal_prompts(slots)
    torch.testing.assert_close(prompts[:, 1], learner.anchors[0].expand(len(CLASSES), -1))


def test_logits_shapes_and_gradients_reach_soft_and_position_only(model):
    learner = _learner(model).train()
    image = torch.randn(6, 32)
    normal, anchor = learner(image)
    assert normal.shape == anchor.shape == (6, len(CLASSES))
    assert normal.dtype == torch.float32
    StageIILoss()(normal, anchor, torch.tensor([0, 1, 2, 3, 0, 1])).backward()
    assert learner.soft.grad.abs().sum() > 0
    assert learner.position.logits.grad.abs().sum() > 0
    assert not learner.anchors.requires_grad
    assert {n for n, p in learner.named_parameters() if p.requires_grad} == {"soft", "position.logits"}


def test_anchor_features_computed_once_and_invalidated(model, monkeypatch):
    learner = _learner(model)
    encoded = []
    original = learner.template.encode_slots
    monkeypatch.setattr(
        learner.template, "encode_slots", lambda layout, slots: encoded.append(layout) or original(layout, slots)
    )
    image = torch.randn(2, 32)
    learner(image)
    learner(image)
    assert [layout is learner.template.anchor for layout in encoded].count(True) == 1
    assert [layout is learner.template.normal for layout in encoded].count(True) == 2
    before = learner.anchor_features().clone()
    learner.set_anchors(torch.randn(1, 64))
    assert not torch.allclose(learner.anchor_features(), before)
    learner.set_classnames(NOVEL)
    assert learner.anchor_features().shape[0] == len(NOVEL)


def test_eval_is_deterministic_and_train_samples(model):
    learner = _learner(model, n_soft=4).eval()
    torch.testing.assert_close(learner.normal_features(), learner.normal_features(), rtol=0, atol=0)
    learner.train()
    torch.manual_seed(1)
    samples = {tuple(learner.position.matrix().argmax(-1).tolist()) for _ in range(20)}
    assert len(samples) > 1


def test_predict_modes_and_class_switch(model):
    learner = _learner(model).eval()
    image = torch.randn(3, 32)
    normal, anchor = learner(image)
    torch.testing.assert_close(learner.predict(image, "base"), normal)
    torch.testing.assert_close(learner.predict(image, "novel"), (normal + anchor) / 2)
    base, novel = learner.predict(image, "both")
    torch.testing.assert_close(novel, (normal + anchor) / 2)
    learner.set_classnames(NOVEL)
    assert learner.predict(image, "novel").shape == (3, len(NOVEL))
    with pytest.raises(ValueError, match="unknown prediction mode 'new'"):
        learner.predict(image, "new")


def test_training_reduces_loss(model):
    """Soft tokens learn (fixed arrangement: Gumbel resampling would make a short toy run noisy)."""
    learner = _learner(model, arrangement="anchor_after").train()
    tower = learner.tower
    with torch.no_grad():
        centers = tower.encode_text(default_tokenizer()([f"a photo of a {c}." for c in CLASSES]))
    labels = torch.arange(len(CLASSES)).repeat(4)
    image = F.normalize(centers[labels] + 0.1 * torch.randn(len(labels), centers.shape[1]), dim=-1)
    optim = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    loss_fn = StageIILoss(kd_weight=1.0)
    losses = []
    for _ in range(30):
        loss = loss_fn(*learner(image, 20.0), labels)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_towers_keep_fp32_parameters(dtype):
    if dtype == torch.float16:
        model = tiny_openai_clip(fp16=True)
    else:
        model = tiny_open_clip().to(dtype)
    learner = _learner(model).train()
    normal, anchor = learner(torch.randn(2, 32))
    assert torch.isfinite(normal).all() and torch.isfinite(anchor).all()
    normal.sum().backward()
    assert learner.soft.dtype == learner.soft.grad.dtype == torch.float32
    assert learner.position.logits.grad is not None


def test_bad_inputs_are_named(model):
    with pytest.raises(ValueError, match="another width"):
        AnchorOPTPromptLearner(model, CLASSES, torch.randn(1, 512))
    with pytest.raises(TypeError, match="anchors must be a tensor"):
        AnchorOPTPromptLearner(model, CLASSES, [[0.0] * 64])
    with pytest.raises(ValueError, match="NaN or inf"):
        AnchorOPTPromptLearner(model, CLASSES, torch.full((1, 64), float("nan")))
    with pytest.raises(ValueError, match="arranges 3 soft"):
        AnchorOPTPromptLearner(model, CLASSES, torch.randn(1, 64), n_soft=4, position=PositionMatrix(3, 1))
    with pytest.raises(ValueError, match="gives 4 tokens but n_soft is 2"):
        AnchorOPTPromptLearner(model, CLASSES, torch.randn(1, 64), n_soft=2, soft_init="a photo of a")
    learner = _learner(model)
    with pytest.raises(ValueError, match="expected 1 anchor"):
        learner.set_anchors(torch.randn(2, 64))


def test_soft_init_from_words(model):
    tower = TextTower(model)
    learner = AnchorOPTPromptLearner(model, CLASSES, torch.randn(1, 64), n_soft=4, soft_init="a photo of a")
    torch.testing.assert_close(learner.soft.detach(), _word_embeddings(tower, "a photo of a"))


def test_stage2_loss_module_validates_config():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        StageIILoss(temperature=0)
    with pytest.raises(ValueError, match="unknown kd_normalization 'sum'"):
        StageIILoss(kd_normalization="sum")
    with pytest.raises(ValueError, match="loss weights must be >= 0"):
        StageIILoss(kd_weight=-1)


def test_one_stage_alternates_anchor_and_prompt_updates(model):
    anchor_learner = AnchorLearner(model, CLASSES)
    targets = anchor_learner.targets({c: [f"A {c} is an animal or a thing.", f"A photo of a {c}."] for c in CLASSES})
    prompt_learner = _learner(model).train()
    trainer = OneStageTrainer(anchor_learner, prompt_learner, targets, lr=0.05)
    anchors_before = anchor_learner.anchors.detach().clone()
    soft_before = prompt_learner.soft.detach().clone()
    labels = torch.tensor([0, 1, 2, 3])
    result = trainer.step(torch.randn(4, 32), labels)
    assert set(result) == {"anchor_loss", "prompt_loss"}
    assert not torch.allclose(anchor_learner.anchors.detach(), anchors_before)
    assert not torch.allclose(prompt_learner.soft.detach(), soft_before)
    torch.testing.assert_close(prompt_learner.anchors, anchor_learner.anchors.detach())


def test_eval_features_without_gradients_are_computed_once_per_state(model, monkeypatch):
    learner = _learner(model).eval()
    encoded = []
    original = learner.template.encode_slots
    monkeypatch.setattr(
        learner.template, "encode_slots", lambda layout, slots: encoded.append(layout) or original(layout, slots)
    )
    image = torch.randn(3, 32)
    first = learner.predict(image, "base")
    torch.testing.assert_close(learner.predict(image, "base"), first, rtol=0, atol=0)
    assert [layout is learner.template.normal for layout in encoded].count(True) == 1
    with torch.no_grad():
        learner.soft.add_(torch.randn_like(learner.soft))  # a changed parameter is seen
    assert not torch.allclose(learner.predict(image, "base"), first)
    assert [layout is learner.template.normal for layout in encoded].count(True) == 2
    learner.train()
    with torch.no_grad():
        learner.normal_features()
        learner.normal_features()
    assert [layout is learner.template.normal for layout in encoded].count(True) == 4  # training: never cached
