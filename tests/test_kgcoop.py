"""KgCoOp (``kgcoop``): CoOp plus the distance of its class features to the hand prompt's, in the registry, the
recipes and the runner."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import anchoropt.methods  # noqa: F401  (registers every entry)
from anchoropt.datasets import folders as D
from anchoropt.methods.baselines import SoftPromptLearner, ZeroShotClassifier
from anchoropt.methods.kgcoop import KgCoOpLearner, kgcoop_loss
from anchoropt.methods.recipes import released_recipe
from anchoropt.methods.registry import MethodSettings, load_learner, parse_method, save_learner
from anchoropt.runner import RunConfig, cli, run_training
from anchoropt.testing import tiny_open_clip

NAMES = ["cat", "dog", "red fox", "sea turtle"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_open_clip().eval()


def test_initialised_from_the_hand_prompt_words_the_distance_is_zero(model) -> None:
    learner = KgCoOpLearner(model, NAMES, n_soft=4, soft_init="a photo of a", hand_templates="a photo of a {}.")
    out = learner(torch.randn(3, model.text_projection.shape[1]))
    assert out.logits.shape == (3, 4)
    assert abs(float(out.distance.detach())) < 1e-5  # "[SOS] a photo of a {name}. [EOT]" is the hand prompt itself
    other = KgCoOpLearner(model, NAMES, n_soft=4, soft_init="a photo of a", hand_templates="a sketch of the {}.")
    assert float(other(torch.randn(3, model.text_projection.shape[1])).distance.detach()) > 1e-3


def test_the_hand_features_are_zero_shot_clips_and_follow_the_classes(model) -> None:
    learner = KgCoOpLearner(model, NAMES, hand_templates=("a photo of a {}.", "art of the {}."))
    expected = ZeroShotClassifier(model, NAMES, ("a photo of a {}.", "art of the {}.")).text_features()
    torch.testing.assert_close(learner.hand_features(), expected)
    learner.set_classnames(["owl", "bee"])
    assert learner.hand_features().shape[0] == 2 and learner.classnames == ["owl", "bee"]
    assert "soft" in dict(learner.named_parameters()) and len(learner.state_dict()) == 1  # only the context


def test_it_scores_as_coop_and_its_loss_is_ce_plus_the_weighted_distance(model) -> None:
    torch.manual_seed(1)
    learner = KgCoOpLearner(model, NAMES, soft_init=None)
    coop = SoftPromptLearner(model, NAMES)
    coop.soft.data.copy_(learner.soft.data)
    images, labels = torch.randn(5, model.text_projection.shape[1]), torch.tensor([0, 1, 2, 3, 0])
    torch.testing.assert_close(learner.heads(images)["prompt"], coop.heads(images)["prompt"])
    out = learner(images)
    learned, hand = learner.text_features(), learner.hand_features()
    torch.testing.assert_close(out.distance, 1 - F.cosine_similarity(learned, hand).mean())
    loss = kgcoop_loss(8.0)(out, labels)
    torch.testing.assert_close(loss, F.cross_entropy(out.logits, labels) + 8.0 * out.distance)
    loss.backward()
    assert learner.soft.grad is not None and learner.soft.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="weight must be >= 0"):
        kgcoop_loss(-1.0)


def test_the_weight_keeps_the_learned_features_near_the_hand_prompt(model) -> None:
    """The same CE steps from the same start: with the knowledge term the class features drift less."""
    images, labels = torch.randn(16, model.text_projection.shape[1]), torch.arange(16) % 4
    distances = {}
    for weight in (0.0, 8.0):
        learner = KgCoOpLearner(model, NAMES, soft_init="a photo of a")
        optimizer = torch.optim.SGD(learner.parameters(), lr=0.5)
        loss_fn = kgcoop_loss(weight)
        for _ in range(30):
            optimizer.zero_grad()
            loss_fn(learner(images), labels).backward()
            optimizer.step()
        distances[weight] = float(learner(images).distance.detach())
    assert distances[0.0] > 1e-3 and distances[8.0] < distances[0.0] / 2, distances


def test_the_registry_entry_its_options_and_its_released_recipe(model, tmp_path) -> None:
    choice = parse_method("kgcoop:kg_weight=2")
    settings = choice.settings(MethodSettings(templates=("a photo of a {}.",), soft_init="a photo of a"))
    assert settings.kg_weight == 2.0 and choice.method.seen_head == choice.method.unseen_head == "prompt"
    with pytest.raises(ValueError, match="kg_weight must be a finite number >= 0"):
        parse_method("kgcoop:kg_weight=-1")
    with pytest.raises(ValueError, match="has no option 'pooling'"):
        parse_method("kgcoop:pooling=released")
    recipe = released_recipe("kgcoop")
    assert (recipe["n_soft"], recipe["epochs"], recipe["batch_size"], recipe["lr"], recipe["soft_init"],
            recipe["kg_weight"]) == (4, 100, 128, 0.002, "a photo of a", 8.0)
    learner = choice.method.build(model, NAMES, settings)
    learner.soft.data.add_(0.1)
    save_learner(learner, choice, settings, tmp_path / "learner")
    again, again_choice = load_learner(tmp_path / "learner", model, ["owl", "bee"])
    assert again_choice.label == "kgcoop:kg_weight=2" and isinstance(again, KgCoOpLearner)
    torch.testing.assert_close(again.soft, learner.soft)


def test_the_runner_trains_and_reloads_it(tmp_path) -> None:
    folder = D.make_synthetic_image_folder(tmp_path / "shapes", per_class=6, size=32, seed=1)
    cfg = RunConfig(method="kgcoop", data=str(folder), output=str(tmp_path / "run"), model="tiny-test",
                    pretrained=None, shots=2, epochs=2, warmup_epochs=0, batch_size=4, progress=False, plots=False,
                    augment="none", cache_image_features=True)
    results = run_training(cfg).results
    assert json.loads((tmp_path / "run" / "learner" / "learner.json").read_text())["settings"]["kg_weight"] == 8.0
    assert results["stage2"]["epoch_losses"] and results["results"]["novel"]["head"] == "prompt"
    assert cli.main(["eval", str(tmp_path / "run"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "run" / "eval_results.json").read_text())["results"]
    assert again["novel"]["accuracy"] == results["results"]["novel"]["accuracy"]
