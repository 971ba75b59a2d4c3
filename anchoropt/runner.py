"""The experiment runner behind ``anchoropt learn-anchors | train | eval | plot`` (see :mod:`anchoropt.cli`).

Protocols (Dassl / CoOp conventions, :mod:`anchoropt.data`):

* ``base2novel`` - the first ``ceil(C / 2)`` classes are base, the rest novel; Stage I learns the anchors
  from the base classes' descriptions; Stage II trains on K shots per base class; base classes are scored
  with the normal prompt, novel classes with the normal + anchor ensemble; the harmonic mean is reported.
* ``cross-dataset`` - train on all classes of the source dataset, evaluate on the source's test split and
  on every target dataset (its own classes).
* ``domain-generalization`` - train on all classes of the source, evaluate on target folders whose class
  names are source class names (ImageNet -> -V2 / -Sketch / -A / -R style).

Every evaluation reports the accuracy of the normal prompt, of the anchor prompt alone and of their
ensemble; the headline number uses the normal prompt for classes seen in training and the ensemble for
unseen ones (``eval_mode="auto"``), as the paper's inference switch.

Axes: ``B`` images, ``C`` classes, ``E`` joint-embedding width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import data as D
from . import distributed as dist_utils
from ._jsonfile import read_json
from .functional import clip_logits, ensemble_logits
from .losses import StageIILoss
from .presets import preset as get_preset

__all__ = [
    "PROTOCOLS",
    "TINY_MODELS",
    "RunConfig",
    "ModelBundle",
    "RunResult",
    "build_model",
    "train_transform",
    "eval_transform",
    "seed_everything",
    "encode_images",
    "StepTimer",
    "learn_anchors",
    "train_stage2",
    "evaluate",
    "run_training",
    "run_learn_anchors",
    "run_evaluation",
    "harmonic_mean",
]

PROTOCOLS = ("base2novel", "cross-dataset", "domain-generalization")
EVAL_MODES = ("auto", "base", "novel", "anchor")
AUGMENTATIONS = ("rrc_flip", "none")
RUN_CONFIG = "run_config.json"
RESULTS = "results.json"


# ---------------------------------------------------------------------- configuration
@dataclass
class RunConfig:
    """Everything a run needs; written to ``run_config.json`` so ``eval`` can rebuild it.

    ``None`` fields are filled by :meth:`resolve` from the preset (``preset=``), then the defaults below
    (the paper's loss: CE 1 + KD 10 per sample, T 1; the released script's 100 epochs and 4 soft tokens).
    """

    protocol: str = "base2novel"
    data: str | None = None
    split_json: str | None = None
    image_root: str | None = None
    classnames_file: str | None = None
    targets: list[str] = field(default_factory=list)
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    precision: str = "fp32"
    preset: str | None = None
    descriptions: str | None = None
    anchors: str | None = None
    output: str = "runs/anchoropt"
    seed: int = 1
    shots: int | None = None
    n_soft: int | None = None
    n_anchor: int | None = None
    preposition: str = "of"
    deep_depth: int = 0
    tau: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    warmup_epochs: int | None = None
    warmup_lr: float | None = None
    ce_weight: float | None = None
    kd_weight: float | None = None
    kd_temperature: float | None = None
    kd_normalization: str | None = None
    stage1_steps: int | None = None
    stage1_mse_weight: float | None = None
    stage1_lr: float | None = None
    max_descriptions: int | None = None
    augment: str = "rrc_flip"
    cache_image_features: bool = False
    cache_views: int = 0
    eval_mode: str = "auto"
    eval_batch_size: int = 100
    p_train: float = 0.5
    p_val: float = 0.2
    split_seed: int = 1
    device: str | None = None
    workers: int = 0
    progress: bool = True
    plots: bool = True
    save_every: int = 0

    _DEFAULTS = dict(
        shots=16, n_soft=4, n_anchor=1, tau=1.0, epochs=100, batch_size=32, lr=0.002, momentum=0.9,
        weight_decay=5e-4, warmup_epochs=1, warmup_lr=1e-5, ce_weight=1.0, kd_weight=10.0, kd_temperature=1.0,
        kd_normalization="batchmean", stage1_mse_weight=1000.0, stage1_lr=0.002, max_descriptions=10,
    )

    def resolve(self) -> "RunConfig":
        """A copy with every ``None`` hyperparameter filled (explicit > preset > defaults), validated."""
        values = dataclasses.asdict(self)
        chosen = get_preset(self.preset).to_dict() if self.preset else {}
        for key, default in self._DEFAULTS.items():
            if values[key] is None:
                values[key] = chosen.get(key, default)
        cfg = RunConfig(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {PROTOCOLS}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.augment!r}; choose one of {AUGMENTATIONS}")
        if self.eval_mode not in EVAL_MODES:
            raise ValueError(f"unknown eval mode {self.eval_mode!r}; choose one of {EVAL_MODES}")
        if self.cache_image_features and self.augment != "none" and self.cache_views < 1:
            raise ValueError(
                "caching image features needs fixed images: pass --augment none with --cache-image-features, "
                "or --cache-views K to draw K augmented views per image once (the paper's default is a fresh "
                "random crop + flip every step)"
            )
        if self.cache_views and (not self.cache_image_features or self.augment == "none"):
            raise ValueError("--cache-views K goes with --cache-image-features and an augmentation (not --augment none)")
        if self.protocol == "base2novel" and self.targets:
            raise ValueError("--target datasets belong to --protocol cross-dataset or domain-generalization; "
                             "base-to-novel evaluates the novel half of --data")
        if self.protocol != "base2novel" and not self.targets:
            raise ValueError(f"the {self.protocol} protocol needs at least one target dataset (--target DIR)")
        for name in ("epochs", "batch_size", "n_anchor"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def stage1_step_count(self, n_classes: int) -> int:
        """Explicit ``stage1_steps``, else the released schedule for ``n_classes`` (preset epochs x batches)."""
        if self.stage1_steps is not None:
            return self.stage1_steps
        base = get_preset(self.preset) if self.preset else get_preset("default")
        return base.stage1_steps(n_classes, self.shots)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# ---------------------------------------------------------------------- models
def _tiny(factory: str, **kwargs):
    def build():
        from . import testing

        return getattr(testing, factory)(image_size=32, **kwargs)

    return build


TINY_MODELS: dict[str, Callable[[], nn.Module]] = {
    # random-weight towers for tests and offline demos (CLIP BPE vocabulary, 32 x 32 images)
    "tiny-test": _tiny("tiny_open_clip"),
    "tiny-eva-test": _tiny("tiny_custom_text_clip"),  # CustomTextCLIP, causal, EOT pooling (EVA-CLIP-style)
    "tiny-siglip-test": _tiny("tiny_custom_text_clip", no_causal_mask=True, pool_type="last"),  # SigLIP-like
}


@dataclass
class ModelBundle:
    """A frozen CLIP with its tokenizer and image transforms."""

    model: nn.Module
    tokenizer: Callable | None
    train_transform: Callable
    test_transform: Callable
    name: str = "custom"


def build_model(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    augment: str = "rrc_flip",
) -> ModelBundle:
    """An open_clip model by name (or a ``.json`` model config file, or a ``tiny-*`` test model), frozen.

    Args:
        pretrained: an open_clip tag (``"openai"``, ``"laion2b_s34b_b88k"`` ... needs a network or a filled
            cache), a local checkpoint file, or ``None`` / ``"none"`` for random weights.
        augment: training transform: ``"rrc_flip"`` (random resized crop, scale 0.08-1, + horizontal flip,
            as the CoOp family) or ``"none"`` (the test transform).
    """
    pretrained = None if pretrained in (None, "", "none", "None") else str(pretrained)
    if name in TINY_MODELS:
        model = TINY_MODELS[name]()
        if pretrained is not None:
            if not Path(pretrained).is_file():
                raise ValueError(f"{name} is a random-weight test model: --pretrained must be 'none' or a weights "
                                 f"file, got {pretrained!r}")
            _load_state_dict_file(model, pretrained)
        tokenizer = None
    else:
        import open_clip

        if name.endswith(".json"):
            config = Path(name)
            if not config.is_file():
                raise FileNotFoundError(f"model config file not found: {config}")
            open_clip.add_model_config(config)
            name = config.stem
        if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models() (or pass a .json config)")
        if pretrained is not None and not Path(pretrained).is_file() and \
                pretrained not in open_clip.list_pretrained_tags_by_model(name):
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ValueError(f"{pretrained!r} is neither a file nor a pretrained tag of {name} (tags: {tags})")
        model = open_clip.create_model(name, pretrained=pretrained, precision=precision, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    model = model.to(device).eval().requires_grad_(False)
    test_tf = eval_transform(model)
    train_tf = train_transform(model, augment)
    return ModelBundle(model, tokenizer, train_tf, test_tf, name)


def _load_state_dict_file(model: nn.Module, path: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    model.load_state_dict(state)


def _preprocess_cfg(model: nn.Module):
    from open_clip.transform import PreprocessCfg

    visual = getattr(model, "visual", model)
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    if "size" not in cfg:
        size = getattr(visual, "image_size", None) or getattr(visual, "input_resolution", 224)
        cfg["size"] = size
    known = {f.name for f in dataclasses.fields(PreprocessCfg)}
    return PreprocessCfg(**{k: v for k, v in cfg.items() if k in known})


def eval_transform(model: nn.Module) -> Callable:
    """open_clip's evaluation transform for ``model`` (resize, centre crop, normalise)."""
    from open_clip.transform import image_transform_v2

    return image_transform_v2(_preprocess_cfg(model), is_train=False)


