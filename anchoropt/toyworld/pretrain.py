"""Contrastive pretraining of the toy CLIP on the toy world's image-caption pairs.

A pool of images of every concept is rendered once (``pool_per_class`` each, each image in a style drawn
from ``styles``, a stream of its own, so never the images ``make`` writes).  Each step draws a batch of pool
images - one of each of ``batch_size`` distinct classes - (random flip and shift) with a freshly drawn caption
each (:mod:`captions`) and takes an AdamW step on the symmetric InfoNCE loss with a learned temperature (as
CLIP; the log-scale has a learning rate of its own, ``logit_scale_lr``).  Deterministic for a seed and a
thread count.

The result is saved as fp16 safetensors plus a JSON record (configuration, wall time, threads,
zero-shot accuracy and logit scale on a held-out probe of group 0 during training).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .captions import CaptionMix, Captioner
from .concepts import group, world
from .render import SEEN_DOMAINS, render_many
from .zeroshot import accuracy, class_text_features, image_features, to_model_input

__all__ = ["PretrainConfig", "RECIPE", "pretrain", "save_checkpoint"]

DEFAULT_STYLES = {"photo": 0.3, "sketch": 0.1, "blurry": 0.1, "dark": 0.1, "painting": 0.1, "texture": 0.1,
                  "scene": 0.2}
"""The share of each style among the pretraining images (the unseen domains never occur)."""

POOL_STREAM = 10
PROBE_STREAM = 11


@dataclass
class PretrainConfig:
    """Settings of one pretraining run (all of them are recorded next to the checkpoint)."""

    seed: int = 0
    steps: int = 2600
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    pool_per_class: int = 48
    mix: CaptionMix = field(default_factory=lambda: CaptionMix(style_mention=0.8, name_zipf=2.0,
                                                                        attr_keep=0.9, attr_at_least=3))
    styles: dict = field(default_factory=lambda: dict(DEFAULT_STYLES))
    logit_scale_lr: float = 0.03
    distinct_classes: bool = True
    threads: int = 1
    probe_every: int = 250
    probe_classes: int = 100
    probe_per_class: int = 4

    def validate(self) -> None:
        for name in ("steps", "batch_size", "pool_per_class", "threads", "probe_every", "probe_per_class"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.distinct_classes and self.batch_size > len(world()):
            raise ValueError(f"batch_size {self.batch_size} > {len(world())} classes: one image per class per "
                             "batch (distinct_classes) needs batch_size <= the number of classes")
        if not self.lr > 0 or not self.logit_scale_lr >= 0:
            raise ValueError(f"lr must be > 0 and logit_scale_lr >= 0, got {self.lr}, {self.logit_scale_lr}")
        unknown = set(self.styles) - set(SEEN_DOMAINS)
        if unknown or not self.styles or min(self.styles.values()) < 0 or sum(self.styles.values()) <= 0:
            raise ValueError(f"styles must give each of some of {SEEN_DOMAINS} a weight >= 0 (positive sum), "
                             f"got {self.styles}")
        self.mix.probabilities()

    def to_json(self) -> dict:
        return asdict(self)


def _lr_factor(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay: the fraction of each group's peak learning rate at ``step``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * t))


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a shift of up to 2 pixels (edge padding) of ``(B, 3, H, W)``."""
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    h, w = x.shape[-2:]
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    dy, dx = (int(v) for v in torch.randint(0, 5, (2,), generator=g))
    return padded[..., dy:dy + h, dx:dx + w]


