"""The two training stages of a run: Stage I (anchors from descriptions) and Stage II (few-shot SGD).

Axes: ``N`` records (images), ``V`` cached views per image, ``E`` joint-embedding width.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..datasets import folders as D
from . import distributed as dist_utils
from ..losses import StageIILoss
from ..methods.pae import KoopmanLyapunov, optimizer_groups, prompt_chain
from ..methods.registry import FEATURE_INPUTS
from ..schedules import dassl_lr
from .config import RunConfig
from .console import _bar
from .models import ModelBundle, encode_images, encode_images_raw
from .stage1_cache import Stage1Cache


PAE_MAX_GRAD_NORM = 10.0  # PAE's trainer clips the Koopman parameters' gradients at this norm


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (when installed) and torch's generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy

        numpy.random.seed(seed % 2**32)


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


def learn_anchors(
    bundle: ModelBundle,
    classnames: Sequence[str],
    descriptions: str | os.PathLike | dict,
    cfg: RunConfig,
    ctx: dist_utils.DistContext | None = None,
    cache: Stage1Cache | None = None,
) -> tuple[torch.Tensor, dict]:
    """Stage I on ``classnames``: anchors ``(N, D)`` and a summary (steps, first / last loss, seconds).

    Under ``torchrun`` rank 0 learns them and broadcasts (the loss does not depend on the images).  With a
    ``cache`` (a grid's), anchors another run learned from the same start and inputs are read instead of learned
    again (exact: :mod:`.stage1_cache`); the summary's ``"cache"`` says ``"reused"`` or ``"stored"``.
    """
    from ..anchors import AnchorLearner

    ctx = ctx or dist_utils.DistContext()
    start = time.perf_counter()
    steps = cfg.stage1_step_count(len(classnames))
    learner = AnchorLearner(bundle.model, list(classnames), n_anchor=cfg.n_anchor, preposition=cfg.preposition,
                            tokenizer=bundle.tokenizer)
    info = {"steps": steps, "mse_weight": cfg.stage1_mse_weight, "lr": cfg.stage1_lr,
            "loss_first": None, "loss_last": None, "classes": len(classnames)}
    if ctx.is_main:
        options = dict(steps=steps, lr=cfg.stage1_lr, mse_weight=cfg.stage1_mse_weight, schedule=cfg.stage1_schedule,
                       steps_per_epoch=stage1_steps_per_epoch(cfg, len(classnames)), warmup_lr=cfg.warmup_lr)
        targets = learner.targets(descriptions, cfg.max_descriptions, selection=cfg.description_selection)
        key = cache.key(learner, targets, options) if cache is not None else None
        found = cache.load(key) if key is not None else None
        if found is not None:
            with torch.no_grad():
                learner.anchors.copy_(found.anchors)
            info.update(loss_first=found.loss_first, loss_last=found.loss_last, cache="reused")
        else:
            history = learner.fit(targets, progress=cfg.progress, **options)
            info.update(loss_first=history[0], loss_last=history[-1])
            if key is not None:
                cache.store(key, learner.frozen_anchors(), history[0], history[-1])
                info["cache"] = "stored"
    anchors = dist_utils.broadcast_tensor(learner.frozen_anchors().to(ctx.device), ctx)
    info["seconds"] = round(time.perf_counter() - start, 3)
    return anchors.cpu(), info


def stage1_steps_per_epoch(cfg: RunConfig, n_classes: int) -> int:
    """Steps in one released Stage I epoch: ``floor(shots * classes / batch)`` (at least 1)."""
    from ..methods.presets import preset as get_preset

    batch = (get_preset(cfg.preset) if cfg.preset else get_preset("default")).stage1_batch_size
    return max(1, math.floor(cfg.shots * n_classes / batch))


def epoch_lr(epoch: int, cfg: RunConfig) -> float:
    """Dassl's schedule: ``warmup_epochs`` at a constant ``warmup_lr``, then cosine over ``epochs`` epochs."""
    return dassl_lr(epoch, cfg.lr, cfg.epochs, cfg.warmup_epochs, cfg.warmup_lr)


def train_stage2(
    learner: nn.Module,
    bundle: ModelBundle,
    records: Sequence[D.Record],
    cfg: RunConfig,
    ctx: dist_utils.DistContext | None = None,
    timer: StepTimer | None = None,
    on_epoch_end: Callable[[int, float], None] | None = None,
    on_checkpoint: Callable[[dict, dict[str, torch.Tensor]], None] | None = None,
    resume: tuple[dict, dict[str, torch.Tensor]] | None = None,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    image_input: str = "features",
    features=None,
    on_metrics: Callable[[dict], None] | None = None,
) -> dict:
    """Stage II: SGD on the learner's trainable tensors over ``records`` for ``cfg.epochs`` epochs.

    ``loss_fn(outputs, labels)`` scores ``learner(inputs)`` (default: AnchorOPT's Stage II loss from ``cfg``
    on ``(logits_normal, logits_anchor)``); ``image_input="images"`` feeds the images themselves (a learner
    with visual prompts), ``"raw_features"`` frozen image features as the image tower gives them (DePT),
    ``"features"`` L2-normalised ones.  ``features``: a shared
    :class:`~anchoropt.runner.features.FeatureStore` (of the same kind of features) used for
    ``cfg.cache_image_features`` with ``augment="none"``.

    Optimiser: SGD over the learner's ``optimizer_groups(cfg.lr)`` when it has them (DePT: its head at
    ``head_lr_scale`` times the rate), else one group at ``cfg.lr``; every group decays by ``cfg.weight_decay``
    and follows Dassl's schedule from its own base rate (the constant warm-up rate is the same for every group,
    as Dassl's ``ConstantWarmupScheduler``; the cosine scales each group's rate).  The summary's
    ``param_groups`` lists each group's base rate, weight decay and size.

    With ``cfg.pae`` (deep variant) PAE's Koopman-Lyapunov terms on the per-layer soft prompts join the loss;
    ``U, K, L`` train in their own optimiser group (no weight decay unless ``cfg.pae_decay``) with their own
    gradient clipping (norm 10), and the summary gets a ``pae`` entry (terms per epoch, spectral radius of ``K``).

    With ``cfg.cache_image_features`` the frozen image tower runs before the first epoch instead of once per
    step: once per training image (``augment="none"``), or ``cfg.cache_views`` times per image with the
    training augmentation, each step then using one of an image's views at random (Tip-Adapter practice).  Returns a summary (losses per epoch, steps,
    seconds, cache build time).

    ``on_checkpoint(state, tensors)`` is called after every epoch with what :func:`train_stage2` needs to
    continue from there (epochs done, losses, optimizer buffers, RNG states); ``resume`` = such a pair
    continues an interrupted training (the learner must hold the checkpoint's tensors already).  One process
    resumes bit-exactly; under ``torchrun`` every rank continues from rank 0's random state.

    ``on_metrics(row)`` gets each epoch's metrics before its checkpoint is written (:func:`epoch_metrics`:
    epoch, loss, ce, PAE's terms, learning rates, seconds; :mod:`anchoropt.runner.metrics` writes them).
    """
    ctx = ctx or dist_utils.DistContext()
    timer = timer or _no_timer
    device = ctx.device
    summary: dict[str, Any] = {"images": len(records)}
    if resume is not None:  # the random state Stage II started from (the cached views are drawn from it)
        _set_rng(resume[1], "stage2_start", device)
    stage2_start = _rng_tensors(device, "stage2_start")
    encode = encode_images if image_input == "features" else encode_images_raw  # looked up here: tests patch them
    data = _training_data(bundle, records, cfg, ctx, image_input, features, encode, summary)
    regularizer = _pae_regularizer(learner, cfg, device) if cfg.pae else None
    groups = stage2_param_groups(learner, cfg, regularizer)
    params = [p for group in groups if group.get("name") != "pae" for p in group["params"]]
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    summary["param_groups"] = [{"name": g["name"], "lr": g["base_lr"], "weight_decay": g["weight_decay"],
                                "params": sum(p.numel() for p in g["params"])} for g in groups]
    loss_fn = loss_fn or _anchoropt_loss(cfg)
    module = dist_utils.wrap_ddp(learner, ctx)
    module.train()
    if ctx.distributed:  # replicas start equal (DDP broadcasts rank 0's); each then draws its own Gumbel noise
        torch.manual_seed(cfg.seed * 1000 + ctx.rank)
    progress = _Progress(params + (list(regularizer.parameters()) if regularizer is not None else []))
    if resume is not None:
        progress.restore(resume, optimizer, regularizer, data, device)
        summary["resumed_at_epoch"] = progress.first_epoch
    bar = _bar((cfg.epochs - progress.first_epoch) * len(data.loader), "Stage II", cfg.progress and ctx.is_main)
    start = time.perf_counter()
    for epoch in range(progress.first_epoch, cfg.epochs):
        for group in optimizer.param_groups:
            group["lr"] = dassl_lr(epoch, group["base_lr"], cfg.epochs, cfg.warmup_epochs, cfg.warmup_lr)
        if data.sampler is not None:
            data.sampler.set_epoch(epoch)
        total, seen, pae_sums, ce_sum = 0.0, 0, [0.0, 0.0], 0.0
        epoch_start = fetch_start = time.perf_counter()
        for batch, labels, _ in data.loader:
            if timer is not _no_timer:
                timer.add("data", time.perf_counter() - fetch_start)
            labels = labels.to(device)
            inputs = data.inputs(batch, image_input, bundle, encode, device, timer)
            with timer("text_encoding"):
                outputs = module(inputs)
            with timer("loss_backward"):
                loss = loss_fn(outputs, labels)
                if regularizer is not None:  # parameters only: identical on every process, no all-reduce needed
                    terms = regularizer(prompt_chain(learner))
                    loss = loss + terms.total
                    pae_sums[0] += terms.koopman.item() * len(labels)
                    pae_sums[1] += terms.lyapunov.item() * len(labels)
                _check_finite_loss(loss, epoch, cfg)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if regularizer is not None:
                    _clip_pae_gradients(regularizer, epoch)
                optimizer.step()
            total, seen = total + loss.item() * len(labels), seen + len(labels)
            if on_metrics is not None:
                ce_sum = _add_ce(ce_sum, outputs, labels)
            if bar is not None:
                bar.update(epoch=epoch + 1, loss=f"{loss.item():.4f}")
            fetch_start = time.perf_counter()
        progress.end_epoch(total, seen, pae_sums if regularizer is not None else None)
        if on_metrics is not None:
            on_metrics(epoch_metrics(epoch, progress, optimizer, ce_sum, seen, time.perf_counter() - epoch_start))
        if on_checkpoint is not None:
            on_checkpoint(*progress.checkpoint(epoch, stage2_start, optimizer, regularizer, data, device))
        if on_epoch_end is not None:
            on_epoch_end(epoch, progress.losses[-1])
    if bar is not None:
        bar.close()
    summary.update(epochs=cfg.epochs, steps_per_epoch=len(data.loader),
                   epoch_losses=[round(x, 6) for x in progress.losses], seconds=round(time.perf_counter() - start, 3))
    if regularizer is not None:
        summary["pae"] = {**regularizer.config(), "decay": cfg.pae_decay,
                          "epoch_koopman": progress.pae_history["koopman"],
                          "epoch_lyapunov": progress.pae_history["lyapunov"],
                          "spectral_radius": round(regularizer.spectral_radius(), 6)}
    return summary


def _add_ce(ce_sum: float | torch.Tensor | None, outputs, labels: torch.Tensor) -> torch.Tensor | None:
    """``ce_sum`` plus the batch's summed cross-entropy of the learner's first ``(B, C)`` logits (no gradient;
    a float64 tensor on the logits' device, read once per epoch by :func:`epoch_metrics`, not once per step);
    ``None`` once a batch's output has no such logits."""
    logits = outputs[0] if isinstance(outputs, (tuple, list)) and outputs else outputs
    if ce_sum is None or not isinstance(logits, torch.Tensor) or logits.dim() != 2 or len(logits) != len(labels):
        return None
    with torch.no_grad():
        return ce_sum + nn.functional.cross_entropy(logits.detach().float(), labels, reduction="sum").double()


def epoch_metrics(epoch: int, progress: "_Progress", optimizer: torch.optim.Optimizer,
                  ce_sum: float | torch.Tensor | None, seen: int, seconds: float) -> dict:
    """One epoch's row of ``metrics.jsonl``: epochs done, mean loss (and CE, PAE's terms) per image, the
    learning rate of each parameter group during the epoch, wall seconds."""
    row: dict[str, Any] = {"epoch": epoch + 1, "loss": progress.losses[-1]}
    if ce_sum is not None and seen:
        row["ce"] = float(ce_sum) / seen
    if progress.pae_history["koopman"]:
        row.update(pae_koopman=progress.pae_history["koopman"][-1], pae_lyapunov=progress.pae_history["lyapunov"][-1])
    for i, group in enumerate(optimizer.param_groups):
        row["lr" if i == 0 else f"lr_{group.get('name', i)}"] = group["lr"]
    row["seconds"] = round(seconds, 3)
    return row


class _TrainingData:
    """What Stage II iterates: the loader (and its distributed sampler) over images or image indices, and the
    cached image features ``(V, N, E)`` with the generator that picks one view per image and step."""

    def __init__(self, loader, sampler, cached: torch.Tensor | None, view_generator: torch.Generator | None):
        self.loader, self.sampler, self.cached, self.view_generator = loader, sampler, cached, view_generator

    def inputs(self, batch: torch.Tensor, image_input: str, bundle: ModelBundle, encode: Callable,
               device: torch.device, timer) -> torch.Tensor:
        """The learner's input for one batch: images, features from the image tower, or cached features."""
        if image_input == "images":
            return batch.to(device)
        if self.cached is None:
            with timer("image_encoding"):
                return encode(bundle.model, batch.to(device))
        # the batch holds image indices into the (V, N, E) table: one of each image's cached views
        views = torch.randint(self.cached.shape[0], (len(batch),), generator=self.view_generator)
        return self.cached[views.to(self.cached.device), batch.to(self.cached.device)].to(device)


def _training_data(bundle: ModelBundle, records: Sequence[D.Record], cfg: RunConfig, ctx: dist_utils.DistContext,
                   image_input: str, features, encode: Callable, summary: dict) -> _TrainingData:
    """Stage II's loader; with ``cfg.cache_image_features`` the frozen image tower runs here, before the first
    epoch (its time goes to ``summary["cache_seconds"]``)."""
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    device = ctx.device
    cached, view_generator = None, None
    if cfg.cache_image_features and image_input in FEATURE_INPUTS:
        start = time.perf_counter()
        if cfg.augment == "none" and features is not None:
            cached = features.table(records).to(device)[None]
        elif cfg.augment == "none":
            cached = _feature_table(bundle, records, bundle.test_transform, cfg, device, encode)[None]
        else:
            cached = torch.stack([_feature_table(bundle, records, bundle.train_transform, cfg, device, encode)
                                  for _ in range(cfg.cache_views)])
        summary["cache_seconds"] = round(time.perf_counter() - start, 3)
        view_generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        dataset = TensorDataset(torch.arange(len(records)), torch.tensor([r.label for r in records]),
                                torch.arange(len(records)))
    else:
        dataset = D.ImageDataset(records, bundle.train_transform)
    sampler = DistributedSampler(dataset, shuffle=True, seed=cfg.seed, drop_last=False) if ctx.distributed else None
    # --drop-last: Dassl's training loader, drop_last=is_train and len(data_source) >= batch_size
    drop_last = bool(cfg.drop_last) and len(sampler if sampler is not None else dataset) >= cfg.batch_size
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=0 if cached is not None else cfg.workers, drop_last=drop_last,
                        generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=False)
    return _TrainingData(loader, sampler, cached, view_generator)