def train_transform(model: nn.Module, augment: str = "rrc_flip") -> Callable:
    """Training transform: the CoOp family's random resized crop (scale 0.08-1, bicubic) + horizontal flip,
    with open_clip's normalisation for ``model``; ``augment="none"`` gives the test transform."""
    if augment == "none":
        return eval_transform(model)
    if augment != "rrc_flip":
        raise ValueError(f"unknown augmentation {augment!r}; choose one of {AUGMENTATIONS}")
    from open_clip.transform import AugmentationCfg, image_transform_v2
    from torchvision import transforms as T

    rrc = image_transform_v2(_preprocess_cfg(model), is_train=True, aug_cfg=AugmentationCfg(scale=(0.08, 1.0)))
    return T.Compose([T.RandomHorizontalFlip(), rrc])


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (when installed) and torch's generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy

        numpy.random.seed(seed % 2**32)


@torch.no_grad()
def encode_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image features ``(B, E)`` (float32) of the frozen image tower."""
    dtype = next(model.visual.parameters()).dtype if hasattr(model, "visual") else torch.float32
    return F.normalize(model.encode_image(images.to(dtype)).float(), dim=-1)


# ---------------------------------------------------------------------- timing
class StepTimer:
    """Wall time per named section of a training step (CUDA-synchronised); used by the benchmark."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.times: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.times.setdefault(name, []).append(time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.times.setdefault(name, []).append(seconds)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _no_timer(name: str):
    return contextlib.nullcontext()


