"""AnchorLearner: Stage I of AnchorOPT.

Learns ``N`` anchor embeddings so that the anchor prompt ``[Anc] x N of {class}.`` of every class matches
the features of that class's descriptions (paper eq. 5): MSE between the L2-normalised anchor-prompt
feature and each L2-normalised description feature (per sentence, as the released code does; this is
the MSE to the per-class mean without re-normalising it, up to a constant).

Description features are computed once (frozen tower); each step runs one anchor-prompt pass over the
classes.  The loss does not depend on images, so Stage I is full-batch gradient descent.

Axes: ``C`` classes, ``S`` description sentences (all classes), ``N`` anchors, ``D`` width, ``E`` feature width.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .descriptions import load_descriptions
from .schedules import cosine_lr, dassl_lr
from .template import AnchorPromptTemplate, Tokenizer, pad_id
from .towers import TextTower

__all__ = ["AnchorLearner", "DescriptionTargets", "description_mse", "stage1_learning_rates", "STAGE1_SCHEDULES"]

STAGE1_SCHEDULES = ("cosine", "released")


def description_mse(anchor_features: torch.Tensor, targets: "DescriptionTargets") -> torch.Tensor:
    """Mean squared error over all ``S x E`` elements between each sentence feature and its class's
    anchor-prompt feature ``(C, E)`` (both L2-normalised)."""
    anchor = F.normalize(anchor_features.float(), dim=-1)
    return F.mse_loss(anchor[targets.class_index], targets.features)


class DescriptionTargets:
    """Frozen description features for one class set.

    Attributes:
        features: ``(S, E)`` float32, each row L2-normalised.
        class_index: ``(S,)`` class of each sentence.
    """

    def __init__(self, features: torch.Tensor, class_index: torch.Tensor):
        self.features, self.class_index = features, class_index

    @classmethod
    @torch.no_grad()
    def encode(
        cls,
        tower: TextTower,
        descriptions: Mapping[str, Sequence[str]],
        tokenizer: Tokenizer,
        batch_size: int = 256,
    ) -> "DescriptionTargets":
        """Encode every sentence once with the frozen tower (``descriptions`` ordered as the classes)."""
        sentences, owners = [], []
        for class_idx, texts in enumerate(descriptions.values()):
            sentences.extend(texts)
            owners.extend([class_idx] * len(texts))
        chunks, cut, pad = [], [], pad_id(tokenizer)
        for start in range(0, len(sentences), batch_size):
            ids = tokenizer(sentences[start : start + batch_size])
            cut += [start + i for i in (ids[:, -1] != pad).nonzero().flatten().tolist()]  # no padding left: cut
            chunks.append(F.normalize(tower.encode_text(ids).float(), dim=-1))
        if cut:
            names = list(descriptions)
            where = ", ".join(f"{names[owners[i]]!r}: {sentences[i][:40]!r}..." for i in cut[:3])
            warnings.warn(
                f"{len(cut)} description(s) fill the text tower's {ids.shape[1]} tokens and are cut there "
                f"(the rest of each sentence is not read), e.g. {where}",
                stacklevel=3,
            )
        device = chunks[0].device
        return cls(torch.cat(chunks), torch.tensor(owners, dtype=torch.long, device=device))

    def to(self, device: torch.device | str) -> "DescriptionTargets":
        return DescriptionTargets(self.features.to(device), self.class_index.to(device))


class AnchorLearner(nn.Module):
    """Stage I: ``N`` learnable anchor tokens shared by all classes.

    Args:
        tower: the frozen CLIP (or its :class:`TextTower`).
        classnames: the classes whose descriptions supervise the anchors (the base classes).
        n_anchor: ``N`` anchor tokens (1 in the paper).
        preposition: the word between anchors and class name ("of"); ``None`` for none.
        tokenizer: CLIP BPE by default.
        init_std: anchors start as ``N(0, init_std^2)`` (0.02, as the released code).
    """

    def __init__(
        self,
        tower: TextTower | nn.Module,
        classnames: Sequence[str],
        n_anchor: int = 1,
        preposition: str | None = "of",
        tokenizer: Tokenizer | None = None,
        init_std: float = 0.02,
    ):
        super().__init__()
        if not _finite(init_std) or init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {init_std!r} (a finite number)")
        self.template = AnchorPromptTemplate(tower, classnames, 0, n_anchor, preposition, tokenizer)
        self.tower = self.template.tower
        self.anchors = nn.Parameter(torch.randn(n_anchor, self.tower.width, device=self.tower.device) * init_std)

    @property
    def classnames(self) -> list[str]:
        return self.template.classnames

    def anchor_features(self) -> torch.Tensor:
        """L2-normalised anchor-prompt features ``(C, E)`` in float32 (differentiable w.r.t. the anchors)."""
        features = self.template.encode_slots(self.template.anchor, self.anchors)
        return F.normalize(features.float(), dim=-1)

    def targets(
        self,
        descriptions: str | os.PathLike | Mapping[str, Sequence[str]],
        max_per_class: int | None = 10,
        batch_size: int = 256,
        selection: str = "usable",
    ) -> DescriptionTargets:
        """Validated, encoded description features for this learner's classes (computed once per call).

        ``selection``: ``"usable"`` (default) drops entries without a letter before taking ``max_per_class``;
        ``"released"`` takes the first ``max_per_class`` raw entries, junk included, as the released code.
        """
        checked = load_descriptions(descriptions, self.classnames, max_per_class, selection=selection)
        return DescriptionTargets.encode(self.tower, checked, self.template.tokenizer, batch_size)

    def loss(self, targets: DescriptionTargets, mse_weight: float = 1000.0) -> torch.Tensor:
        """``mse_weight * MSE(anchor features, description features)``."""
        return mse_weight * description_mse(self.anchor_features(), targets)

    def fit(
        self,
        descriptions: str | os.PathLike | Mapping[str, Sequence[str]] | DescriptionTargets,
        steps: int = 500,
        lr: float = 0.002,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        mse_weight: float = 1000.0,
        max_per_class: int | None = 10,
        progress: bool = True,
        callback: Callable[[int, float], None] | None = None,
        schedule: str = "cosine",
        steps_per_epoch: int | None = None,
        warmup_lr: float = 1e-5,
        selection: str = "usable",
    ) -> list[float]:
        """Train the anchors with SGD (the released code's lr, momentum and weight decay).

        Args:
            descriptions: JSON path, mapping, or precomputed :class:`DescriptionTargets`.
            steps: optimisation steps (each one full-batch over all classes).
            mse_weight: loss scale (the released tables use 100-1000; MSE of unit vectors is tiny).
            max_per_class: sentences kept per class, first in file order (10 in the released code).
            progress: report the loss (a tqdm bar on a terminal, a plain line every 10 % elsewhere).
            callback: called as ``callback(step, loss)`` after every step.
            schedule: ``"cosine"`` (default: cosine decay over the steps, stepped every step) or
                ``"released"`` (Dassl's Stage I schedule, released behaviour: the first epoch at a constant
                ``warmup_lr``, then a cosine over the epochs stepped once per epoch; an epoch is
                ``steps_per_epoch`` identical full-batch steps, so ``steps`` should be a multiple of it).
            steps_per_epoch: steps in one epoch for ``schedule="released"`` (``floor(shots * C / 32)``).
            selection: which descriptions are kept (:meth:`targets`), when ``descriptions`` is not encoded yet.

        Returns:
            The loss of every step.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be >= 1 (an integer), got {steps!r}")
        for name, value, low in (("lr", lr, 0.0), ("mse_weight", mse_weight, 0.0)):
            if not _finite(value) or value <= low:
                raise ValueError(f"Stage I {name} must be > 0, got {value!r} (a finite number)")
        for name, value in (("momentum", momentum), ("weight_decay", weight_decay)):
            if not _finite(value) or value < 0:
                raise ValueError(f"Stage I {name} must be >= 0, got {value!r} (a finite number)")
        rates = stage1_learning_rates(steps, lr, schedule, steps_per_epoch, warmup_lr)
        targets = descriptions if isinstance(descriptions, DescriptionTargets) else self.targets(
            descriptions, max_per_class, selection=selection
        )
        optimizer = torch.optim.SGD([self.anchors], lr=lr, momentum=momentum, weight_decay=weight_decay)
        history: list[float] = []
        bar = _progress_bar(steps, "Stage I anchors") if progress else None
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = rates[step]
            loss = self.loss(targets, mse_weight)
            if not math.isfinite(loss.item()):
                fp16 = self.tower.dtype == torch.float16
                raise FloatingPointError(
                    f"Stage I loss is {loss.item()} at step {step} (largest anchor norm "
                    f"{float(self.anchors.detach().norm(dim=-1).max()):.3g}); "
                    + ("the float16 text tower overflowed: run it in float32 or bfloat16 (--precision fp32), "
                       "or lower lr / mse_weight" if fp16 else "lower lr or mse_weight")
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(loss.item())
            if bar is not None:
                bar.update(loss=f"{history[-1]:.4f}")
            if callback is not None:
                callback(step, history[-1])
        if bar is not None:
            bar.close()
        return history

    def frozen_anchors(self) -> torch.Tensor:
        """A detached float32 copy ``(N, D)`` of the anchors, for Stage II."""
        return self.anchors.detach().float().clone()


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def stage1_learning_rates(
    steps: int, lr: float, schedule: str = "cosine", steps_per_epoch: int | None = None, warmup_lr: float = 1e-5
) -> list[float]:
    """The learning rate of every Stage I step.

    ``"cosine"``: cosine decay over the steps, stepped every step.  ``"released"`` (Dassl's, released
    behaviour): ``epochs = ceil(steps / steps_per_epoch)``; the first epoch at ``warmup_lr``, then a cosine
    over the epochs stepped once per epoch (:func:`~anchoropt.schedules.dassl_lr`).
    """
    if schedule not in STAGE1_SCHEDULES:
        raise ValueError(f"unknown Stage I schedule {schedule!r}; choose one of {STAGE1_SCHEDULES}")
    if schedule == "cosine":
        return [cosine_lr(step, lr, steps) for step in range(steps)]
    if not steps_per_epoch or steps_per_epoch < 1:
        raise ValueError("the released Stage I schedule needs steps_per_epoch >= 1 (floor(shots * classes / 32))")
    epochs = math.ceil(steps / steps_per_epoch)
    return [dassl_lr(step // steps_per_epoch, lr, epochs, 1, warmup_lr) for step in range(steps)]


def _progress_bar(total: int, description: str):
    from ._progress import Progress

    return Progress(total, description)