class _Progress:
    """Stage II's progress: epochs done, losses per epoch, PAE's terms per epoch; what a checkpoint holds of
    it and of the optimizer and random states, and how a resumed run takes it back."""

    def __init__(self, trained: list[torch.Tensor]):
        self.trained = trained  # the optimised tensors, in the order their optimizer buffers are saved
        self.first_epoch = 0
        self.losses: list[float] = []
        self.pae_history: dict[str, list[float]] = {"koopman": [], "lyapunov": []}

    def end_epoch(self, total: float, seen: int, pae_sums: list[float] | None) -> None:
        self.losses.append(total / max(seen, 1))
        if pae_sums is not None:
            self.pae_history["koopman"].append(round(pae_sums[0] / max(seen, 1), 6))
            self.pae_history["lyapunov"].append(round(pae_sums[1] / max(seen, 1), 6))

    def checkpoint(self, epoch: int, stage2_start: dict, optimizer: torch.optim.Optimizer,
                   regularizer: KoopmanLyapunov | None, data: _TrainingData,
                   device: torch.device) -> tuple[dict, dict[str, torch.Tensor]]:
        """``(state, tensors)`` after ``epoch``: what :func:`train_stage2` needs to continue from there."""
        tensors = {**stage2_start, **_rng_tensors(device, "now"), **_optimizer_tensors(optimizer, self.trained),
                   "rng.loader": data.loader.generator.get_state()}
        if data.cached is not None:
            tensors["rng.views"] = data.view_generator.get_state()
        state = {"epochs_done": epoch + 1, "epoch_losses": self.losses}
        if regularizer is not None:
            tensors.update({f"pae.{k}": v for k, v in regularizer.state_dict().items()})
            state["pae_history"] = self.pae_history
        return state, tensors

    def restore(self, resume: tuple[dict, dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
                regularizer: KoopmanLyapunov | None, data: _TrainingData, device: torch.device) -> None:
        """Take back a checkpoint's ``(state, tensors)``: epochs, losses, PAE, optimizer buffers, RNG states."""
        state, tensors = resume
        self.first_epoch, self.losses = int(state["epochs_done"]), list(state["epoch_losses"])
        if regularizer is not None:
            regularizer.load_state_dict({k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("pae.")})
            self.pae_history = state["pae_history"]
        _load_optimizer(optimizer, self.trained, tensors)
        data.loader.generator.set_state(tensors["rng.loader"])
        if data.cached is not None:
            data.view_generator.set_state(tensors["rng.views"])
        _set_rng(tensors, "now", device)


def _anchoropt_loss(cfg: RunConfig) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """AnchorOPT's Stage II loss from ``cfg``, on the learner's ``(logits_normal, logits_anchor)``."""
    stage2 = StageIILoss(ce_weight=cfg.ce_weight, kd_weight=cfg.kd_weight, temperature=cfg.kd_temperature,
                         kd_normalization=cfg.kd_normalization)

    def loss_fn(outputs, target):
        return stage2(outputs[0], outputs[1], target)

    return loss_fn


def _check_finite_loss(loss: torch.Tensor, epoch: int, cfg: RunConfig) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"Stage II loss is {loss.item()} at epoch {epoch} (lr {epoch_lr(epoch, cfg):g}, ce_weight "
            f"{cfg.ce_weight:g}, kd_weight {cfg.kd_weight:g}): lower the lr or the loss weights"
        )