# ---------------------------------------------------------------------- stages
def learn_anchors(
    bundle: ModelBundle,
    classnames: Sequence[str],
    descriptions: str | os.PathLike | dict,
    cfg: RunConfig,
    ctx: dist_utils.DistContext | None = None,
) -> tuple[torch.Tensor, dict]:
    """Stage I on ``classnames``: anchors ``(N, D)`` and a summary (steps, first / last loss, seconds).

    Under ``torchrun`` rank 0 learns them and broadcasts (the loss does not depend on the images).
    """
    from .anchors import AnchorLearner

    ctx = ctx or dist_utils.DistContext()
    start = time.perf_counter()
    steps = cfg.stage1_step_count(len(classnames))
    learner = AnchorLearner(bundle.model, list(classnames), n_anchor=cfg.n_anchor, preposition=cfg.preposition,
                            tokenizer=bundle.tokenizer)
    history: list[float] = []
    if ctx.is_main:
        history = learner.fit(descriptions, steps=steps, lr=cfg.stage1_lr, mse_weight=cfg.stage1_mse_weight,
                              max_per_class=cfg.max_descriptions, progress=cfg.progress)
    anchors = dist_utils.broadcast_tensor(learner.frozen_anchors().to(ctx.device), ctx)
    info = {"steps": steps, "mse_weight": cfg.stage1_mse_weight, "lr": cfg.stage1_lr,
            "loss_first": history[0] if history else None, "loss_last": history[-1] if history else None,
            "classes": len(classnames), "seconds": round(time.perf_counter() - start, 3)}
    return anchors.cpu(), info


