"""Reliability of the core (issue 11): saves that are complete or absent, caches that cannot go stale, and bad
input refused with a message naming it.  One test per class of fault; each failed on the code before the fix."""

from __future__ import annotations

import errno
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from anchoropt import AnchorLearner, AnchorOPTPromptLearner, load_anchors, load_prompt_learner, save_anchors
from anchoropt import _files
from anchoropt.datasets import folders as D
from anchoropt.descriptions import DescriptionsError, load_descriptions
from anchoropt.functional import anchoropt_loss
from anchoropt.io import CONFIG_NAME, WEIGHTS_NAME, IncompleteSaveError, read_config, save_prompt_learner
from anchoropt.losses import StageIILossConfig
from anchoropt.position import PositionMatrix
from anchoropt.testing import tiny_open_clip, tiny_openai_clip

CLASSES = ["cat", "dog", "golden retriever"]
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def model():
    return tiny_open_clip().requires_grad_(False).eval()


def _learner(model, seed: int) -> AnchorOPTPromptLearner:
    torch.manual_seed(seed)
    learner = AnchorOPTPromptLearner(model, CLASSES, torch.randn(1, 64) * 0.02, n_soft=4)
    with torch.no_grad():
        learner.soft.add_(torch.randn_like(learner.soft))
        learner.position.logits.add_(torch.randn_like(learner.position.logits) * 3)
    return learner.eval()


