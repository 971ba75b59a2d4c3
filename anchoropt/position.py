"""PositionMatrix: AnchorOPT's learnable arrangement of soft and anchor tokens.

Row ``i`` of the ``(K, K)`` matrix (``K = M + N``) picks the source token that goes to output slot ``i``;
sources are ordered ``[soft_1 .. soft_M, anchor_1 .. anchor_N]`` (paper eq. 8).  A row is one-hot, so a
token may repeat or vanish (paper Fig. 4).

* training: straight-through Gumbel-softmax - hard one-hot rows forward, soft gradients back;
* evaluation: deterministic row-wise argmax of the logits (sampling only with ``sample_in_eval=True``);
* fixed arrangements (anchor before / middle / after the soft tokens, paper Table 8) are the same class
  with frozen one-hot logits.

Axes: ``K`` slots, ``D`` width, ``...`` any leading batch axes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import einsum
from torch import nn

from . import functional

__all__ = ["PositionMatrix", "ARRANGEMENTS", "sample_positions_in_eval"]

ARRANGEMENTS = ("learned", "anchor_before", "anchor_middle", "anchor_after")


class PositionMatrix(nn.Module):
    """Learnable ``(K, K)`` token arrangement, ``K = n_soft + n_anchor``.

    Args:
        n_soft: ``M`` soft tokens (sources ``0 .. M-1``).
        n_anchor: ``N`` anchor tokens (sources ``M .. M+N-1``).
        tau: Gumbel-softmax temperature (training only).
        init: ``"randn"`` (standard normal logits, as the released code), ``"identity"`` (a bias toward
            keeping the input order: ``init_scale`` on the diagonal) or ``"zeros"``.
        arrangement: ``"learned"``, or a fixed arrangement from :data:`ARRANGEMENTS` (not trainable).
        sample_in_eval: draw Gumbel samples in ``eval()`` too (the released code's stochastic test).
    """

    def __init__(
        self,
        n_soft: int,
        n_anchor: int = 1,
        tau: float = 1.0,
        init: str = "randn",
        init_scale: float = 1.0,
        arrangement: str = "learned",
        sample_in_eval: bool = False,
    ):
        super().__init__()
        if n_soft < 0 or n_anchor < 0 or n_soft + n_anchor < 1:
            raise ValueError(f"need at least one token to arrange, got n_soft={n_soft}, n_anchor={n_anchor}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
            raise ValueError(f"the Gumbel temperature tau must be > 0, got {tau!r} (a finite number)")
        if arrangement not in ARRANGEMENTS:
            raise ValueError(f"unknown arrangement {arrangement!r}; choose one of {ARRANGEMENTS}")
        self.n_soft, self.n_anchor, self.tau = n_soft, n_anchor, float(tau)
        self.arrangement, self.sample_in_eval = arrangement, sample_in_eval
        size = n_soft + n_anchor
        if arrangement == "learned":
            logits = _initial_logits(size, init, init_scale)
        else:
            order = fixed_order(arrangement, n_soft, n_anchor)
            logits = torch.full((size, size), -1e4).scatter_(1, torch.tensor(order)[:, None], 0.0)
        self.logits = nn.Parameter(logits, requires_grad=arrangement == "learned")

    @property
    def size(self) -> int:
        """``K = M + N``."""
        return self.n_soft + self.n_anchor

    @property
    def is_fixed(self) -> bool:
        return self.arrangement != "learned"

    def matrix(self) -> torch.Tensor:
        """The ``(K, K)`` one-hot assignment used by the next forward (sampled in training)."""
        if self.is_fixed or not (self.training or self.sample_in_eval):
            return self.deterministic_matrix()
        return F.gumbel_softmax(self.logits.float(), tau=self.tau, hard=True, dim=-1)

    def deterministic_matrix(self) -> torch.Tensor:
        """The ``(K, K)`` evaluation assignment (row-wise argmax of the logits), in any mode."""
        return functional.hard_argmax(self.logits.float())

    def forward(self, tokens: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """Rearrange ``tokens`` ``(..., K, D)`` -> ``(..., K, D)``; pass ``matrix`` to reuse one sample."""
        if tokens.dim() < 2 or tokens.shape[-2] != self.size:
            raise ValueError(f"expected tokens of shape (..., {self.size}, D), got {tuple(tokens.shape)}")
        matrix = self.matrix() if matrix is None else matrix
        return einsum(matrix.to(tokens.dtype), tokens, "slot source, ... source d -> ... slot d")

    @torch.no_grad()
    def assignment(self) -> torch.Tensor:
        """Source index ``(K,)`` placed at each slot by the deterministic (evaluation) matrix."""
        return self.logits.float().argmax(dim=-1)

    @torch.no_grad()
    def probabilities(self) -> torch.Tensor:
        """Row-wise softmax ``(K, K)`` of the logits (for plots)."""
        return self.logits.float().softmax(dim=-1)

    def describe(self) -> list[str]:
        """Human-readable slot -> source names, e.g. ``['soft2', 'anchor1', 'soft1', ...]``."""
        return [self.source_name(int(j)) for j in self.assignment()]

    def anchors_placed(self) -> int:
        """How many of the ``N`` anchor tokens the deterministic (evaluation) arrangement places in some slot;
        0 means the evaluation prompt holds soft tokens only (the anchors shaped training, not the test prompt)."""
        return len({int(j) for j in self.assignment() if int(j) >= self.n_soft})

    def source_name(self, j: int) -> str:
        return f"soft{j + 1}" if j < self.n_soft else f"anchor{j - self.n_soft + 1}"

    def extra_repr(self) -> str:
        return f"n_soft={self.n_soft}, n_anchor={self.n_anchor}, tau={self.tau}, arrangement={self.arrangement!r}"


def sample_positions_in_eval(module: nn.Module, on: bool = True) -> int:
    """Make every :class:`PositionMatrix` inside ``module`` draw a Gumbel-max sample at each forward in
    ``eval()`` too (``on=True``: the released code's stochastic test) or take the row-wise argmax (``False``).
    Returns how many learned (not fixed) matrices it found: 0 means sampling changes nothing."""
    matrices = [m for m in module.modules() if isinstance(m, PositionMatrix)]
    for matrix in matrices:
        matrix.sample_in_eval = on
    return sum(not m.is_fixed for m in matrices)


def fixed_order(arrangement: str, n_soft: int, n_anchor: int) -> list[int]:
    """Source index per slot for a fixed arrangement (paper Table 8)."""
    soft = list(range(n_soft))
    anchors = list(range(n_soft, n_soft + n_anchor))
    if arrangement == "anchor_before":
        return anchors + soft
    if arrangement == "anchor_middle":
        half = n_soft // 2
        return soft[:half] + anchors + soft[half:]
    if arrangement == "anchor_after":
        return soft + anchors
    raise ValueError(f"{arrangement!r} is not a fixed arrangement")


def _initial_logits(size: int, init: str, scale: float) -> torch.Tensor:
    if init == "randn":
        return torch.randn(size, size) * scale
    if init == "identity":
        return torch.eye(size) * scale
    if init == "zeros":
        return torch.zeros(size, size)
    raise ValueError(f"unknown init {init!r}; choose 'randn', 'identity' or 'zeros'")