def epoch_lr(epoch: int, cfg: RunConfig) -> float:
    """Dassl's schedule: ``warmup_epochs`` at a constant ``warmup_lr``, then cosine over ``epochs`` epochs."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / cfg.epochs))


def train_stage2(
    learner: nn.Module,
    bundle: ModelBundle,
    records: Sequence[D.Record],
    cfg: RunConfig,
    ctx: dist_utils.DistContext | None = None,
    timer: StepTimer | None = None,
    on_epoch_end: Callable[[int, float], None] | None = None,
) -> dict:
    """Stage II: SGD on the soft tokens and position logits over ``records`` for ``cfg.epochs`` epochs.

    With ``cfg.cache_image_features`` the frozen image tower runs before the first epoch instead of once per
    step: once per training image (``augment="none"``), or ``cfg.cache_views`` times per image with the
    training augmentation, each step then using one of an image's views at random (Tip-Adapter practice).  Returns a summary (losses per epoch, steps,
    seconds, cache build time).
    """
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    ctx = ctx or dist_utils.DistContext()
    timer = timer or _no_timer
    device = ctx.device
    summary: dict[str, Any] = {"images": len(records)}
    cached = None
    if cfg.cache_image_features:
        start = time.perf_counter()
        if cfg.augment == "none":
            cached = _feature_table(bundle, records, bundle.test_transform, cfg, device)[None]
        else:
            cached = torch.stack([_feature_table(bundle, records, bundle.train_transform, cfg, device)
                                  for _ in range(cfg.cache_views)])
        summary["cache_seconds"] = round(time.perf_counter() - start, 3)
        view_generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        dataset = TensorDataset(torch.arange(len(records)), torch.tensor([r.label for r in records]),
                                torch.arange(len(records)))
    else:
        dataset = D.ImageDataset(records, bundle.train_transform)
    sampler = DistributedSampler(dataset, shuffle=True, seed=cfg.seed, drop_last=False) if ctx.distributed else None
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=0 if cached is not None else cfg.workers, drop_last=False,
                        generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=False)
    params = [p for p in learner.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loss_fn = StageIILoss(ce_weight=cfg.ce_weight, kd_weight=cfg.kd_weight, temperature=cfg.kd_temperature,
                          kd_normalization=cfg.kd_normalization)
    module = dist_utils.wrap_ddp(learner, ctx)
    module.train()
    if ctx.distributed:  # replicas start equal (DDP broadcasts rank 0's); each then draws its own Gumbel noise
        torch.manual_seed(cfg.seed * 1000 + ctx.rank)
    bar = _bar(cfg.epochs * len(loader), "Stage II", cfg.progress and ctx.is_main)
    losses: list[float] = []
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(epoch, cfg)
        if sampler is not None:
            sampler.set_epoch(epoch)
        total, seen = 0.0, 0
        fetch_start = time.perf_counter()
        for batch, labels, _ in loader:
            if timer is not _no_timer:
                timer.add("data", time.perf_counter() - fetch_start)
            labels = labels.to(device)
            if cached is None:
                with timer("image_encoding"):
                    features = encode_images(bundle.model, batch.to(device))
            else:  # batch holds image indices (V, N, E) table: one of each image's cached views
                views = torch.randint(cached.shape[0], (len(batch),), generator=view_generator)
                features = cached[views.to(cached.device), batch.to(cached.device)].to(device)
            with timer("text_encoding"):
                logits_normal, logits_anchor = module(features)
            with timer("loss_backward"):
                loss = loss_fn(logits_normal, logits_anchor, labels)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"Stage II loss is {loss.item()} at epoch {epoch}; lower the lr or the loss weights"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total, seen = total + loss.item() * len(labels), seen + len(labels)
            if bar is not None:
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
                bar.update()
            fetch_start = time.perf_counter()
        losses.append(total / max(seen, 1))
        if on_epoch_end is not None:
            on_epoch_end(epoch, losses[-1])
    if bar is not None:
        bar.close()
    summary.update(epochs=cfg.epochs, steps_per_epoch=len(loader), epoch_losses=[round(x, 6) for x in losses],
                   seconds=round(time.perf_counter() - start, 3))
    return summary


@torch.no_grad()
def _feature_table(bundle: ModelBundle, records: Sequence[D.Record], transform, cfg: RunConfig,
                   device: torch.device) -> torch.Tensor:
    """Image features ``(len(records), E)`` in record order."""
    from torch.utils.data import DataLoader

    # its own generator: creating the iterator must not draw from the global RNG (the Gumbel samples' source)
    loader = DataLoader(D.ImageDataset(records, transform), batch_size=cfg.eval_batch_size, num_workers=cfg.workers,
                        generator=torch.Generator())
    return torch.cat([encode_images(bundle.model, images.to(device)) for images, _, _ in loader])


@torch.no_grad()
def evaluate(
    learner: nn.Module,
    bundle: ModelBundle,
    records: Sequence[D.Record],
    classnames: Sequence[str],
    cfg: RunConfig,
    ctx: dist_utils.DistContext | None = None,
    headline: str = "base",
    description: str = "eval",
) -> dict:
    """Top-1 accuracy (%) of the normal prompt, the anchor prompt and their ensemble on ``records``.

    Text features are computed once for ``classnames`` (deterministic position matrix); under ``torchrun``
    every process scores its own slice of the images.  ``headline`` picks ``accuracy``: ``"base"``
    (normal prompt), ``"novel"`` (ensemble) or ``"anchor"``.
    """
    from torch.utils.data import DataLoader

    ctx = ctx or dist_utils.DistContext()
    learner = dist_utils.unwrap(learner)
    learner.set_classnames(list(classnames))
    learner.eval()
    with torch.no_grad():
        text_normal, text_anchor = learner.normal_features(), learner.anchor_features()
    scale = learner.logit_scale()
    mine = dist_utils.shard(list(records), ctx)
    loader = DataLoader(D.ImageDataset(mine, bundle.test_transform), batch_size=cfg.eval_batch_size,
                        num_workers=cfg.workers, generator=torch.Generator())
    counts = [0.0, 0.0, 0.0, 0.0]  # normal, anchor, ensemble, total
    bar = _bar(len(loader), description, cfg.progress and ctx.is_main)
    for images, labels, _ in loader:
        features = encode_images(bundle.model, images.to(ctx.device))
        labels = labels.to(ctx.device)
        normal = clip_logits(features, text_normal, scale)
        anchor = clip_logits(features, text_anchor, scale)
        for i, logits in enumerate((normal, anchor, ensemble_logits(normal, anchor))):
            counts[i] += float((logits.argmax(dim=-1) == labels).sum())
        counts[3] += len(labels)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    normal_ok, anchor_ok, ensemble_ok, total = dist_utils.all_reduce_sum(counts, ctx)
    pct = (lambda ok: round(100.0 * ok / total, 4) if total else float("nan"))
    result = {
        "n_images": int(total),
        "n_classes": len(classnames),
        "accuracy_normal": pct(normal_ok),
        "accuracy_anchor": pct(anchor_ok),
        "accuracy_ensemble": pct(ensemble_ok),
        "mode": headline,
    }
    result["accuracy"] = result[{"base": "accuracy_normal", "novel": "accuracy_ensemble",
                                 "anchor": "accuracy_anchor"}[headline]]
    return result


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


# ---------------------------------------------------------------------- whole runs
@dataclass
class RunResult:
    """What :func:`run_training` returns: the results dict, the trained learner (unwrapped) and the paths."""

    results: dict
    learner: nn.Module | None = None
    output: Path | None = None


def _log(ctx: dist_utils.DistContext, message: str) -> None:
    if ctx.is_main:
        print(message, file=sys.stderr, flush=True)


def _source_dataset(cfg: RunConfig) -> D.DatasetSplits:
    if not cfg.data:
        raise ValueError("no dataset: pass --data DIR (an ImageFolder directory or a CoOp dataset directory)")
    return D.open_dataset(cfg.data, split_json=cfg.split_json, image_root=cfg.image_root,
                          classnames_file=cfg.classnames_file, holdout=True, p_train=cfg.p_train,
                          p_val=cfg.p_val, split_seed=cfg.split_seed)


def _target_dataset(path: str, cfg: RunConfig) -> D.DatasetSplits:
    return D.open_dataset(path, holdout=False, split_seed=cfg.split_seed)


def _training_view(source: D.DatasetSplits, cfg: RunConfig) -> tuple[D.DatasetSplits, D.DatasetSplits | None]:
    """The (K-shot, subsampled) training dataset and, for base-to-novel, the novel view."""
    few = D.sample_few_shot(source, cfg.shots, cfg.seed)
    if cfg.protocol == "base2novel":
        if source.n_classes < 2:
            raise ValueError("base-to-novel needs at least two classes")
        return D.subsample_classes(few, "base"), D.subsample_classes(few, "new")
    return few, None


def _headline(mode: str, classnames: Sequence[str], trained: Sequence[str]) -> str:
    if mode != "auto":
        return mode
    return "base" if set(classnames) <= set(trained) else "novel"


def _open_targets(cfg: RunConfig, trained: Sequence[str]) -> list[D.DatasetSplits]:
    """The target datasets, checked against the protocol (before any training is spent)."""
    targets = []
    for path in cfg.targets:
        target = _target_dataset(path, cfg)
        unknown = sorted(set(target.classnames) - set(trained))
        if cfg.protocol == "domain-generalization" and unknown:
            raise ValueError(
                f"domain generalisation needs the target's classes among the source's: {target.name} has "
                f"{len(unknown)} unknown class(es), e.g. {unknown[:5]} (use --protocol cross-dataset, or a "
                "classnames.txt in the target folder mapping its folders to source class names)"
            )
        if not target.test:
            raise ValueError(f"target {path} has no test images")
        targets.append(target)
    return targets


def _evaluations(learner, bundle, cfg, ctx, train_view, novel_view, trained) -> dict:
    """Run the protocol's evaluations; returns the ``results`` part of results.json."""
    out: dict[str, Any] = {}
    if cfg.protocol == "base2novel":
        base = evaluate(learner, bundle, train_view.test, train_view.classnames, cfg, ctx,
                        _headline(cfg.eval_mode, train_view.classnames, trained), "eval base")
        novel = evaluate(learner, bundle, novel_view.test, novel_view.classnames, cfg, ctx,
                         _headline(cfg.eval_mode, novel_view.classnames, trained), "eval novel")
        out.update(base=base, novel=novel, hm=round(harmonic_mean(base["accuracy"], novel["accuracy"]), 4))
        return out
    out["source"] = evaluate(learner, bundle, train_view.test, train_view.classnames, cfg, ctx,
                             _headline(cfg.eval_mode, train_view.classnames, trained), "eval source")
    out["targets"] = {}
    for path, target in zip(cfg.targets, _open_targets(cfg, trained)):
        name = _unique_key(target.name, out["targets"])
        out["targets"][name] = evaluate(learner, bundle, target.test, target.classnames, cfg, ctx,
                                        _headline(cfg.eval_mode, target.classnames, trained), f"eval {name}")
        out["targets"][name]["path"] = str(path)
    accs = [r["accuracy"] for r in out["targets"].values()]
    out["target_mean"] = round(sum(accs) / len(accs), 4) if accs else None
    return out