def _state(learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- saves: complete or absent
class _Crash(BaseException):
    """Stands for a kill at one point of the save (a BaseException, as KeyboardInterrupt)."""


def _count_steps(monkeypatch, tmp_path, old, new) -> int:
    """How many file operations one re-save makes (writes + renames)."""
    calls = []
    real_replace = _files.os.replace
    monkeypatch.setattr(_files.os, "replace", lambda a, b: (calls.append(1), real_replace(a, b))[1])
    save_prompt_learner(old, tmp_path / "count")
    calls.clear()
    save_prompt_learner(new, tmp_path / "count")
    monkeypatch.undo()
    return len(calls)


def test_an_interrupted_resave_loads_as_the_old_or_the_new_save_never_a_mix(model, tmp_path, monkeypatch):
    old, new = _learner(model, 1), _learner(model, 2)
    old_state, new_state = _state(old), _state(new)
    steps = _count_steps(monkeypatch, tmp_path, old, new)
    assert steps >= 5  # 3 staged writes + moves: the loop below interrupts between every pair
    outcomes = set()
    for crash_at in range(steps + 1):
        target = tmp_path / f"run{crash_at}"
        save_prompt_learner(old, target)
        real_replace, count = _files.os.replace, [0]

        def replace(a, b, crash_at=crash_at):
            if count[0] == crash_at:
                raise _Crash()
            count[0] += 1
            return real_replace(a, b)

        monkeypatch.setattr(_files.os, "replace", replace)
        with pytest.raises(_Crash) if crash_at < steps else warnings.catch_warnings():
            save_prompt_learner(new, target)
        monkeypatch.undo()
        loaded = _state(load_prompt_learner(target, model, CLASSES))
        assert _same(loaded, old_state) or _same(loaded, new_state), f"mixed save after {crash_at} steps"
        outcomes.add("old" if _same(loaded, old_state) else "new")
        save_prompt_learner(new, target)  # the next save recovers from whatever was left
        assert _same(_state(load_prompt_learner(target, model, CLASSES)), new_state)
    assert outcomes == {"old", "new"}


def test_a_failing_write_full_disk_keeps_the_previous_save(model, tmp_path, monkeypatch):
    old, new = _learner(model, 1), _learner(model, 2)
    save_prompt_learner(old, tmp_path)

    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_files, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_prompt_learner(new, tmp_path)
    monkeypatch.undo()
    assert _same(_state(load_prompt_learner(tmp_path, model, CLASSES)), _state(old))


def test_a_single_file_write_is_atomic(tmp_path, monkeypatch):
    path = _files.write_text(tmp_path / "results.json", '{"a": 1}\n')
    monkeypatch.setattr(_files.os, "replace", lambda a, b: (_ for _ in ()).throw(_Crash()))
    with pytest.raises(_Crash):
        _files.write_text(path, '{"a": 2, "b": [')  # interrupted before the rename
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind


def test_edited_or_mixed_files_are_refused(model, tmp_path):
    learner = _learner(model, 1)
    learner.save_pretrained(tmp_path / "a")
    _learner(model, 2).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes((tmp_path / "b" / WEIGHTS_NAME).read_bytes())  # a mix
    with pytest.raises(IncompleteSaveError, match="does not match"):
        load_prompt_learner(tmp_path / "a", model, CLASSES)
    learner.save_pretrained(tmp_path / "c")
    tensors = load_file(str(tmp_path / "c" / WEIGHTS_NAME))
    tensors["soft"][0, 0] = NAN
    save_file(tensors, str(tmp_path / "c" / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="'soft' holds 1 NaN"):
        load_prompt_learner(tmp_path / "c", model, CLASSES)
    (tmp_path / "c" / _files.MANIFEST_NAME).unlink()  # even without a manifest, NaN never loads
    with pytest.warns(UserWarning, match="no anchoropt_manifest"), pytest.raises(ValueError, match="'soft' holds 1 NaN"):
        load_prompt_learner(tmp_path / "c", model, CLASSES)


def test_anchor_files_with_nan_or_edited_values_are_refused(tmp_path):
    save_file({"anchors": torch.tensor([[NAN] * 64])}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match="'anchors' holds 64 NaN"):
        load_anchors(tmp_path / "nan.safetensors")
    path = save_anchors(torch.randn(1, 64), tmp_path / "a.safetensors", run_id="r1")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # one flipped bit in the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(IncompleteSaveError, match="sha256"):
        load_anchors(path)
    with pytest.raises(ValueError, match="NaN"):
        save_anchors(torch.full((1, 64), INF), tmp_path / "inf.safetensors")


def test_saved_config_with_missing_key_or_wrong_type_names_the_key(model, tmp_path):
    _learner(model, 1).save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / _files.MANIFEST_NAME).unlink()  # hand-edited configs: the edits below are the test
    for edit, message in (
        (lambda c: c.pop("tau"), "no 'tau' entry"),
        (lambda c: c.update(format_version="2"), "format_version must be an integer"),
        (lambda c: c.update(n_soft="4"), "'n_soft' must be int"),
        (lambda c: c.update(tau=-1.0), "'tau' must be > 0"),
        (lambda c: c.update(trained_classnames="cat"), "'trained_classnames' must be list"),
    ):
        edited = json.loads(json.dumps(config))
        edit(edited)
        (tmp_path / CONFIG_NAME).write_text(json.dumps(edited))
        with pytest.warns(UserWarning), pytest.raises(ValueError, match=message):
            read_config(tmp_path, "prompt_learner")


def test_output_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        _files.write_text(tmp_path / "file" / "sub" / "results.json", "{}")


# ---------------------------------------------------------------------- caches that cannot go stale
def _routes():
    def data_copy(learner):
        learner.soft.data.copy_(torch.randn_like(learner.soft))

    def data_assign(learner):
        learner.position.logits.data = learner.position.logits.data.flip(0).clone()

    def load_state(learner):
        state = learner.state_dict()
        state["soft"] = torch.randn_like(state["soft"])
        learner.load_state_dict(state)

    def in_place(learner):
        with torch.no_grad():
            learner.soft.mul_(-1)

    def anchors_data(learner):
        learner.anchors.data.copy_(torch.randn_like(learner.anchors))

    return [data_copy, data_assign, load_state, in_place, anchors_data]


@pytest.mark.parametrize("change", _routes(), ids=lambda f: f.__name__)
def test_eval_predictions_follow_every_change_of_the_learned_tensors(model, change):
    learner = _learner(model, 3)
    images = torch.randn(5, 32)
    before = learner.predict(images, "novel")
    change(learner)
    fresh = AnchorOPTPromptLearner(model, CLASSES, learner.anchors.clone(), n_soft=4).eval()
    fresh.load_state_dict(learner.state_dict())
    after = learner.predict(images, "novel")
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, fresh.predict(images, "novel"), rtol=0, atol=0)


# ---------------------------------------------------------------------- JSON files
@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"cat": ["a cat."], "cat": ["a small cat."]}', "'cat' appears twice"),
        ('{"caf\u00e9": ["a caf\u00e9."]}'.encode("latin-1"), "is not UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, "nests JSON too deeply"),
        (b'{"cat": NaN}', "NaN is not a JSON value"),
    ],
    ids=["duplicate-key", "latin-1", "deep", "nan"],
)
def test_bad_json_files_are_named_with_the_problem(tmp_path, content, message):
    path = tmp_path / "descriptions.json"
    path.write_bytes(content)
    with pytest.raises(DescriptionsError, match=message) as err:
        load_descriptions(path)
    assert str(path) in str(err.value)


