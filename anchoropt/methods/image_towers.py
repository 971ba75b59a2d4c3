"""Where MaPLe's vision prompts go on each kind of image tower: one small adapter per tower family.

An adapter answers five questions about a tower and nothing else:

* ``width`` ``Dv`` and ``n_tokens`` ``T`` (the tower's own tokens: prefix (class / register) + patches);
* ``blocks``: the residual blocks, in order (deep prompts go before blocks ``1 .. J``);
* :meth:`~ImageTower.on_embeddings`: hook a function on the ``(B, T, Dv)`` tokens once the positional
  embedding (and patch dropout) is applied, before the pre-norm - where the ``M`` prompts are appended;
* :meth:`~ImageTower.on_blocks_out`: hook a function on the ``(B, T + M, Dv)`` tokens the last block hands
  on, before the final norm and the pooling - where the prompts are stripped again;
* :meth:`~ImageTower.block_hooks`: anything a block needs to see ``T + M`` tokens (Eva's rotary embedding).

| tower | append on | strip before | blocks |
|---|---|---|---|
| open_clip ``VisionTransformer`` | ``patch_dropout`` output | ``transformer`` output (``ln_post`` / pooling) | ``transformer.resblocks`` |
| timm ``VisionTransformer`` (open_clip ``TimmModel.trunk``: SigLIP / SigLIP2 ``map``, ``token``, ``avg``) | ``norm_pre`` input | ``norm`` input | ``blocks`` |
| timm ``Eva`` (EVA / EVA02, ``rope_type='cat'`` or no rope) | ``norm_pre`` input | ``norm`` input | ``blocks`` (+ rope rows) |

Eva applies its rotary embedding to ``q[:, :, num_prefix_tokens:]`` (patches, then our prompts): every
block's ``rope`` tensor ``(T - num_prefix_tokens, 2 d)`` (``[sin, cos]``) gets ``M`` identity rows
``[0, 1]`` (:func:`identity_rope_rows`), so the prompts are not rotated (``x * 1 + rot(x) * 0 == x``).

Axes: ``B`` images, ``T`` tower tokens, ``M`` prompts, ``Dv`` width, ``d`` rotary dimension per head.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from ..deep import DeepAnchorHooks, attach_deep
from ..towers import UnsupportedTowerError

__all__ = ["ImageTower", "OpenCLIPVisionTower", "TimmVisionTower", "image_tower", "identity_rope_rows"]

TokenFn = Callable[[torch.Tensor], torch.Tensor]


def identity_rope_rows(rope: torch.Tensor, n: int) -> torch.Tensor:
    """``rope`` ``(..., N, 2 d)`` (timm's concatenated ``[sin, cos]``) with ``n`` rows ``[0 ... 0, 1 ... 1]`` appended.

    A row ``sin = 0, cos = 1`` leaves its token unrotated exactly, whatever the rotation layout
    (interleaved or half):

    >>> rope = torch.randn(3, 8)
    >>> identity_rope_rows(rope, 2)[3:]
    tensor([[0., 0., 0., 0., 1., 1., 1., 1.],
            [0., 0., 0., 0., 1., 1., 1., 1.]])
    """
    if rope.dim() < 2 or rope.shape[-1] % 2:
        raise ValueError(f"a concatenated [sin, cos] rotary embedding (..., N, 2d) was expected, got {tuple(rope.shape)}")
    half = rope.shape[-1] // 2
    shape = (*rope.shape[:-2], n, half)
    rows = torch.cat([rope.new_zeros(shape), rope.new_ones(shape)], dim=-1)
    return torch.cat([rope, rows], dim=-2)


def _on_output(module: nn.Module, fn: TokenFn):
    return module.register_forward_hook(lambda _module, _args, output: fn(output))


def _on_input(module: nn.Module, fn: TokenFn):
    return module.register_forward_pre_hook(lambda _module, args: (fn(args[0]), *args[1:]))


class ImageTower:
    """Where the prompts go on one image tower (see the module's table).  Build with :func:`image_tower`."""

    kind = "?"
    width: int
    n_tokens: int
    blocks: list[nn.Module]
    dtype: torch.dtype

    def on_embeddings(self, fn: TokenFn):
        """Hook ``fn`` on the embedded tokens ``(B, T, Dv)`` before the pre-norm; returns the removable handle."""
        raise NotImplementedError

    def on_blocks_out(self, fn: TokenFn):
        """Hook ``fn`` on the last block's tokens ``(B, T + M, Dv)`` before the final norm / pooling."""
        raise NotImplementedError

    def attach_deep(self, depth: int) -> DeepAnchorHooks:
        return attach_deep(self.blocks, depth, batch_first=True)

    def block_hooks(self, n_prompts: int, active: Callable[[], bool]) -> list:
        """Extra per-block hooks for ``M`` appended tokens (none by default)."""
        return []


class OpenCLIPVisionTower(ImageTower):
    """open_clip's ``VisionTransformer``: any pooling (class token as MaPLe; ``avg`` / attention pooling: ours)."""

    kind = "open_clip VisionTransformer"

    def __init__(self, visual: nn.Module):
        self.visual = visual
        self.width = int(visual.positional_embedding.shape[-1])
        self.n_tokens = int(visual.positional_embedding.shape[0])  # class + patch tokens
        self.blocks = list(visual.transformer.resblocks)
        self.dtype = visual.conv1.weight.dtype

    def on_embeddings(self, fn: TokenFn):
        return _on_output(self.visual.patch_dropout, fn)

    def on_blocks_out(self, fn: TokenFn):
        return _on_output(self.visual.transformer, fn)

    def attach_deep(self, depth: int) -> DeepAnchorHooks:
        return attach_deep(self.visual.transformer, depth)  # reads the transformer's batch_first


class TimmVisionTower(ImageTower):
    """A timm ``VisionTransformer`` or ``Eva`` trunk (open_clip's ``TimmModel.trunk``, or the bare timm model)."""

    def __init__(self, trunk: nn.Module):
        self.trunk, self.kind = trunk, f"timm {type(trunk).__name__}"
        if getattr(trunk, "dynamic_img_size", False):
            raise UnsupportedTowerError(
                f"this {self.kind} has dynamic_img_size=True: MaPLe's vision prompts need the tower's fixed token count"
            )
        if getattr(trunk, "patch_drop", None) is not None and not isinstance(trunk.patch_drop, nn.Identity):
            raise UnsupportedTowerError(
                f"this {self.kind} has patch dropout ({type(trunk.patch_drop).__name__}): MaPLe's vision prompts "
                "need a fixed token count; build it with patch_drop_rate=0"
            )
        self.prefix = int(trunk.num_prefix_tokens)  # class + register tokens
        self.width = int(trunk.embed_dim)
        self.n_tokens = self.prefix + int(trunk.patch_embed.num_patches)
        self.blocks = list(trunk.blocks)
        self.dtype = trunk.patch_embed.proj.weight.dtype
        self.rope = _check_rope(trunk, self.kind)
        self._tag = f"_anchoropt_rope_{id(self):x}"

    def on_embeddings(self, fn: TokenFn):
        return _on_input(self.trunk.norm_pre, fn)

    def on_blocks_out(self, fn: TokenFn):
        return _on_input(self.trunk.norm, fn)

    def block_hooks(self, n_prompts: int, active: Callable[[], bool]) -> list:
        if self.rope is None:
            return []
        hook = partial(self._extend_rope, n_prompts, active)
        return [block.register_forward_pre_hook(hook, with_kwargs=True) for block in self.blocks]

    def _extend_rope(self, n_prompts: int, active: Callable[[], bool], module, args: tuple, kwargs: dict):
        rope, x = kwargs.get("rope"), args[0] if args else kwargs.get("x")
        if rope is None or not isinstance(x, torch.Tensor):
            return None
        if not (active() or getattr(x, self._tag, False)):  # the tag: a gradient checkpoint's recompute
            return None
        if x.shape[1] - self.prefix - rope.shape[-2] != n_prompts:
            raise RuntimeError(
                f"{self.kind} block got {x.shape[1]} tokens and a rotary embedding for {rope.shape[-2]} patches: "
                f"expected {self.prefix} prefix + patches + {n_prompts} prompts"
            )
        if torch.is_grad_enabled():
            setattr(x, self._tag, True)
        return args, {**kwargs, "rope": identity_rope_rows(rope, n_prompts)}


def _check_rope(trunk: nn.Module, kind: str):
    rope = getattr(trunk, "rope", None)
    if rope is None:
        return None
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat

    if type(rope) is not RotaryEmbeddingCat or getattr(trunk, "rope_mixed", False):
        raise UnsupportedTowerError(
            f"this {kind} uses a {type(rope).__name__} rotary embedding: MaPLe's vision prompts extend only timm's "
            "RotaryEmbeddingCat (rope_type='cat', EVA02) with identity rows"
        )
    return rope


def _timm_trunk(visual: nn.Module) -> nn.Module | None:
    try:
        from timm.models.eva import Eva
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return None
    trunk = getattr(visual, "trunk", visual)
    return trunk if isinstance(trunk, (VisionTransformer, Eva)) else None


def image_tower(visual: nn.Module) -> ImageTower:
    """The adapter for ``visual`` (``model.visual``); :class:`UnsupportedTowerError` naming what is missing."""
    trunk = _timm_trunk(visual)
    if trunk is not None:
        return TimmVisionTower(trunk)
    needed = ("conv1", "class_embedding", "positional_embedding", "patch_dropout", "transformer")
    missing = [name for name in needed if not hasattr(visual, name)]
    if not missing and hasattr(visual.transformer, "resblocks"):
        return OpenCLIPVisionTower(visual)
    inner = getattr(visual, "trunk", None)
    what = f"{type(visual).__name__}" + (f" around a timm {type(inner).__name__}" if inner is not None else "")
    raise UnsupportedTowerError(
        f"MaPLe's vision prompts need an open_clip VisionTransformer, or a timm VisionTransformer / Eva trunk "
        f"(open_clip's SigLIP / EVA configs); this image tower is a {what} "
        f"(missing {', '.join(missing) or 'transformer.resblocks'}): use CoCoOp or DePT there"
    )
