"""Shared fixtures: tiny random CLIP towers, the CLIP BPE tokenizer and the shared data folder.

The towers are session-scoped and frozen (``requires_grad_(False)``); a test that changes a tower
(dtype, attributes) must build its own with the ``anchoropt.testing`` factories.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports open_clip / huggingface_hub

from pathlib import Path

import json

import pytest
import torch

from anchoropt import testing

SHARED_DATA_ENV = "ANCHOROPT_SHARED_DATA"

# The tests run tiny models: intra-op threads only add overhead, and on a machine shared with other
# processes 2 threads ran several times slower than 1.  ANCHOROPT_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("ANCHOROPT_TEST_THREADS", "1")))


def shared_data_dir() -> Path:
    """``$ANCHOROPT_SHARED_DATA``, else the workplace's ``../shared/data`` next to the checkout."""
    env = os.environ.get(SHARED_DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    return model.requires_grad_(False).eval()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (descriptions, official anchors, cifar10_mini); skips when absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} absent (set {SHARED_DATA_ENV} to the shared/data folder)")
    return path


@pytest.fixture(scope="session")
def tokenizer():
    """open_clip's CLIP BPE tokenizer (context length 77)."""
    from anchoropt.template import default_tokenizer

    return default_tokenizer()


@pytest.fixture(scope="session")
def open_clip_model() -> torch.nn.Module:
    """Tiny open_clip ``CLIP`` (batch-first, model-level causal mask), fp32, frozen."""
    return _frozen(testing.tiny_open_clip())


@pytest.fixture(scope="session")
def custom_text_model() -> torch.nn.Module:
    """Tiny open_clip ``CustomTextCLIP`` (tower under ``.text``), fp32, frozen."""
    return _frozen(testing.tiny_custom_text_clip())


@pytest.fixture(scope="session")
def openai_model() -> torch.nn.Module:
    """Tiny OpenAI-``clip``-shaped model (sequence-first blocks with per-block masks), fp32, frozen."""
    return _frozen(testing.tiny_openai_clip(fp16=False))


@pytest.fixture(scope="session")
def openai_fp16_model() -> torch.nn.Module:
    """The same OpenAI-style model (same seed, same weights) cast to fp16 as ``clip.build_model`` does."""
    return _frozen(testing.tiny_openai_clip(fp16=True))


@pytest.fixture(scope="session")
def siglip_like_model() -> torch.nn.Module:
    """A ``CustomTextCLIP`` with a bidirectional text tower pooling the last position (SigLIP-like)."""
    return _frozen(testing.tiny_custom_text_clip(no_causal_mask=True, pool_type="last"))


_FP32_FIXTURES = {"open_clip": "open_clip_model", "custom_text": "custom_text_model", "openai": "openai_model"}


@pytest.fixture(scope="session", params=sorted(_FP32_FIXTURES))
def fp32_model(request) -> torch.nn.Module:
    """Each of the three fp32 layouts in turn (open_clip CLIP, CustomTextCLIP, OpenAI-style)."""
    return request.getfixturevalue(_FP32_FIXTURES[request.param])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The runner tests' data: 4 synthetic classes x 12 images (ImageFolder), 6 train / 2 val / 4 test per class."""
    from anchoropt.datasets import folders as data

    return data.make_synthetic_image_folder(tmp_path_factory.mktemp("data") / "shapes", per_class=12, size=32)


@pytest.fixture(scope="module")
def descriptions(tmp_path_factory, folder) -> Path:
    """CuPL-style descriptions of ``folder``'s classes (two sentences and one letterless entry each)."""
    from anchoropt.datasets import folders as data

    path = tmp_path_factory.mktemp("desc") / "shapes.json"
    names = data.read_image_folder(folder)[1]
    path.write_text(json.dumps({n: [f"a picture of a {n}.", f"a {n} drawn in one colour.", "."] for n in names}))
    return path


# ---------------------------------------------------------------------- interrupted runs
class Killed(BaseException):
    """Stands for the process being killed inside a run (a BaseException: nothing in the runner catches it)."""


def kill_after_checkpoint(monkeypatch, epochs: int = 2) -> list[int]:
    """Make ``rundir.save_checkpoint`` raise :class:`Killed` right after it wrote the checkpoint of epoch
    ``epochs``; returns the list (filled as the run goes) of the epochs whose checkpoints were written."""
    from anchoropt.runner import rundir

    real, saved = rundir.save_checkpoint, []

    def killed(directory, learner, run_id, state, tensors):
        real(directory, learner, run_id, state, tensors)
        saved.append(state["epochs_done"])
        if state["epochs_done"] == epochs:
            raise Killed()

    monkeypatch.setattr(rundir, "save_checkpoint", killed)
    return saved
