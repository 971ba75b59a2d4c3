"""Save and load AnchorOPT's learned tensors: safetensors + a small JSON config.

Only learned, class-independent tensors are stored (anchors, soft tokens, position logits); the
class-dependent prompts are rebuilt for whatever class list is given on load, so a learner trained on base
classes evaluates on novel ones.  Loading never unpickles: safetensors for our files, and the authors'
Dassl checkpoints through :mod:`anchoropt.official`.

Layout of a saved prompt learner directory::

    anchoropt_config.json     {"format": "anchoropt", "kind": "prompt_learner", "width": 512, ...}
    anchoropt.safetensors     soft (M, D), anchors (N, D), position.logits (M+N, M+N)
                              [+ deep.prompts (deep_depth, M, D) for the deep variant]

Format versions: 1 = shallow learner; 2 = adds ``deep_depth`` / ``deep_length`` and ``deep.prompts``.  A
shallow learner is still written as version 1 (readable by older anchoropt); files without ``deep_depth``
load as shallow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._jsonfile import read_json
from ._version import __version__
from .official import load_official_anchors
from .prompts import AnchorOPTPromptLearner
from .template import Tokenizer
from .towers import TextTower

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "save_anchors",
    "load_anchors",
    "save_prompt_learner",
    "load_prompt_learner",
    "read_config",
]

CONFIG_NAME = "anchoropt_config.json"
WEIGHTS_NAME = "anchoropt.safetensors"
FORMAT_VERSION = 1  # anchors and shallow prompt learners
DEEP_FORMAT_VERSION = 2  # prompt learners with deep prompts; also the newest format this version reads


# ---------------------------------------------------------------------- anchors (Stage I output)
def save_anchors(anchors: torch.Tensor | nn.Module, path: str | os.PathLike, classnames: Sequence[str] = ()) -> Path:
    """Write Stage I anchors ``(N, D)`` (or an :class:`~anchoropt.AnchorLearner`'s) to a safetensors file."""
    tensor = anchors.anchors if isinstance(anchors, nn.Module) else anchors
    tensor = tensor.detach().float().cpu().contiguous()
    if tensor.dim() != 2:
        raise ValueError(f"anchors must have shape (N, D), got {tuple(tensor.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "anchoropt",
        "kind": "anchors",
        "format_version": str(FORMAT_VERSION),
        "width": str(tensor.shape[1]),
        "trained_classnames": json.dumps(list(getattr(anchors, "classnames", classnames))),
    }
    save_file({"anchors": tensor}, str(path), metadata=metadata)
    return path


def load_anchors(path: str | os.PathLike, expected_width: int | None = None) -> torch.Tensor:
    """Anchors ``(N, D)`` float32 from our safetensors file or an authors' Dassl ``model.pth.tar``.

    Args:
        expected_width: the text tower's width ``D``; a file made for another width is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"anchor file not found: {path}")
    if path.suffix != ".safetensors":
        return load_official_anchors(path, expected_width=expected_width)
    tensors = _load_safetensors(path)
    if "anchors" not in tensors:
        raise ValueError(f"{path} holds no 'anchors' tensor (found: {sorted(tensors)})")
    anchors = tensors["anchors"].float()
    if anchors.dim() != 2:
        raise ValueError(f"{path}: anchors must have shape (N, D), got {tuple(anchors.shape)}")
    _check_width(anchors.shape[1], expected_width, path)
    return anchors


# ---------------------------------------------------------------------- Stage II prompt learner
def save_prompt_learner(learner: AnchorOPTPromptLearner, directory: str | os.PathLike) -> Path:
    """Write ``learner``'s learned tensors and configuration to ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    position = learner.position
    deep = getattr(learner, "deep", None)
    config = {
        "format": "anchoropt",
        "kind": "prompt_learner",
        "format_version": DEEP_FORMAT_VERSION if deep is not None else FORMAT_VERSION,
        "anchoropt_version": __version__,
        "width": learner.tower.width,
        "n_soft": learner.n_soft,
        "n_anchor": learner.n_anchor,
        "preposition": learner.preposition,
        "tau": position.tau,
        "arrangement": position.arrangement,
        "sample_in_eval": position.sample_in_eval,
        "trained_classnames": learner.classnames,
    }
    if deep is not None:
        config["deep_depth"], config["deep_length"] = deep.depth, deep.length
    tensors = {name: t.detach().cpu().contiguous() for name, t in learner.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "anchoropt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory


def load_prompt_learner(
    directory: str | os.PathLike,
    tower: TextTower | nn.Module,
    classnames: Sequence[str],
    tokenizer: Tokenizer | None = None,
) -> AnchorOPTPromptLearner:
    """Rebuild a saved prompt learner on ``tower`` for ``classnames`` (any class list, e.g. novel classes)."""
    directory = Path(directory)
    config = read_config(directory, kind="prompt_learner")
    tower = TextTower.from_model(tower)
    _check_width(config["width"], tower.width, directory)
    tensors = _load_safetensors(directory / WEIGHTS_NAME)
    expected = {
        "soft": (config["n_soft"], config["width"]),
        "anchors": (config["n_anchor"], config["width"]),
        "position.logits": (config["n_soft"] + config["n_anchor"],) * 2,
    }
    deep_depth = int(config.get("deep_depth", 0))
    if deep_depth:
        if int(config.get("deep_length", config["n_soft"])) != config["n_soft"]:
            raise ValueError(
                f"{directory / CONFIG_NAME}: deep_length {config['deep_length']} must equal n_soft {config['n_soft']}"
            )
        expected["deep.prompts"] = (deep_depth, config["n_soft"], config["width"])
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{directory / WEIGHTS_NAME} is missing the tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{directory / WEIGHTS_NAME}: {name!r} has shape {tuple(tensors[name].shape)}, "
                f"but the config says {shape}"
            )
    learner = AnchorOPTPromptLearner(
        tower,
        classnames,
        tensors["anchors"],
        n_soft=config["n_soft"],
        preposition=config["preposition"],
        tokenizer=tokenizer,
        tau=config["tau"],
        arrangement=config["arrangement"],
        deep_depth=deep_depth,
    )
    learner.position.sample_in_eval = bool(config.get("sample_in_eval", False))
    learner.load_state_dict({k: v.to(tower.device) for k, v in tensors.items()}, strict=True)
    return learner


def read_config(directory: str | os.PathLike, kind: str) -> dict:
    """The validated JSON config of a saved ``kind`` in ``directory``."""
    path = Path(directory) / CONFIG_NAME
    config = read_json(path, f"no {CONFIG_NAME} in {directory}: not a saved anchoropt {kind.replace('_', ' ')}")
    if not isinstance(config, dict) or config.get("format") != "anchoropt" or config.get("kind") != kind:
        raise ValueError(f"{path} is not an anchoropt {kind} config")
    if int(config.get("format_version", 0)) > DEEP_FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer anchoropt (format {config['format_version']}); upgrade anchoropt"
        )
    return config


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err


def _check_width(found: int, expected: int | None, where: Path) -> None:
    if expected is not None and int(found) != int(expected):
        raise ValueError(
            f"{where} was made for a text tower of width {found}, but this tower has width {expected}: "
            "it belongs to another CLIP model"
        )
