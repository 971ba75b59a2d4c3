"""MaPLe's vision prompts on an open_clip ``VisionTransformer``: appended tokens, replaced at the deep blocks.

Inside :meth:`VisionPrompts.active`:

* the ``M`` shared vision prompts ``(M, Dv)`` are appended after the class + patch tokens, once the positional
  embedding is added and before ``ln_pre`` (a forward hook on the tower's ``patch_dropout``), as MaPLe's
  ``VisionTransformer_MaPLe`` does;
* before vision blocks ``1 .. depth`` the last ``M`` rows are replaced by that block's deep prompt
  (:mod:`anchoropt.deep`'s hooks with the identity arrangement and no anchors), MaPLe's
  ``ResidualAttentionBlock_MaPLe`` for ``text_layer=False``.

Outside the context the tower is untouched (plain ``encode_image`` gives CLIP's own features).  The pooled
feature is the class token's (``pool_type="tok"``), so the prompts act through attention only; towers that
pool otherwise (average, attention pooling) or are timm models (open_clip's EVA / SigLIP configs) are refused.

Axes: ``B`` images, ``T`` tokens (class + patches), ``M`` prompts, ``Dv`` vision width.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..deep import DeepAnchorHooks, attach_deep
from ..towers import UnsupportedTowerError

__all__ = ["VisionPrompts", "vision_width"]


def vision_width(visual: nn.Module) -> int:
    """Width ``Dv`` of an open_clip ``VisionTransformer``'s tokens."""
    return int(visual.positional_embedding.shape[-1])


class VisionPrompts:
    """Removable, context-gated MaPLe prompt hooks on ``visual`` (an open_clip ``VisionTransformer``).

    Args:
        visual: ``model.visual``.
        n_prompts: ``M`` appended tokens.
        depth: deep vision blocks ``1 .. depth`` (``<= n_blocks - 1``; 0: the appended tokens only).
    """

    def __init__(self, visual: nn.Module, n_prompts: int, depth: int):
        _check_visual(visual)
        self.visual, self.n_prompts, self.depth = visual, int(n_prompts), int(depth)
        self.n_tokens = int(visual.positional_embedding.shape[0])  # class + patch tokens
        self._shared: torch.Tensor | None = None
        self._append = visual.patch_dropout.register_forward_hook(self._append_hook)
        self.deep: DeepAnchorHooks | None = attach_deep(visual.transformer, depth) if depth else None

    @property
    def installed(self) -> bool:
        return self._append is not None

    def remove(self) -> None:
        """Take every hook off the tower (idempotent)."""
        if self._append is not None:
            self._append.remove()
            self._append = None
        if self.deep is not None:
            self.deep.remove()

    @contextlib.contextmanager
    def active(self, shared: torch.Tensor, deep: torch.Tensor | None) -> Iterator[None]:
        """Image passes inside get ``shared`` ``(M, Dv)`` appended and ``deep`` ``(depth, M, Dv)`` at the deep blocks."""
        if not self.installed:
            raise RuntimeError("these vision prompt hooks were removed")
        width = vision_width(self.visual)
        if tuple(shared.shape) != (self.n_prompts, width):
            raise ValueError(f"shared vision prompts must be ({self.n_prompts}, {width}), got {tuple(shared.shape)}")
        previous, self._shared = self._shared, shared
        try:
            if self.deep is None:
                yield
            else:
                eye = torch.eye(self.n_prompts, device=shared.device)
                with self.deep.active(eye, self.n_prompts, 0, deep, slot_start=self.n_tokens):
                    yield
        finally:
            self._shared = previous

    def _append_hook(self, module: nn.Module, args: tuple, output: torch.Tensor):
        shared = self._shared
        if shared is None:
            return None
        if output.shape[1] != self.n_tokens:
            raise RuntimeError(
                f"the vision tower produced {output.shape[1]} tokens, not its {self.n_tokens}: MaPLe's vision "
                "prompts need patch dropout off and the tower's own image size"
            )
        prompts = shared.to(device=output.device, dtype=output.dtype).expand(output.shape[0], -1, -1)
        return torch.cat([output, prompts], dim=1)


def _check_visual(visual: nn.Module) -> None:
    needed = ("conv1", "class_embedding", "positional_embedding", "patch_dropout", "transformer")
    missing = [name for name in needed if not hasattr(visual, name)]
    if missing or not hasattr(getattr(visual, "transformer", None), "resblocks"):
        raise UnsupportedTowerError(
            f"MaPLe's vision prompts need an open_clip VisionTransformer image tower; this one is a "
            f"{type(visual).__name__} (missing {', '.join(missing) or 'transformer.resblocks'}). timm towers "
            "(open_clip's EVA / SigLIP configs) are not supported: use CoCoOp or DePT there"
        )
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise UnsupportedTowerError(
            f"this VisionTransformer pools {getattr(visual, 'pool_type', '?')!r} (or by attention): MaPLe's appended "
            "prompts would enter the pooled feature; MaPLe needs class-token pooling (pool_type='tok')"
        )
