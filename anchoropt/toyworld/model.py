"""The toy world's small CLIP: an open_clip ``CLIP`` from a shipped JSON config, with the CLIP BPE tokenizer.

``load_model()`` returns ``(model, preprocess, tokenizer)`` - the model frozen in ``eval()`` mode with the
shipped pretrained weights (``toy_clip.safetensors``, fp16 storage, loaded as fp32), open_clip's
evaluation transform for 32 x 32 images and open_clip's CLIP tokenizer (context length 77, vocabulary
49408) - like ``open_clip.create_model_and_transforms`` + ``open_clip.get_tokenizer``.  The shipped file's
sha256 is checked against ``toy_clip_card.json`` before it is read; reading never runs code (safetensors).
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
from torch import nn

__all__ = ["MODEL_NAME", "CONFIG_FILE", "WEIGHTS_FILE", "CARD_FILE", "model_config", "build_model", "load_model",
           "shipped_weights", "model_card", "sha256_file", "encode_text", "check_weights"]

MODEL_NAME = "toy-clip"
CONFIG_FILE = "toy_clip_config.json"
WEIGHTS_FILE = "toy_clip.safetensors"
CARD_FILE = "toy_clip_card.json"


def _package_file(name: str) -> Path:
    return Path(str(resources.files(__package__).joinpath(name)))


def model_config() -> dict:
    """The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) of the toy CLIP."""
    return json.loads(_package_file(CONFIG_FILE).read_text(encoding="utf-8"))


def build_model(config: dict | None = None, seed: int | None = None) -> nn.Module:
    """A randomly initialised toy CLIP (open_clip ``CLIP``) in fp32; ``seed`` seeds torch's global generator."""
    import open_clip
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = dict(config or model_config())
    if seed is not None:
        torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    model.visual.preprocess_cfg = {"size": cfg["vision_cfg"]["image_size"], "mean": OPENAI_DATASET_MEAN,
                                   "std": OPENAI_DATASET_STD, "interpolation": "bicubic", "resize_mode": "shortest"}
    return model


def shipped_weights() -> Path:
    """Path of the shipped checkpoint (package data)."""
    return _package_file(WEIGHTS_FILE)


def model_card() -> dict:
    """The shipped checkpoint's record: sha256, the command that made it, its calibration figures."""
    path = _package_file(CARD_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{CARD_FILE} is missing from the installed package ({path})")
    return json.loads(path.read_text(encoding="utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(
    weights: str | os.PathLike | None = None, device: str | torch.device = "cpu", check_hash: bool = True,
) -> tuple[nn.Module, Callable, Callable]:
    """``(model, preprocess, tokenizer)`` of the pretrained toy CLIP, frozen, fp32, on ``device``.

    Args:
        weights: a safetensors state dict of this architecture; the shipped checkpoint by default.
        check_hash: verify the shipped checkpoint's sha256 against the model card (ignored for ``weights``).
    """
    from open_clip.tokenizer import SimpleTokenizer
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from safetensors.torch import load_file

    path = Path(weights) if weights is not None else shipped_weights()
    if not path.is_file():
        raise FileNotFoundError(f"toy CLIP weights not found: {path}" + (
            "" if weights is not None else " (the package was installed without its data files)"))
    if weights is None and check_hash:
        expected, actual = model_card()["sha256"], sha256_file(path)
        if actual != expected:
            raise ValueError(f"{path} has sha256 {actual}, but {CARD_FILE} records {expected}: the shipped "
                             "checkpoint was changed or damaged")
    check_weights(path)
    model = build_model()
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the toy CLIP: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(device).eval().requires_grad_(False)
    known = {"size", "mean", "std", "interpolation", "resize_mode"}
    preprocess = image_transform_v2(PreprocessCfg(**{k: v for k, v in model.visual.preprocess_cfg.items()
                                                     if k in known}), is_train=False)
    tokenizer = SimpleTokenizer(context_length=model.context_length)
    return model, preprocess, tokenizer


def check_weights(path: str | os.PathLike) -> None:
    """Refuse a file that is not a toy-CLIP checkpoint, reading only its safetensors header (never pickle):
    a ``.pt`` / ``.pth`` file, a damaged file, or a checkpoint of another architecture (tensor names or
    shapes that differ from the toy CLIP's), each with a message naming the file."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for a file that is not one
        raise ValueError(f"{path} is not a safetensors file ({type(err).__name__}: {err}): toy-CLIP weights are "
                         "the .safetensors files 'anchoropt toyworld pretrain' writes (pickled .pt files are "
                         "never loaded: they can run code)") from None
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in build_model().state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(key for key in set(expected) & set(shapes) if expected[key] != shapes[key])
    if missing or unexpected or wrong:
        detail = "; ".join(part for part in (
            f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
            ", ".join(f"{k} is {shapes[k]} not {expected[k]}" for k in wrong[:3])) if part)
        raise ValueError(f"{path} is not a checkpoint of the toy CLIP (another architecture: {detail}); pass a "
                         "file written by 'anchoropt toyworld pretrain', or use --model for that architecture")


def encode_text(model: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` run only up to the batch's last EOT (exact for the causal, EOT-pooled tower).

    ``token_ids`` ``(B, 77)`` -> features ``(B, E)`` (not normalised).
    """
    eot = token_ids.argmax(dim=-1)
    length = int(eot.max()) + 1
    x = model.token_embedding(token_ids[:, :length]) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0], device=x.device), eot] @ model.text_projection
