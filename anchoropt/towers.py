"""Text-tower bridge: run a frozen CLIP text transformer from token embeddings.

One place that knows the three text-tower layouts anchoropt supports:

* open_clip ``CLIP``            - tower attributes on the model, batch-first, model-level ``attn_mask``;
* open_clip ``CustomTextCLIP``  - the same attributes under ``model.text`` (a ``TextTransformer``);
* OpenAI ``clip`` models        - sequence-first blocks that each store their own ``attn_mask``
                                  (the layout vendored by CoOp / CoCoOp / MaPLe / DePT; fp16 weights).

Everything else in anchoropt talks to :class:`TextTower`, never to a model class.

Axes: ``C`` prompts (one per class), ``L`` sequence length, ``D`` transformer width, ``E`` output
(joint embedding) width.

Speed: CLIP text towers are causal and pool at the EOT token, so nothing after a prompt's EOT can change
its pooled feature.  :meth:`TextTower.encode` therefore runs only the first ``max(pool_index) + 1``
positions, and large batches are grouped by pooled position so each group runs at its own length.
:meth:`TextTower.encode_shared` goes further for prompts that share their leading tokens: the prefix
runs once and every suffix attends to its keys/values (:mod:`anchoropt.shared_prefix`).  All shortcuts
are exact; towers with a bidirectional mask (SigLIP-style) always run the full length.
"""

from __future__ import annotations

import contextlib
from typing import Collection, Iterator

import torch
from torch import nn

from . import shared_prefix

__all__ = ["TextTower", "UnsupportedTowerError"]

_POOL_TYPES = ("argmax", "eos", "first", "last")


class UnsupportedTowerError(TypeError):
    """The model has no text tower layout that anchoropt knows how to drive."""