def test_long_descriptions_are_cut_with_a_warning(model):
    learner = AnchorLearner(model, ["cat"])
    with pytest.warns(UserWarning, match="fill the text tower's 77 tokens and are cut"):
        learner.targets({"cat": ["a cat " * 125 + "."]})


# ---------------------------------------------------------------------- datasets
def test_empty_class_folder_is_refused(tmp_path):
    D.make_synthetic_image_folder(tmp_path, ("circle", "square"), per_class=2, size=8)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"\['empty_class'\] hold no images"):
        D.read_image_folder(tmp_path)


@pytest.mark.parametrize("pair", [("sea_lion", "sea lion"), ("Sea_Lion", "sea_lion")])
def test_folders_naming_one_class_are_refused(tmp_path, pair):
    D.make_synthetic_image_folder(tmp_path / "src", ("x",), per_class=1, size=8)
    image = (tmp_path / "src" / "x" / "0000.png").read_bytes()
    for name in pair:
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "0.png").write_bytes(image)
    with pytest.raises(ValueError, match="name the same class"):
        D.read_image_folder(tmp_path / "data")


def test_class_names_with_the_same_tokens_are_refused(model):
    with pytest.raises(ValueError, match="'Cat' and 'cat' give the same tokens"):
        AnchorOPTPromptLearner(model, ["Cat", "cat"], torch.randn(1, 64))


def test_shots_beyond_a_class_warn_naming_it_and_negative_shots_are_refused():
    records = [D.Record(f"{c}{i}.png", label, c) for label, (c, n) in enumerate((("cat", 8), ("dog", 2)))
               for i in range(n)]
    with pytest.warns(UserWarning, match=r"1 class\(es\) have fewer than 4 images .*'dog' \(2\)"):
        D.few_shot(records, 4, 0)
    assert D.short_classes(records, 4) == {"dog": 2}
    with pytest.raises(ValueError, match="shots must be an integer >= 1"):
        D.few_shot(records, -3, 0)


# ---------------------------------------------------------------------- numbers
@pytest.mark.parametrize("bad", [NAN, INF, -1.0])
def test_non_finite_or_negative_options_are_refused(model, bad):
    with pytest.raises(ValueError, match="tau must be > 0"):
        PositionMatrix(4, 1, tau=bad)
    for field in ("ce_weight", "kd_weight", "temperature"):
        with pytest.raises(ValueError, match="must be"):
            StageIILossConfig(**{field: bad})
    learner = AnchorLearner(model, ["cat"])
    for option in ("lr", "mse_weight"):
        with pytest.raises(ValueError, match=f"Stage I {option} must be > 0"):
            learner.fit({"cat": ["a cat."]}, steps=1, progress=False, **{option: bad})


def test_bad_predict_and_loss_inputs_name_the_tensor(model):
    learner = _learner(model, 1)
    images = torch.randn(3, 32)
    images[1, 0] = NAN
    with pytest.raises(ValueError, match=r"image_features holds NaN / inf values \(rows \[1\]\)"):
        learner.predict(images)
    with pytest.raises(ValueError, match=r"image_features has shape \(3, 64\), expected \(B, 32\)"):
        learner.predict(torch.randn(3, 64))
    logits = torch.randn(2, 3)
    with pytest.raises(ValueError, match="non-empty batch"):
        anchoropt_loss(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="logits_anchor holds NaN"):
        anchoropt_loss(logits, torch.full((2, 3), NAN), torch.tensor([0, 1]))
    assert math.isfinite(float(anchoropt_loss(logits, logits, torch.tensor([0, 1]))))


def test_fp16_overflow_is_reported_with_what_to_do():
    model = tiny_openai_clip(fp16=True).requires_grad_(False).eval()
    learner = AnchorOPTPromptLearner(model, CLASSES, torch.randn(1, 64) * 1e5).eval()
    with pytest.raises(FloatingPointError, match="float16 text tower overflowed.*float32 or bfloat16"):
        learner.predict(torch.randn(2, 32))