def _unique_key(name: str, taken: dict) -> str:
    key, n = name, 2
    while key in taken:
        key, n = f"{name}_{n}", n + 1
    return key


def summary_line(results: dict) -> str:
    """One line for logs: ``base2novel cifar10_mini seed 1 | base 81.2 | novel 70.3 | HM 75.4``."""
    head = f"{results['protocol']} {results['dataset']} seed {results['seed']}"
    r = results["results"]
    if results["protocol"] == "base2novel":
        return (f"{head} | base {r['base']['accuracy']:.2f} | novel {r['novel']['accuracy']:.2f} | "
                f"HM {r['hm']:.2f}")
    parts = [f"source {r['source']['accuracy']:.2f}"]
    parts += [f"{name} {v['accuracy']:.2f}" for name, v in r["targets"].items()]
    if r.get("target_mean") is not None:
        parts.append(f"target mean {r['target_mean']:.2f}")
    return f"{head} | " + " | ".join(parts)


def run_learn_anchors(cfg: RunConfig, bundle: ModelBundle | None = None, classnames: Sequence[str] | None = None,
                      subsample: str = "base") -> dict:
    """``anchoropt learn-anchors``: Stage I only; writes ``<output>/anchors.safetensors`` and ``stage1.json``.

    Classes: the base (or all) classes of ``cfg.data``, or ``classnames``, or the descriptions file's keys.
    """
    from .descriptions import load_descriptions
    from .io import save_anchors

    cfg = cfg.resolve() if any(getattr(cfg, k) is None for k in RunConfig._DEFAULTS) else cfg
    if not cfg.descriptions:
        raise ValueError("learn-anchors needs --descriptions (a {class: [sentences]} JSON file)")
    ctx = dist_utils.init_from_env(cfg.device)
    seed_everything(cfg.seed)
    bundle = bundle or build_model(cfg.model, cfg.pretrained, ctx.device, cfg.precision, cfg.augment)
    if classnames is None:
        if cfg.data:
            classnames = D.subsample_classes(D.sample_few_shot(_source_dataset(cfg), cfg.shots, cfg.seed),
                                             subsample).classnames
        else:
            keys = list(load_descriptions(cfg.descriptions))
            classnames = keys[: math.ceil(len(keys) / 2)] if subsample == "base" else keys
    anchors, info = learn_anchors(bundle, classnames, cfg.descriptions, cfg, ctx)
    out = Path(cfg.output)
    info.update(classnames=list(classnames), model=cfg.model, pretrained=cfg.pretrained,
                descriptions=cfg.descriptions, anchor_norms=[round(float(x), 4) for x in anchors.norm(dim=-1)])
    if ctx.is_main:
        save_anchors(anchors, out / "anchors.safetensors", classnames=list(classnames))
        (out / "stage1.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        print(f"stage1 {len(classnames)} classes | {info['steps']} steps | loss {info['loss_first']:.4f} -> "
              f"{info['loss_last']:.4f} | anchors -> {out / 'anchors.safetensors'}", flush=True)
    dist_utils.cleanup(ctx)
    return info


