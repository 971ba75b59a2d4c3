"""Learning-rate schedules shared by Stage I and Stage II.

Dassl's (the CoOp family's) schedule: ``warmup_epochs`` epochs at a constant ``warmup_lr``, then a cosine
over ``epochs`` epochs stepped once per epoch (epoch ``warmup_epochs`` runs at the full ``lr``).
"""

from __future__ import annotations

import math

__all__ = ["dassl_lr", "cosine_lr"]


def dassl_lr(epoch: int, lr: float, epochs: int, warmup_epochs: int = 1, warmup_lr: float = 1e-5) -> float:
    """Learning rate of (0-based) ``epoch`` under Dassl's constant warm-up + per-epoch cosine."""
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


def cosine_lr(step: int, lr: float, steps: int) -> float:
    """Cosine decay stepped every step (``CosineAnnealingLR(T_max=steps)``): ``lr`` at step 0."""
    return 0.5 * lr * (1 + math.cos(math.pi * step / steps))
