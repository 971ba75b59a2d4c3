"""Zero-shot classification with a CLIP: class prompts -> text features -> top-1 accuracy.

Axes: ``N`` images, ``C`` classes, ``E`` joint-embedding width.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PROMPT", "class_text_features", "image_features", "accuracy", "to_model_input", "dataset_accuracy"]

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


def dataset_accuracy(root, model: nn.Module, preprocess: Callable, tokenizer: Callable, split: str = "test",
                     template: str = PROMPT) -> float:
    """Zero-shot top-1 accuracy (a fraction) on ``split`` of the dataset directory ``root``.

    Images go through ``preprocess`` (a PIL -> tensor transform) and the data path of the runner
    (:func:`anchoropt.datasets.folders.open_dataset`), as a real dataset would.
    """
    from ..datasets.folders import ImageDataset, open_dataset

    dataset = open_dataset(root)
    records = dataset.split(split)
    if not records:
        raise ValueError(f"{root} has no {split!r} images")
    loader = torch.utils.data.DataLoader(ImageDataset(records, preprocess), batch_size=512)
    feats = torch.cat([image_features(model, images) for images, _, _ in loader])
    texts = class_text_features(model, tokenizer, dataset.classnames, template)
    return accuracy(feats, texts, [r.label for r in records])