def _clip_pae_gradients(regularizer: KoopmanLyapunov, epoch: int) -> None:
    """PAE's own gradient clipping (norm 10, as PAE's trainer); refuses gradients that are not finite."""
    pae_norm = regularizer.clip_grad_(PAE_MAX_GRAD_NORM)
    if not torch.isfinite(pae_norm):
        raise FloatingPointError(
            f"PAE's gradients are not finite at epoch {epoch}: lower --lr, --pae-alpha or --pae-beta, "
            "or use --pae-reading released (bounded terms)"
        )


def stage2_param_groups(learner: nn.Module, cfg: RunConfig, regularizer: KoopmanLyapunov | None = None) -> list[dict]:
    """SGD parameter groups: the learner's own ``optimizer_groups(cfg.lr)`` (DePT's head at a larger rate) or
    one group of its trainable parameters at ``cfg.lr``, each with ``cfg.weight_decay``, then PAE's ``U, K, L``
    (:func:`anchoropt.methods.pae.optimizer_groups`: no weight decay unless ``cfg.pae_decay``) at ``cfg.lr``.

    Every group carries ``name`` and ``base_lr`` (the rate the schedule starts from); empty groups are dropped.
    """
    own = getattr(learner, "optimizer_groups", None)
    if callable(own):
        groups = own(cfg.lr)
    else:
        groups = [{"params": list(learner.parameters()), "lr": cfg.lr}]
    out = []
    for i, group in enumerate(groups):
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            lr = float(group.get("lr", cfg.lr))
            out.append({**group, "params": params, "name": group.get("name") or ("prompt" if i == 0 else f"group{i}"),
                        "lr": lr, "base_lr": lr, "weight_decay": group.get("weight_decay", cfg.weight_decay)})
    if regularizer is not None:
        pae = optimizer_groups((), regularizer, cfg.weight_decay, cfg.pae_decay)[-1]
        out.append({**pae, "lr": cfg.lr, "base_lr": cfg.lr})
    return out


