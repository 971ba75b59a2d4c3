"""Stage II loss as a configured module (the functional twin is :func:`anchoropt.functional.anchoropt_loss`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import functional

__all__ = ["StageIILoss", "StageIILossConfig"]


@dataclass
class StageIILossConfig:
    """``ce_weight * CE + kd_weight * T^2 * KL(ensemble || normal)``.

    The paper uses a CE:KD ratio of about 1:10 with per-sample KD (``"batchmean"``).  The authors' per-dataset
    tables (e.g. CE 100, KD 1000) use ``kd_normalization="released"`` (KL summed / (B*C)).
    """

    ce_weight: float = 1.0
    kd_weight: float = 10.0
    temperature: float = 1.0
    kd_normalization: str = "batchmean"

    def __post_init__(self) -> None:
        for name in ("ce_weight", "kd_weight"):
            value = getattr(self, name)
            if not _finite_number(value) or value < 0:
                raise ValueError(f"loss weights must be >= 0, got {name}={value!r} (a finite number)")
        if not _finite_number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"the distillation temperature must be > 0, got {self.temperature!r} (a finite number)")
        if self.kd_normalization not in functional.KD_NORMALIZATIONS:
            raise ValueError(
                f"unknown kd_normalization {self.kd_normalization!r}; choose one of {functional.KD_NORMALIZATIONS}"
            )


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class StageIILoss(nn.Module):
    """AnchorOPT's Stage II objective; call as ``loss(logits_normal, logits_anchor, target)``."""

    def __init__(self, config: StageIILossConfig | None = None, **overrides):
        super().__init__()
        self.config = StageIILossConfig(**{**asdict(config or StageIILossConfig()), **overrides})

    def forward(self, logits_normal: torch.Tensor, logits_anchor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.anchoropt_loss(logits_normal, logits_anchor, target, **asdict(self.config))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in asdict(self.config).items())