class TextTower:
    """Frozen CLIP text tower driven from token embeddings.

    Holds references to the model's own modules (it owns no parameters, so it never appears in an
    optimizer or a ``state_dict``).  Build it with :meth:`from_model`.

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` or an OpenAI-``clip`` ``CLIP``.
        truncate: run only up to the batch's last pooled position when that is exact (default).
        share_prefix: compute a prefix shared by all prompts once (:meth:`encode_shared`) when exact.
        bucket_min_prompts: group prompts by pooled position (each group at its own length) when a
            batch has at least this many prompts (small batches are faster in one call).
    """

    def __init__(
        self, model: nn.Module, truncate: bool = True, share_prefix: bool = True, bucket_min_prompts: int = 256
    ):
        source = _text_module(model)
        self.model = model
        self.layout = _layout_name(model, source)
        self.token_embedding: nn.Embedding = source.token_embedding
        self.positional_embedding: torch.Tensor = source.positional_embedding
        self.transformer: nn.Module = source.transformer
        self.ln_final: nn.Module = source.ln_final
        self.text_projection = source.text_projection
        self.sequence_first = self.layout == "openai"
        self.pool_type, self.eos_id = _pooling(model, source, self.layout)
        self.pad_mask_id = getattr(source, "pad_id", None) if getattr(source, "use_pad_mask", False) else None
        self.causal = _is_causal(source, self.transformer, self.layout)
        self.truncate, self.share_prefix, self.bucket_min_prompts = truncate, share_prefix, bucket_min_prompts
        self._source = source

    @classmethod
    def from_model(cls, model: nn.Module | "TextTower", **options) -> "TextTower":
        """The bridge for ``model`` (a ``TextTower`` is returned unchanged)."""
        return model if isinstance(model, TextTower) else cls(model, **options)

    # ------------------------------------------------------------------ facts about the tower
    @property
    def context_length(self) -> int:
        """Number of positions the tower was trained with (77 for CLIP)."""
        return int(self.positional_embedding.shape[0])

    @property
    def width(self) -> int:
        """Token-embedding width ``D``."""
        return int(self.token_embedding.weight.shape[1])

    @property
    def output_dim(self) -> int:
        """Joint-embedding width ``E`` of the pooled, projected feature."""
        proj = self.text_projection
        if proj is None:
            return self.width
        if isinstance(proj, nn.Linear):
            return int(proj.out_features)
        return int(proj.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """dtype the transformer computes in (fp16 for OpenAI-clip weights after ``build_model``)."""
        block = self.blocks[0]
        weight = getattr(getattr(block, "mlp", None), "c_fc", None)
        if weight is not None:
            return weight.weight.dtype
        return next(block.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    @property
    def blocks(self) -> nn.ModuleList | nn.Sequential:
        """The residual blocks, in order (``transformer.resblocks``)."""
        return self.transformer.resblocks

    @property
    def can_truncate(self) -> bool:
        """Whether running only up to the last pooled position is exact for this tower."""
        return self.truncate and self.causal and self.pad_mask_id is None

    def can_share_prefix(
        self, prefix_length: int, pool_index: torch.Tensor, allowed_hook_ids: Collection[int] = ()
    ) -> bool:
        """Whether :meth:`encode_shared` may run the prefix once (exact for these prompts and blocks now).

        ``allowed_hook_ids``: block hooks whose effect the caller reproduces itself (the deep variant).
        """
        return (
            self.share_prefix
            and self.can_truncate
            and self.pool_type in ("argmax", "eos")
            and not getattr(self.transformer, "grad_checkpointing", False)
            and bool(pool_index.numel()) and int(pool_index.min()) >= prefix_length
            and shared_prefix.supports(self.blocks, allowed_hook_ids)
        )

    # ------------------------------------------------------------------ token level
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Frozen token embeddings ``(C, L, D)`` in the tower's dtype for ids ``(C, L)``."""
        with torch.no_grad():
            return self.token_embedding(token_ids.to(self.device)).to(self.dtype)

    def pool_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Position ``(C,)`` whose hidden state becomes each prompt's feature (the true EOT for CLIP)."""
        if self.pool_type == "argmax":
            return token_ids.argmax(dim=-1)
        if self.pool_type == "eos":
            is_eos = token_ids == self.eos_id
            if not bool(is_eos.any(dim=-1).all()):
                raise ValueError(f"a prompt has no end-of-text token (id {self.eos_id}); was it truncated?")
            return is_eos.int().argmax(dim=-1)
        if self.pool_type == "first":
            return torch.zeros(token_ids.shape[0], dtype=torch.long, device=token_ids.device)
        return torch.full((token_ids.shape[0],), token_ids.shape[-1] - 1, dtype=torch.long, device=token_ids.device)

    def run_length(self, pool_index: torch.Tensor) -> int:
        """Sequence length a batch with these pooled positions must be run at."""
        if self.can_truncate and pool_index.numel():
            return int(pool_index.max()) + 1
        return self.context_length

    # ------------------------------------------------------------------ forward
    def encode(
        self,
        embeddings: torch.Tensor,
        pool_index: torch.Tensor,
        token_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled, projected text features ``(C, E)`` (not normalised).

        Args:
            embeddings: prompt token embeddings ``(C, L, D)``; ``L`` may already be cut to
                :meth:`run_length`.  Cast to the tower's dtype here.
            pool_index: ``(C,)`` position to pool for each prompt.
            token_ids: ``(C, L)`` ids, needed only by towers with a padding mask.
        """
        if embeddings.dim() != 3 or embeddings.shape[-1] != self.width:
            raise ValueError(
                f"expected prompt embeddings of shape (C, L, {self.width}), got {tuple(embeddings.shape)}"
            )
        if pool_index.shape != embeddings.shape[:1]:
            raise ValueError(f"pool_index must have shape ({embeddings.shape[0]},), got {tuple(pool_index.shape)}")
        if self.can_truncate and embeddings.shape[0] >= self.bucket_min_prompts:
            return self._encode_bucketed(embeddings, pool_index, token_ids)
        return self._encode_one_length(embeddings, pool_index, token_ids)

    def encode_shared(
        self,
        prefix: torch.Tensor,
        suffix: torch.Tensor,
        pool_index: torch.Tensor,
        token_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Features ``(G, C, E)`` of the prompts ``cat(prefix[g], suffix[c])``.

        Args:
            prefix: ``(G, P, D)`` leading token embeddings shared by every class (e.g. SOS + arranged slots).
            suffix: ``(C, S, D)`` the rest of each class's prompt.
            pool_index: ``(C,)`` pooled position of each prompt in the full sequence.
            token_ids: ``(C, P + S)`` ids, needed only by towers with a padding mask.
        """
        groups, n_prefix = prefix.shape[:2]
        if self.can_share_prefix(n_prefix, pool_index):
            return shared_prefix.encode_with_shared_prefix(self, prefix, suffix, pool_index)
        full = torch.cat(
            [prefix[:, None].expand(-1, suffix.shape[0], -1, -1), suffix[None].expand(groups, -1, -1, -1)], dim=2
        ).flatten(0, 1)
        ids = None if token_ids is None else token_ids.repeat(groups, 1)
        return self.encode(full, pool_index.repeat(groups), ids).unflatten(0, (groups, suffix.shape[0]))

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Features ``(C, E)`` of plain tokenised text ``(C, L)`` through the same path as prompts."""
        token_ids = token_ids.to(self.device)
        pool_index = self.pool_index(token_ids)
        length = self.run_length(pool_index)
        return self.encode(self.embed(token_ids[:, :length]), pool_index, token_ids[:, :length])

    def run_transformer(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Run the residual blocks on batch-first hidden states ``(C, L, D)``; returns the same layout."""
        if not self.sequence_first:
            return self.transformer(x, attn_mask=attn_mask)
        with swap_block_masks(self.blocks, attn_mask):
            return self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)

    def pool_and_project(self, hidden: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm, pooling at ``pool_index`` ``(C,)`` and projection: ``(C, L, D) -> (C, E)``."""
        hidden = self.ln_final(hidden).to(self.dtype)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), pool_index.to(hidden.device)]
        proj = self.text_projection
        if proj is None:
            return pooled
        if isinstance(proj, nn.Linear):
            return proj(pooled)
        return pooled @ proj

    def _encode_one_length(
        self, embeddings: torch.Tensor, pool_index: torch.Tensor, token_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """:meth:`encode` for all prompts at the run length of the longest."""
        length = self.run_length(pool_index)
        if embeddings.shape[1] < length:
            raise ValueError(
                f"prompt embeddings have {embeddings.shape[1]} positions but this tower needs {length}"
                " (the pooled position, or the full context for a bidirectional tower)"
            )
        x = embeddings[:, :length].to(self.dtype)
        x = x + self.positional_embedding[:length].to(self.dtype)
        x = self.run_transformer(x, self._attention_mask(length, token_ids, x))
        return self.pool_and_project(x, pool_index)

    def _encode_bucketed(
        self, embeddings: torch.Tensor, pool_index: torch.Tensor, token_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """:meth:`encode` run separately for each group of prompts with the same pooled position."""
        outputs: torch.Tensor | None = None
        for value in torch.unique(pool_index):
            members = (pool_index == value).nonzero().flatten()
            ids = None if token_ids is None else token_ids[members]
            part = self._encode_one_length(embeddings[members], pool_index[members], ids)
            if outputs is None:
                outputs = part.new_empty(embeddings.shape[0], part.shape[1])
            outputs = outputs.index_copy(0, members.to(part.device), part)
        return outputs

    def _attention_mask(
        self, length: int, token_ids: torch.Tensor | None, x: torch.Tensor
    ) -> torch.Tensor | None:
        mask = self._causal_mask(length, x)
        if self.pad_mask_id is None:
            return mask
        if token_ids is None:
            raise ValueError("this text tower masks padding tokens: pass the prompts' token_ids to encode()")
        keep = token_ids[:, :length].to(x.device) != self.pad_mask_id  # (C, L) keys to attend to
        pad = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, float("-inf"))
        heads = _num_heads(self.blocks[0])
        pad = pad[:, None, :].expand(-1, length, -1).repeat_interleave(heads, 0)  # (C*H, L, L)
        return pad if mask is None else pad + mask

    def _causal_mask(self, length: int, x: torch.Tensor) -> torch.Tensor | None:
        if not self.causal:
            return None
        full = self._source.attn_mask if self.layout != "openai" else self.blocks[0].attn_mask
        return full[:length, :length].to(device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------------- layout detection
def _text_module(model: nn.Module) -> nn.Module:
    text = getattr(model, "text", None)
    if isinstance(text, nn.Module) and hasattr(text, "token_embedding"):
        if getattr(text, "cls_emb", None) is not None:
            raise UnsupportedTowerError(
                "text towers that append a CLS embedding (CoCa-style, embed_cls=True) are not supported"
            )
        return text
    if isinstance(text, nn.Module):
        raise UnsupportedTowerError(
            f"{type(model).__name__}.text is a {type(text).__name__} without a token_embedding "
            "(e.g. a Hugging Face text tower); anchoropt needs a CLIP-style TextTransformer"
        )
    missing = [a for a in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
               if not hasattr(model, a)]
    if missing:
        raise UnsupportedTowerError(
            f"{type(model).__name__} is not a CLIP model anchoropt can drive: missing {', '.join(missing)}"
        )
    return model


def _layout_name(model: nn.Module, source: nn.Module) -> str:
    if source is not model:
        return "open_clip_custom"
    if hasattr(model, "attn_mask") or hasattr(model, "text_pool_type"):
        return "open_clip"
    first = model.transformer.resblocks[0]
    if hasattr(first, "attn_mask"):
        return "openai"
    raise UnsupportedTowerError(f"cannot tell the text-tower layout of {type(model).__name__}")


def _pooling(model: nn.Module, source: nn.Module, layout: str) -> tuple[str, int | None]:
    if layout == "openai":
        return "argmax", None
    pool_type = getattr(source, "pool_type", None) or getattr(model, "text_pool_type", "argmax")
    if pool_type not in _POOL_TYPES:
        raise UnsupportedTowerError(f"text pool type {pool_type!r} is not supported (expected one of {_POOL_TYPES})")
    eos_id = getattr(source, "eos_id", None) if source is not model else getattr(model, "text_eos_id", None)
    return pool_type, eos_id


def _is_causal(source: nn.Module, transformer: nn.Module, layout: str) -> bool:
    if layout == "openai":
        return transformer.resblocks[0].attn_mask is not None
    return getattr(source, "attn_mask", None) is not None


def _num_heads(block: nn.Module) -> int:
    return int(block.attn.num_heads)


@contextlib.contextmanager
def swap_block_masks(blocks, mask: torch.Tensor | None) -> Iterator[None]:
    """Temporarily give every sequence-first block the (truncated) mask it reads from ``self.attn_mask``."""
    saved = [block.attn_mask for block in blocks]
    try:
        for block in blocks:
            block.attn_mask = mask
        yield
    finally:
        for block, original in zip(blocks, saved):
            block.attn_mask = original