def run_training(cfg: RunConfig, bundle: ModelBundle | None = None, evaluate_after: bool = True,
                 ctx: dist_utils.DistContext | None = None) -> RunResult:
    """``anchoropt train``: (Stage I) + Stage II + the protocol's evaluation; writes the run directory.

    Run directory: ``run_config.json``, ``anchors.safetensors``, ``prompt_learner/`` (safetensors + JSON,
    :mod:`anchoropt.io`), ``results.json`` and ``plots/*.png`` (when matplotlib is installed).

    Args:
        bundle: a ready :class:`ModelBundle` (any CLIP model object); built from ``cfg.model`` otherwise.
        ctx: a distributed context (from :func:`anchoropt.distributed.init_from_env` by default).
    """
    from .io import load_anchors, save_anchors, save_prompt_learner
    from .prompts import AnchorOPTPromptLearner

    cfg = _absolute_paths(cfg.resolve())  # run_config.json then works from any directory
    own_ctx = ctx is None
    ctx = ctx or dist_utils.init_from_env(cfg.device)
    seed_everything(cfg.seed)  # same frozen random towers and initial prompts on every process
    wall = time.perf_counter()
    bundle = bundle or build_model(cfg.model, cfg.pretrained, ctx.device, cfg.precision, cfg.augment)
    source = _source_dataset(cfg)
    train_view, novel_view = _training_view(source, cfg)
    trained = train_view.classnames
    if evaluate_after:
        _open_targets(cfg, trained)
    _log(ctx, f"{source.summary()}; training on {len(train_view.train)} images of {len(trained)} classes "
              f"({cfg.shots} shots, seed {cfg.seed}, protocol {cfg.protocol}, world size {ctx.world_size})")
    out = Path(cfg.output)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_CONFIG).write_text(json.dumps(cfg.to_json(), indent=2) + "\n", encoding="utf-8")

    stage1: dict[str, Any]
    if cfg.anchors:
        anchors = load_anchors(cfg.anchors, expected_width=_text_width(bundle.model))
        stage1 = {"anchors_from": cfg.anchors}
    elif cfg.descriptions:
        anchors, stage1 = learn_anchors(bundle, trained, cfg.descriptions, cfg, ctx)
        if ctx.is_main:  # the other processes did not run Stage I (rank 0 broadcast the anchors)
            _log(ctx, f"Stage I: {stage1['steps']} steps, loss {stage1['loss_first']:.4f} -> "
                      f"{stage1['loss_last']:.4f}")
    else:
        raise ValueError("Stage II needs anchors: pass --descriptions JSON (Stage I runs first) or --anchors FILE")
    if cfg.n_anchor != anchors.shape[0]:
        cfg = dataclasses.replace(cfg, n_anchor=int(anchors.shape[0]))

    deep = {"deep_depth": cfg.deep_depth} if cfg.deep_depth else {}
    learner = AnchorOPTPromptLearner(bundle.model, trained, anchors, n_soft=cfg.n_soft, preposition=cfg.preposition,
                                     tokenizer=bundle.tokenizer, tau=cfg.tau, **deep)

    def checkpoint(epoch: int, loss: float) -> None:
        if ctx.is_main and cfg.save_every and (epoch + 1) % cfg.save_every == 0 and epoch + 1 < cfg.epochs:
            save_prompt_learner(learner, out / "checkpoints" / f"epoch_{epoch + 1}")

    stage2 = train_stage2(learner, bundle, train_view.train, cfg, ctx, on_epoch_end=checkpoint)
    _log(ctx, f"Stage II: {stage2['epochs']} epochs x {stage2['steps_per_epoch']} steps, "
              f"loss {stage2['epoch_losses'][0]:.4f} -> {stage2['epoch_losses'][-1]:.4f} ({stage2['seconds']} s)")
    if ctx.is_main:
        save_anchors(anchors, out / "anchors.safetensors", classnames=trained)
        save_prompt_learner(learner, out / "prompt_learner")
    results: dict[str, Any] = {
        "protocol": cfg.protocol, "dataset": source.name, "model": cfg.model, "pretrained": cfg.pretrained,
        "preset": cfg.preset, "seed": cfg.seed, "shots": cfg.shots, "trained_classes": list(trained),
        "world_size": ctx.world_size, "stage1": stage1, "stage2": stage2,
        "position": {"assignment": learner.position.assignment().tolist(), "slots": learner.position.describe()},
    }
    if evaluate_after:
        start = time.perf_counter()
        results["results"] = _evaluations(learner, bundle, cfg, ctx, train_view, novel_view, trained)
        results["eval_seconds"] = round(time.perf_counter() - start, 3)
        learner.set_classnames(list(trained))
        results["summary"] = summary_line(results)
    results["seconds"] = round(time.perf_counter() - wall, 3)
    if ctx.is_main:
        (out / RESULTS).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        if cfg.plots:
            results["plots"] = _plots(learner, bundle, out)
        if "summary" in results:
            print(results["summary"], flush=True)
    dist_utils.barrier(ctx)
    if own_ctx:
        dist_utils.cleanup(ctx)
    return RunResult(results, learner, out)


