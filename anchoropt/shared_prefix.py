"""Exact shared-prefix encoding for causal CLIP text towers.

When every prompt of a batch starts with the same tokens (``[SOS]`` + the arranged soft/anchor slots), a
causal tower gives those positions the same hidden states for every class at every layer.  We run the
prefix once, keep each layer's keys/values, and run only the class-specific suffixes, letting them attend
to the prefix's keys/values.  Suffixes are grouped by length (bucketed) so short class names do not pay for
long ones.  The result equals the plain full-length pass up to float rounding.

Applies only to the standard pre-LayerNorm CLIP block (``ln_1 -> attn -> [ls_1] -> +; ln_2 -> mlp ->
[ls_2] -> +``) with a packed-projection ``nn.MultiheadAttention``; :func:`supports` says when.

Axes: ``G`` prefixes (1, or one per image for CoCoOp), ``C`` classes, ``P`` prefix length, ``S`` suffix
length, ``H`` heads, ``h`` head width, ``D`` width, ``E`` output width.
"""

from __future__ import annotations

import weakref
from typing import Callable, Collection

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["supports", "encode_with_shared_prefix", "register_gated_hooks", "dormant_hook_ids"]

_GATED: "weakref.WeakSet" = weakref.WeakSet()  # owners of context-gated block hooks (deep.DeepAnchorHooks)


def register_gated_hooks(owner) -> None:
    """Let the block hooks of ``owner`` (``owner.hook_ids() -> set[int]``) stop blocking the fast path while
    ``owner.acting()`` is False: context-gated hooks that do nothing then (a finished run's deep hooks)."""
    _GATED.add(owner)


def dormant_hook_ids() -> set[int]:
    """Ids of the registered gated hooks that would do nothing in a forward run now."""
    return {i for owner in list(_GATED) if not owner.acting() for i in owner.hook_ids()}


def supports(blocks, allowed_hook_ids: Collection[int] = ()) -> bool:
    """Whether the blocks are plain CLIP blocks this module computes exactly (and no acting hook is on them).

    ``allowed_hook_ids``: ids of hook handles whose effect the caller reproduces itself (the deep variant's);
    dormant gated hooks (:func:`dormant_hook_ids`) are allowed too.
    """
    allowed = set(allowed_hook_ids) | dormant_hook_ids()
    for block in blocks:
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
            return False
        if attn.bias_k is not None or attn.add_zero_attn or (attn.dropout and block.training):
            return False
        if not all(hasattr(block, name) for name in ("ln_1", "ln_2", "mlp")) or hasattr(block, "ln_1_kv"):
            return False
        hooks = set(block._forward_hooks) | set(block._forward_pre_hooks)
        if not hooks <= allowed or type(block).__name__ not in _CLIP_BLOCKS:
            return False
    return True


# open_clip's and OpenAI clip's block classes (and our OpenAI-layout test tower's): the math reproduced here
_CLIP_BLOCKS = {"ResidualAttentionBlock", "_SequenceFirstBlock"}


