"""Zero-shot classification with a CLIP: class prompts -> text features -> top-1 accuracy.

Axes: ``N`` images, ``C`` classes, ``E`` joint-embedding width.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PROMPT", "class_text_features", "image_features", "accuracy", "to_model_input"]

PROMPT = "a photo of a {}."


@torch.no_grad()
def class_text_features(model: nn.Module, tokenizer: Callable, classnames: Sequence[str],
                        template: str = PROMPT) -> torch.Tensor:
    """L2-normalised text features ``(C, E)`` of ``template.format(name)`` for each class."""
    from .model import encode_text

    ids = tokenizer([template.format(name) for name in classnames])
    return F.normalize(encode_text(model, ids.to(next(model.parameters()).device)).float(), dim=-1)


def to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images ``(N, H, W, 3)`` -> normalised float ``(N, 3, H, W)`` (open_clip's OpenAI mean / std)."""
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def image_features(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """L2-normalised image features ``(N, E)`` of model-input images ``(N, 3, H, W)``."""
    device = next(model.parameters()).device
    out = [model.encode_image(images[i:i + batch_size].to(device)).float() for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat(out), dim=-1)


def accuracy(image_feats: torch.Tensor, text_feats: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> float:
    """Top-1 accuracy (a fraction) of nearest-text classification: ``(N, E)``, ``(C, E)``, ``(N,)``."""
    labels = torch.as_tensor(labels, device=image_feats.device)
    return float(((image_feats @ text_feats.T).argmax(dim=-1) == labels).float().mean())