def run_evaluation(run_dir: str | os.PathLike, overrides: dict | None = None, bundle: ModelBundle | None = None,
                   output: str | os.PathLike | None = None) -> dict:
    """``anchoropt eval``: rebuild a finished run's model and splits, reload its learner, evaluate again.

    Args:
        overrides: ``RunConfig`` fields to change (``targets``, ``protocol``, ``data``, ``eval_mode``,
            ``pretrained`` ...), e.g. new cross-dataset targets for a trained run.
        output: results file (``<run_dir>/eval_results.json`` by default).
    """
    from .io import load_prompt_learner, read_config

    run_dir = Path(run_dir)
    cfg = dataclasses.replace(load_run_config(run_dir), **(overrides or {})).resolve()
    ctx = dist_utils.init_from_env(cfg.device)
    seed_everything(cfg.seed)
    bundle = bundle or build_model(cfg.model, cfg.pretrained, ctx.device, cfg.precision, "none")
    source = _source_dataset(cfg)
    train_view, novel_view = _training_view(source, cfg)
    learner = load_prompt_learner(run_dir / "prompt_learner", bundle.model, train_view.classnames,
                                  tokenizer=bundle.tokenizer)
    trained = read_config(run_dir / "prompt_learner", "prompt_learner")["trained_classnames"]
    results = {"protocol": cfg.protocol, "dataset": source.name, "model": cfg.model, "pretrained": cfg.pretrained,
               "seed": cfg.seed, "shots": cfg.shots, "run": str(run_dir),
               "results": _evaluations(learner, bundle, cfg, ctx, train_view, novel_view, trained)}
    results["summary"] = summary_line(results)
    if ctx.is_main:
        target = Path(output) if output else run_dir / "eval_results.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(results["summary"], flush=True)
    dist_utils.cleanup(ctx)
    return results


