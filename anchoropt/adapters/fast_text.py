"""Run a CoOp-family ``TextEncoder`` through anchoropt's exact fast text path.

The CoOp family's ``TextEncoder`` runs all 77 positions of every class's prompt.  :func:`accelerate` swaps
in a forward that gives the same features with the bridge's exact shortcuts (:class:`~anchoropt.TextTower`):

* it stops at the last EOT (CLIP's text tower is causal and pools at EOT);
* when the leading rows of every prompt are identical (``[SOS]`` + a shared context, as in CoOp, DePT,
  AnchorOPT's arranged slots) it computes them once and lets every class attend to their keys/values;
* CoCoOp calls the encoder once per image on ``prompts[i]`` of the learner's ``(B, C, L, D)`` output: the
  first call encodes all ``B`` images in one pass - per-image prefixes ``(B, P, D)``, the class suffixes
  once - and the next calls return their image's rows of it (the meta-net gets its gradients through them);
* MaPLe's ``forward(prompts, tokenized_prompts, compound_prompts_deeper_text)`` runs MaPLe's own
  list-protocol blocks (its compound prompts, its fp16 rounding, any deep AnchorOPT hooks), cut to the last
  EOT; the prefix is not shared there (MaPLe's blocks rewrite it per layer).

::

    handle = anchoropt.adapters.accelerate(custom_clip.text_encoder, clip_model)
    ...                                   # the trainer runs unchanged, faster
    handle.remove()                       # the original forward again

With the AnchorOPT shims the features of each pass are handed to the injection (its ``loss()`` rebuilds the
normal logits from them).  Prompts of another shape go to the original forward.

Exactness: the prefix is shared when its rows are *equal* in every prompt.  Rows that are equal but come from
different parameters (a class-specific context whose rows hold the same values) would then receive one pooled
gradient; pass ``share_prefix=False`` for such a learner.

Axes: ``B`` images, ``C`` prompts (classes), ``L`` sequence, ``P`` shared prefix, ``D`` width, ``E`` output.
"""

from __future__ import annotations

import weakref
import torch
from torch import nn

from ..towers import TextTower, swap_block_masks
from .base import text_pass

__all__ = ["FastTextEncoder", "accelerate", "shared_prefix_length"]


def shared_prefix_length(prompts: torch.Tensor, limit: int) -> int:
    """Number of leading positions (at most ``limit``) whose rows are identical in every prompt.

    ``prompts``: ``(C, L, D)``, or ``(B, C, L, D)`` (rows equal across the classes of each image).
    """
    head = prompts[..., :limit, :]
    same = (head == head[..., :1, :, :]).all(dim=-1)  # (..., C, limit)
    same = same.flatten(0, -2).all(dim=0)  # (limit,)
    return int(same.long().cumprod(0).sum())


