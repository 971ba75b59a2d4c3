"""Switches that reproduce the released code: Stage I schedule and description selection."""

from __future__ import annotations

import math

import pytest
import torch

from anchoropt import AnchorLearner
from anchoropt.anchors import stage1_learning_rates
from anchoropt.descriptions import DescriptionsError, load_descriptions
from anchoropt.schedules import dassl_lr
from anchoropt.testing import tiny_open_clip

RAW = {"dog": [".", "A dog has fur.", "  ", "Dogs bark.", "A loyal pet."], "cat": ["A cat purrs.", "Cats nap."]}


def test_released_selection_takes_the_first_raw_entries():
    usable = load_descriptions(RAW, ["dog", "cat"], max_per_class=3)
    released = load_descriptions(RAW, ["dog", "cat"], max_per_class=3, selection="released")
    assert usable["dog"] == ["A dog has fur.", "Dogs bark.", "A loyal pet."]
    assert released["dog"] == [".", "A dog has fur.", ""]
    assert released["cat"] == usable["cat"] == ["A cat purrs.", "Cats nap."]
    with pytest.raises(DescriptionsError, match="unknown description selection 'first'"):
        load_descriptions(RAW, ["dog"], selection="first")
    with pytest.raises(DescriptionsError, match="not a string"):
        load_descriptions({"dog": [".", 3]}, ["dog"], selection="released")


def test_dassl_schedule_known_values():
    assert dassl_lr(0, 0.002, 3) == 1e-5
    assert dassl_lr(1, 0.002, 3) == pytest.approx(0.002)
    assert dassl_lr(2, 0.002, 3) == pytest.approx(0.5 * 0.002 * (1 + math.cos(math.pi / 3)))


def test_stage1_released_schedule_is_per_epoch_after_a_warmup_epoch():
    rates = stage1_learning_rates(6, 0.002, "released", steps_per_epoch=2)
    assert rates == pytest.approx([1e-5, 1e-5, 0.002, 0.002, 0.0015, 0.0015])
    cosine = stage1_learning_rates(4, 0.002)
    assert cosine == pytest.approx([0.002 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    with pytest.raises(ValueError, match="needs steps_per_epoch"):
        stage1_learning_rates(6, 0.002, "released")
    with pytest.raises(ValueError, match="unknown Stage I schedule"):
        stage1_learning_rates(6, 0.002, "step")


def test_stage1_fit_follows_the_released_schedule():
    model = tiny_open_clip().eval().requires_grad_(False)
    torch.manual_seed(0)
    learner = AnchorLearner(model, ["dog", "cat"])
    start = learner.anchors.detach().clone()
    learner.fit(RAW, steps=2, steps_per_epoch=2, schedule="released", progress=False, selection="released")
    warm = (learner.anchors.detach() - start).norm()
    torch.manual_seed(0)
    other = AnchorLearner(model, ["dog", "cat"])
    other.fit(RAW, steps=2, progress=False)
    assert warm < 0.05 * (other.anchors.detach() - start).norm()  # a warm-up epoch at 1e-5 barely moves