def _param_groups(model: torch.nn.Module, cfg: PretrainConfig):
    """Weight decay on matrices only; the temperature alone at ``logit_scale_lr``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name != "logit_scale":
            (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay, "peak_lr": cfg.lr},
            {"params": no_decay, "weight_decay": 0.0, "peak_lr": cfg.lr},
            {"params": [model.logit_scale], "weight_decay": 0.0, "peak_lr": cfg.logit_scale_lr}]


def _batch(rng: np.random.Generator, cfg: PretrainConfig, n_concepts: int) -> np.ndarray:
    """Pool indices of one batch: with ``distinct_classes``, one image of each of ``batch_size`` different
    classes (no same-class false negatives in the contrastive loss), else any images."""
    if not cfg.distinct_classes:
        return rng.choice(n_concepts * cfg.pool_per_class, cfg.batch_size, replace=False)
    classes = rng.choice(n_concepts, cfg.batch_size, replace=False)
    return classes * cfg.pool_per_class + rng.integers(cfg.pool_per_class, size=cfg.batch_size)


def _style_picker(styles: dict) -> Callable[[np.random.Generator], str]:
    names = list(styles)
    p = np.array([styles[n] for n in names], dtype=np.float64)
    p = p / p.sum()
    return lambda rng: names[int(rng.choice(len(names), p=p))]


def pretrain(cfg: PretrainConfig, log: Callable[[str], None] = print) -> tuple[torch.nn.Module, dict]:
    """Train a toy CLIP from scratch; returns the model (fp32, eval mode) and the run's record."""
    from open_clip.tokenizer import SimpleTokenizer

    from .model import build_model, encode_text

    cfg.validate()
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    concepts = world()
    styles = _style_picker(cfg.styles)
    images, labels, backgrounds = render_many(concepts, cfg.pool_per_class, cfg.seed, POOL_STREAM, styles)
    image_styles = _pool_styles(concepts, cfg, styles)
    probe_concepts = group(0)[: cfg.probe_classes]
    probe_images, probe_labels, _ = render_many(probe_concepts, cfg.probe_per_class, cfg.seed, PROBE_STREAM)
    probe_x = to_model_input(probe_images)
    log(f"rendered {len(images)} pool images and {len(probe_images)} probe images "
        f"in {time.perf_counter() - start:.0f} s")

    model = build_model(seed=cfg.seed).train()
    tokenizer = SimpleTokenizer()
    captioner = Captioner(concepts, cfg.mix)
    rng = np.random.default_rng([cfg.seed, 1])
    g = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    probes, losses = [], []
    for step in range(cfg.steps):
        for group_ in optimizer.param_groups:
            group_["lr"] = group_["peak_lr"] * _lr_factor(step, cfg)
        idx = _batch(rng, cfg, len(concepts))
        x = _augment(to_model_input(images[idx]), g)
        ids = tokenizer([captioner.caption(int(labels[i]), backgrounds[i], rng, image_styles[i]) for i in idx])
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(encode_text(model, ids), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if (step + 1) % cfg.probe_every == 0 or step + 1 == cfg.steps:
            acc = _probe(model, tokenizer, probe_x, probe_labels, [c.name for c in probe_concepts])
            scale = float(model.logit_scale.detach().exp())
            probes.append({"step": step + 1, "zero_shot": acc, "logit_scale": round(scale, 2)})
            log(f"step {step + 1}/{cfg.steps}: loss {np.mean(losses[-cfg.probe_every:]):.3f}, "
                f"probe zero-shot {100 * acc:.1f}%, logit scale {scale:.1f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    record = {"config": cfg.to_json(), "wall_seconds": round(time.perf_counter() - start, 1),
              "threads": cfg.threads, "torch": torch.__version__, "probe": probes,
              "final_loss": float(np.mean(losses[-50:]))}
    return model, record


def _pool_styles(concepts, cfg: PretrainConfig, styles: Callable) -> list[str]:
    """The style of each pool image, in :func:`render_many`'s order (its first draw from the image's generator)."""
    from .render import image_rng

    return [styles(image_rng(cfg.seed, POOL_STREAM, c, k)) for c in concepts for k in range(cfg.pool_per_class)]


def _probe(model, tokenizer, x, labels, classnames) -> float:
    was_training = model.training
    model.eval()
    acc = accuracy(image_features(model, x), class_text_features(model, tokenizer, classnames), labels)
    model.train(was_training)
    return acc


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike, record: dict | None = None) -> Path:
    """Write ``model``'s state dict as fp16 safetensors (and ``record`` as ``<path>.json``); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if k != "attn_mask"}
    save_file(state, str(path))
    if record is not None:
        path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


RECIPE = PretrainConfig()
"""The settings of the shipped checkpoint (``anchoropt toyworld pretrain`` starts from these)."""
