"""Run a CoOp-family ``TextEncoder`` through anchoropt's exact fast text path.

The CoOp family's ``TextEncoder.forward(prompts, tokenized_prompts)`` runs all 77 positions of every class's
prompt.  :func:`accelerate` swaps in a forward that gives the same features with the bridge's exact
shortcuts (:class:`~anchoropt.TextTower`): it stops at the last EOT, and when the leading rows of every
prompt are identical (``[SOS]`` + a shared context, as in CoOp, CoCoOp per image, DePT, AnchorOPT's
arranged slots) it computes them once and lets every class attend to their keys/values.

    handle = anchoropt.adapters.accelerate(custom_clip.text_encoder, clip_model)
    ...                                   # the trainer runs unchanged, faster
    handle.remove()                       # the original forward again

Anything else (MaPLe's three-argument encoder, prompts of another shape) goes to the original forward.

Axes: ``C`` prompts, ``L`` sequence, ``D`` width, ``E`` output width.
"""

from __future__ import annotations

import torch
from torch import nn

from ..towers import TextTower

__all__ = ["FastTextEncoder", "accelerate", "shared_prefix_length"]


def shared_prefix_length(prompts: torch.Tensor, limit: int) -> int:
    """Number of leading positions (at most ``limit``) whose rows are identical in every prompt ``(C, L, D)``."""
    head = prompts[:, :limit]
    same = (head == head[:1]).flatten(2).all(dim=2).all(dim=0)  # (limit,)
    return int(same.long().cumprod(0).sum())


class FastTextEncoder:
    """Removable replacement of a ``TextEncoder``'s ``forward`` by the bridge's exact fast path."""

    def __init__(self, text_encoder: nn.Module, clip_model: nn.Module):
        self.tower = TextTower(clip_model)
        if getattr(text_encoder, "transformer", None) is not self.tower.transformer:
            raise ValueError(
                "the text encoder does not run this CLIP model's transformer: pass the clip_model it was built from"
            )
        self.text_encoder = text_encoder
        self._original = text_encoder.forward
        text_encoder.forward = self.forward

    @property
    def installed(self) -> bool:
        return self.text_encoder.__dict__.get("forward") == self.forward

    def forward(self, prompts: torch.Tensor, tokenized_prompts: torch.Tensor, *rest, **kwargs) -> torch.Tensor:
        """Features ``(C, E)`` of ``prompts`` ``(C, L, D)`` pooled at ``tokenized_prompts.argmax(-1)``."""
        if rest or kwargs or prompts.dim() != 3 or tokenized_prompts.shape != prompts.shape[:2]:
            return self._original(prompts, tokenized_prompts, *rest, **kwargs)
        pool_index = tokenized_prompts.argmax(dim=-1).to(prompts.device)
        n_prefix = shared_prefix_length(prompts, int(pool_index.min()))
        if n_prefix and self.tower.can_share_prefix(n_prefix, pool_index):
            return self.tower.encode_shared(prompts[:1, :n_prefix], prompts[:, n_prefix:], pool_index)[0]
        return self.tower.encode(prompts, pool_index)

    def remove(self) -> None:
        """Give the text encoder its own forward back."""
        if self.installed:
            del self.text_encoder.forward

    def __enter__(self) -> "FastTextEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def accelerate(text_encoder: nn.Module, clip_model: nn.Module) -> FastTextEncoder:
    """Make ``text_encoder`` (a CoOp-family ``TextEncoder`` over ``clip_model``) use the exact fast text path."""
    return FastTextEncoder(text_encoder, clip_model)