def encode_with_shared_prefix(
    tower,
    prefix: torch.Tensor,
    suffix: torch.Tensor,
    pool_index: torch.Tensor,
    bucket: bool = True,
    before_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Pooled, projected features ``(G, C, E)`` of prompts ``cat(prefix[g], suffix[c])``.

    Args:
        tower: the :class:`~anchoropt.towers.TextTower` (causal, argmax/eos/first pooling).
        prefix: ``(G, P, D)`` token embeddings shared by all classes.
        suffix: ``(C, S, D)`` class-specific token embeddings (``S`` may exceed what is needed).
        pool_index: ``(C,)`` pooled position in the full prompt (must be ``>= P``).
        bucket: run each group of equal pooled position at its own length (else all at the longest).
        before_block: ``f(i, prefix_hidden) -> prefix_hidden`` applied to the prefix's hidden states
            ``(G, P, D)`` before block ``i`` (the deep variant replaces its slot rows there).
    """
    dtype = tower.dtype
    n_prefix = prefix.shape[1]
    positions = tower.positional_embedding.to(dtype)
    prefix_kv = _run_prefix(tower.blocks, prefix.to(dtype) + positions[:n_prefix], before_block)
    features = []
    order = []
    for members in _length_groups(pool_index, bucket):
        length = int(pool_index[members].max()) + 1
        hidden = suffix[members, : length - n_prefix].to(dtype) + positions[n_prefix:length]
        hidden = _run_suffix(tower.blocks, hidden, prefix_kv)  # (G*C_b, S_b, D)
        index = (pool_index[members] - n_prefix).repeat(prefix.shape[0])
        pooled = tower.pool_and_project(hidden, index)
        features.append(rearrange(pooled, "(g c) e -> g c e", g=prefix.shape[0]))
        order.append(members)
    features = torch.cat(features, dim=1)
    inverse = torch.empty_like(pool_index)
    inverse[torch.cat(order)] = torch.arange(pool_index.shape[0], device=pool_index.device)
    return features[:, inverse.to(features.device)]


def _length_groups(pool_index: torch.Tensor, bucket: bool) -> list[torch.Tensor]:
    """Indices of the prompts run together: one group per pooled position, or one group."""
    if not bucket:
        return [torch.arange(pool_index.shape[0], device=pool_index.device)]
    return [(pool_index == value).nonzero().flatten() for value in torch.unique(pool_index)]


def _run_prefix(blocks, hidden: torch.Tensor, before_block=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run the shared prefix ``(G, P, D)`` through every block; keys/values ``(G, H, P, h)`` per block."""
    cache = []
    for i, block in enumerate(blocks):
        if before_block is not None:
            hidden = before_block(i, hidden)
        q, k, v = _qkv(block, block.ln_1(hidden))
        cache.append((k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        hidden = _finish_block(block, hidden, attended)
    return cache


def _run_suffix(blocks, hidden: torch.Tensor, prefix_kv) -> torch.Tensor:
    """Run suffixes ``(C, S, D)`` that follow each prefix; returns ``(G*C, S, D)`` (g-major)."""
    groups = prefix_kv[0][0].shape[0]
    n_classes, length = hidden.shape[:2]
    hidden = hidden.repeat(groups, 1, 1) if groups > 1 else hidden
    n_prefix = prefix_kv[0][0].shape[2]
    mask = torch.ones(length, n_prefix + length, dtype=torch.bool, device=hidden.device)
    mask[:, n_prefix:] = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
    for block, (prefix_k, prefix_v) in zip(blocks, prefix_kv):
        q, k, v = _qkv(block, block.ln_1(hidden))
        k = torch.cat([prefix_k.repeat_interleave(n_classes, dim=0), k], dim=2)
        v = torch.cat([prefix_v.repeat_interleave(n_classes, dim=0), v], dim=2)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        hidden = _finish_block(block, hidden, attended)
    return hidden


def _qkv(block: nn.Module, normed: torch.Tensor):
    """Per-head queries, keys, values ``(B, H, T, h)`` of normalised hidden states ``(B, T, D)``."""
    attn = block.attn
    packed = F.linear(normed, attn.in_proj_weight, attn.in_proj_bias)
    return rearrange(packed, "b t (three heads h) -> three b heads t h", three=3, heads=attn.num_heads).unbind(0)


def _finish_block(block: nn.Module, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """Output projection, residuals and MLP of a pre-LN block; ``attended`` is ``(B, H, T, h)``."""
    attn = block.attn
    out = F.linear(rearrange(attended, "b heads t h -> b t (heads h)"), attn.out_proj.weight, attn.out_proj.bias)
    hidden = hidden + _layer_scale(block, "ls_1", out)
    return hidden + _layer_scale(block, "ls_2", block.mlp(block.ln_2(hidden)))


def _layer_scale(block: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    scale = getattr(block, name, None)
    return x if scale is None else scale(x)
