"""MaPLe's vision prompts on an image tower: appended tokens, replaced at the deep blocks, stripped before pooling.

Inside :meth:`VisionPrompts.active`:

* the ``M`` shared vision prompts ``(M, Dv)`` are appended after the tower's own tokens (class / register +
  patches), once the positional embedding is added and before the pre-norm, as MaPLe's
  ``VisionTransformer_MaPLe`` does;
* before vision blocks ``1 .. depth`` the last ``M`` rows are replaced by that block's deep prompt
  (:mod:`anchoropt.deep`'s hooks with the identity arrangement and no anchors), MaPLe's
  ``ResidualAttentionBlock_MaPLe`` for ``text_layer=False``;
* after the last block the ``M`` prompt rows are stripped, before the final norm and the pooling, so the
  pooling (class token, average, attention / MAP pooling) sees only the tower's own tokens.

For class-token pooling the strip changes nothing (MaPLe's prompts never reach the class token's pooled
row: the prompts act through attention only), so the features are MaPLe's exactly.  For towers that pool
otherwise (average, attention pooling, timm's SigLIP MAP head) the strip is **our extension**: MaPLe's paper
only had CLS pooling; we pool the tower's own tokens, which the prompts changed through attention.

Where these sites are on each tower (open_clip ``VisionTransformer``, timm ``VisionTransformer`` / ``Eva``
trunks of open_clip's SigLIP / EVA configs, Eva's rotary embedding) is
:mod:`anchoropt.methods.image_towers`'s job.  Outside the context the tower is untouched (plain
``encode_image`` gives CLIP's own features).

Axes: ``B`` images, ``T`` tower tokens, ``M`` prompts, ``Dv`` vision width.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..deep import DeepAnchorHooks
from ..towers import UnsupportedTowerError
from .image_towers import ImageTower, image_tower

__all__ = ["VisionPrompts", "vision_width", "vision_blocks"]


def vision_width(visual: nn.Module) -> int:
    """Width ``Dv`` of a supported image tower's tokens."""
    return image_tower(visual).width


def vision_blocks(visual: nn.Module) -> int:
    """Number of blocks of a supported image tower; 0 for towers MaPLe's vision prompts do not support."""
    try:
        return len(image_tower(visual).blocks)
    except UnsupportedTowerError:
        return 0


class VisionPrompts:
    """Removable, context-gated MaPLe prompt hooks on ``visual`` (see :func:`~anchoropt.methods.image_towers.image_tower`).

    Args:
        visual: ``model.visual``.
        n_prompts: ``M`` appended tokens.
        depth: deep vision blocks ``1 .. depth`` (``<= n_blocks - 1``; 0: the appended tokens only).
        round_fp16: round each image's copy of the shared and deep prompts to fp16 as it goes in (value and
            gradient), as released MaPLe's ``VisionTransformer_MaPLe`` and blocks do (``.half()``, also in fp32).
    """

    def __init__(self, visual: nn.Module, n_prompts: int, depth: int, round_fp16: bool = False):
        self.tower: ImageTower = image_tower(visual)
        self.visual, self.n_prompts, self.depth = visual, int(n_prompts), int(depth)
        self.round_fp16 = bool(round_fp16)
        self.n_tokens = self.tower.n_tokens
        self._shared: torch.Tensor | None = None
        self.deep: DeepAnchorHooks | None = None
        # the block hooks first: they must see a block's own input before a deep hook replaces it
        self._handles = [*self.tower.block_hooks(self.n_prompts, lambda: self._shared is not None),
                         self.tower.on_embeddings(self._append), self.tower.on_blocks_out(self._strip)]
        try:
            self.deep = self.tower.attach_deep(depth) if depth else None
        except BaseException:
            self.remove()
            raise

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Take every hook off the tower (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.deep is not None:
            self.deep.remove()

    @contextlib.contextmanager
    def active(self, shared: torch.Tensor, deep: torch.Tensor | None) -> Iterator[None]:
        """Image passes inside get ``shared`` ``(M, Dv)`` appended and ``deep`` ``(depth, M, Dv)`` at the deep blocks."""
        if not self.installed:
            raise RuntimeError("these vision prompt hooks were removed")
        width = self.tower.width
        if tuple(shared.shape) != (self.n_prompts, width):
            raise ValueError(f"shared vision prompts must be ({self.n_prompts}, {width}), got {tuple(shared.shape)}")
        previous, self._shared = self._shared, shared
        try:
            if self.deep is None:
                yield
            else:
                eye = torch.eye(self.n_prompts, device=shared.device)
                with self.deep.active(eye, self.n_prompts, 0, deep, slot_start=self.n_tokens,
                                      round_fp16=self.round_fp16):
                    yield
        finally:
            self._shared = previous

    def _append(self, tokens: torch.Tensor) -> torch.Tensor:
        shared = self._shared
        if shared is None:
            return tokens
        self._check_tokens(tokens, self.n_tokens, "embedding produced")
        prompts = shared.to(device=tokens.device, dtype=tokens.dtype).expand(tokens.shape[0], -1, -1)
        if self.round_fp16:  # MaPLe: shared_ctx.expand(B, ...).half(), each image's copy
            prompts = prompts.half().to(tokens.dtype)
        return torch.cat([tokens, prompts], dim=1)

    def _strip(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._shared is None:
            return tokens
        self._check_tokens(tokens, self.n_tokens + self.n_prompts, "blocks handed on")
        return tokens[:, : self.n_tokens]

    def _check_tokens(self, tokens: torch.Tensor, expected: int, where: str) -> None:
        if tokens.dim() != 3 or tokens.shape[1] != expected:
            raise RuntimeError(
                f"the {self.tower.kind} {where} tokens of shape {tuple(tokens.shape)}, not (B, {expected}, Dv): MaPLe's "
                "vision prompts need patch dropout off and the tower's own image size"
            )