def _pae_regularizer(learner: nn.Module, cfg: RunConfig, device) -> KoopmanLyapunov:
    """PAE's ``U, K, L`` for the deep learner's chain of per-layer soft prompts (``deep_depth`` layers)."""
    chain = prompt_chain(learner)
    with torch.random.fork_rng(devices=[]):  # its own stream: a run with --pae draws the same Gumbel noise as without
        torch.manual_seed(cfg.seed)
        regularizer = KoopmanLyapunov(chain[0].shape[-1], dim=cfg.pae_dim, mode=cfg.pae_mode, alpha=cfg.pae_alpha,
                                      beta=cfg.pae_beta, n_layers=len(chain), reading=cfg.pae_reading,
                                      energy=cfg.pae_energy)
    return regularizer.to(device)


def _rng_tensors(device: torch.device, tag: str) -> dict[str, torch.Tensor]:
    """The global torch generators' states (CPU, and the CUDA device's) as tensors named ``rng.<tag>.*``."""
    out = {f"rng.{tag}.cpu": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        out[f"rng.{tag}.cuda"] = torch.cuda.get_rng_state(device)
    return out


def _set_rng(tensors: dict[str, torch.Tensor], tag: str, device: torch.device) -> None:
    torch.set_rng_state(tensors[f"rng.{tag}.cpu"])
    if torch.device(device).type == "cuda" and f"rng.{tag}.cuda" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.{tag}.cuda"], device)


def _optimizer_tensors(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """SGD's per-parameter buffers, named by the parameter's position (``optim.<i>.<buffer>``)."""
    return {f"optim.{i}.{key}": value for i, p in enumerate(params)
            for key, value in optimizer.state.get(p, {}).items() if isinstance(value, torch.Tensor)}


def _load_optimizer(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                    tensors: dict[str, torch.Tensor]) -> None:
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            param = params[int(index)]
            optimizer.state[param][key] = value.to(param.device)


@torch.no_grad()
def _feature_table(bundle: ModelBundle, records: Sequence[D.Record], transform, cfg: RunConfig,
                   device: torch.device, encode: Callable) -> torch.Tensor:
    """Image features ``(len(records), E)`` in record order (``encode``: normalised or raw)."""
    from torch.utils.data import DataLoader

    # its own generator: creating the iterator must not draw from the global RNG (the Gumbel samples' source)
    loader = DataLoader(D.ImageDataset(records, transform), batch_size=cfg.eval_batch_size, num_workers=cfg.workers,
                        generator=torch.Generator())
    return torch.cat([encode(bundle.model, images.to(device)) for images, _, _ in loader])