def load_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """The :class:`RunConfig` a run directory was trained with (``run_config.json``)."""
    path = Path(run_dir) / RUN_CONFIG
    return RunConfig.from_json(
        read_json(path, f"{path} not found: is {run_dir} a run directory written by `anchoropt train`?")
    )


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    def absolute(path):
        return str(Path(path).expanduser().resolve()) if path else path

    model = absolute(cfg.model) if cfg.model.endswith(".json") else cfg.model
    pretrained = absolute(cfg.pretrained) if cfg.pretrained and Path(cfg.pretrained).is_file() else cfg.pretrained
    return dataclasses.replace(
        cfg, data=absolute(cfg.data), split_json=absolute(cfg.split_json), image_root=absolute(cfg.image_root),
        classnames_file=absolute(cfg.classnames_file), targets=[absolute(t) for t in cfg.targets],
        descriptions=absolute(cfg.descriptions), anchors=absolute(cfg.anchors), model=model, pretrained=pretrained,
    )


def _text_width(model: nn.Module) -> int:
    from .towers import TextTower

    return TextTower.from_model(model).width


def _plots(learner, bundle: ModelBundle, out: Path) -> dict | None:
    try:
        from . import viz

        return viz.save_run_plots(learner, bundle.model, out / "plots", tokenizer=bundle.tokenizer)
    except ImportError as err:
        print(f"plots skipped ({err}); install the extra: pip install 'anchoropt[viz]'", file=sys.stderr)
        return None


def _bar(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)