class FastTextEncoder:
    """Removable replacement of a ``TextEncoder``'s ``forward`` by the bridge's exact fast path.

    Args:
        text_encoder: the peer's ``TextEncoder`` (``forward(prompts, tokenized_prompts[, deep_prompts])``).
        clip_model: the CLIP model it was built from (its transformer is checked to be the encoder's).
        share_prefix: compute rows shared by every prompt once (default); ``False`` only truncates.
        batch_images: encode CoCoOp's per-image calls in one pass (default).
    """

    def __init__(self, text_encoder: nn.Module, clip_model: nn.Module, share_prefix: bool = True,
                 batch_images: bool = True):
        self.tower = TextTower(clip_model, share_prefix=share_prefix)
        if getattr(text_encoder, "transformer", None) is not self.tower.transformer:
            raise ValueError(
                "the text encoder does not run this CLIP model's transformer: pass the clip_model it was built from"
            )
        self.clip_model = clip_model
        self.text_encoder = text_encoder
        self.batch_images = batch_images
        self.list_protocol = hasattr(self.tower.blocks[0], "compound_prompt_nctx")  # MaPLe's blocks
        self._original = text_encoder.forward
        self._batch: _ImageBatch | None = None
        text_encoder.forward = self.forward

    @property
    def installed(self) -> bool:
        return self.text_encoder.__dict__.get("forward") == self.forward

    def forward(self, prompts: torch.Tensor, tokenized_prompts: torch.Tensor, *rest, **kwargs) -> torch.Tensor:
        """Features ``(C, E)`` of ``prompts`` ``(C, L, D)`` pooled at ``tokenized_prompts.argmax(-1)``
        (``rest``: MaPLe's compound prompts, a list of ``(n_ctx, D)``)."""
        deep = rest[0] if len(rest) == 1 else None
        if kwargs or len(rest) > 1 or not self._handles(prompts, tokenized_prompts, deep, bool(rest)):
            return self._original(prompts, tokenized_prompts, *rest, **kwargs)
        pool_index = tokenized_prompts.argmax(dim=-1).to(prompts.device)
        with text_pass(self.clip_model) as report:
            if self.list_protocol:
                features = self._encode_list_protocol(prompts, pool_index, [] if deep is None else deep)
            else:
                features = self._encode_plain(prompts, tokenized_prompts, pool_index)
            report(features)
        return features

    def _handles(self, prompts, tokenized_prompts, deep, has_deep: bool) -> bool:
        """Whether this call is one the fast path computes exactly (else the original forward runs)."""
        if not isinstance(prompts, torch.Tensor) or not isinstance(tokenized_prompts, torch.Tensor):
            return False
        if prompts.dim() != 3 or prompts.shape[-1] != self.tower.width:
            return False
        if tuple(tokenized_prompts.shape) != tuple(prompts.shape[:2]):
            return False
        if has_deep:  # MaPLe's third argument: only on MaPLe's own list-protocol blocks
            return self.list_protocol and isinstance(deep, (list, tuple, nn.ParameterList))
        return True

    def _encode_plain(self, prompts: torch.Tensor, token_ids: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
        """CoOp / DePT / CoCoOp: truncated, prefix shared; CoCoOp's images batched."""
        if self.batch_images:
            batch = self._image_batch(prompts, token_ids, pool_index)
            if batch is not None:
                features = batch.take(prompts)
                if batch.complete:
                    self._batch = None  # every image served: hold no graph until the next forward
                return features
        return self._encode_one(prompts, pool_index)

    def _encode_one(self, prompts: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
        n_prefix = shared_prefix_length(prompts, int(pool_index.min()))
        if n_prefix and self.tower.can_share_prefix(n_prefix, pool_index):
            return self.tower.encode_shared(prompts[:1, :n_prefix], prompts[:, n_prefix:], pool_index)[0]
        return self.tower.encode(prompts, pool_index)

    def _image_batch(self, prompts, token_ids, pool_index) -> "_ImageBatch | None":
        """The encoded batch that ``prompts`` is one image's row of (encoded now if it is new), or None."""
        base = prompts._base
        if base is None or base.dim() != 4 or tuple(base.shape[1:]) != tuple(prompts.shape) or base.shape[0] < 2:
            return None
        if _row_of(base, prompts) is None:
            return None
        cached = self._batch
        if cached is not None and cached.matches(base, token_ids):
            return cached
        self._batch = None
        length = int(pool_index.max()) + 1
        n_prefix = shared_prefix_length(base, int(pool_index.min()))
        suffix = base[0, :, n_prefix:length]
        if not n_prefix or not self.tower.can_share_prefix(n_prefix, pool_index) \
                or not bool((base[:, :, n_prefix:length] == suffix).all()):
            return None  # classes' suffixes differ between images: one pass per image
        features = self.tower.encode_shared(base[:, 0, :n_prefix], suffix, pool_index)  # (B, C, E)
        self._batch = _ImageBatch(base, token_ids, features)
        return self._batch

    def _encode_list_protocol(self, prompts: torch.Tensor, pool_index: torch.Tensor, deep) -> torch.Tensor:
        """MaPLe: its own blocks on ``[x (L', C, D), compound_prompts, 0]``, cut to the last EOT."""
        tower = self.tower
        length = tower.run_length(pool_index)
        x = prompts[:, :length].to(tower.dtype) + tower.positional_embedding[:length].to(tower.dtype)
        mask = tower._causal_mask(length, x)
        with swap_block_masks(tower.blocks, mask):
            hidden = tower.transformer([x.permute(1, 0, 2), deep, 0])[0].permute(1, 0, 2)
        return tower.pool_and_project(hidden, pool_index)

    def remove(self) -> None:
        """Give the text encoder its own forward back."""
        if self.installed:
            del self.text_encoder.forward
        self._batch = None

    def __enter__(self) -> "FastTextEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class _ImageBatch:
    """Features ``(B, C, E)`` of a CoCoOp prompt batch, handed out one image per call."""

    def __init__(self, base: torch.Tensor, token_ids: torch.Tensor, features: torch.Tensor):
        self._base = weakref.ref(base)
        self._version = base._version
        self._ids = weakref.ref(token_ids)
        self._ids_version = token_ids._version
        self.features = features
        self.served: set[int] = set()

    @property
    def complete(self) -> bool:
        return len(self.served) == self.features.shape[0]

    def matches(self, base: torch.Tensor, token_ids: torch.Tensor) -> bool:
        return (self._base() is base and base._version == self._version
                and self._ids() is token_ids and token_ids._version == self._ids_version)

    def take(self, prompts: torch.Tensor) -> torch.Tensor:
        row = _row_of(self._base(), prompts)
        self.served.add(row)
        return self.features[row]


def _row_of(base: torch.Tensor, view: torch.Tensor) -> int | None:
    """``i`` if ``view`` is exactly ``base[i]`` (same storage, offset and strides), else None."""
    if view.untyped_storage().data_ptr() != base.untyped_storage().data_ptr():
        return None
    offset = view.storage_offset() - base.storage_offset()
    step = base.stride(0)
    if step <= 0 or offset % step or tuple(view.stride()) != tuple(base.stride()[1:]):
        return None
    row = offset // step
    return row if 0 <= row < base.shape[0] else None


def accelerate(text_encoder: nn.Module, clip_model: nn.Module, share_prefix: bool = True,
               batch_images: bool = True) -> FastTextEncoder:
    """Make ``text_encoder`` (a CoOp / CoCoOp / MaPLe / DePT ``TextEncoder`` over ``clip_model``) use the exact
    fast text path; returns the handle (``handle.remove()`` undoes it).  Options: :class:`FastTextEncoder`."""
    return FastTextEncoder(text_encoder, clip_model, share_prefix=share_prefix, batch_images=batch_images)
