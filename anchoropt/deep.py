"""Deep AnchorOPT (paper §3.2.3, Fig. 3(c) / S6): per-layer soft prompts, anchors carried through the blocks.

Layer 0 is the input prompt the prompt learner builds (``P @ [soft; anchors]`` in the ``K = M + N`` slots
after ``[SOS]``).  At the input of every text block ``i = 1 .. depth`` a forward-pre-hook replaces the slot
rows ``[s0, s0 + K)`` of the hidden states by::

    P @ [ prompts_i (M, D) ; anchor_hidden (N, D) ]

* ``P`` is the **same** ``(K, K)`` position-matrix sample the input layer used in this forward;
* ``prompts_i`` are layer ``i``'s own learnable soft prompts (:class:`DeepPrompts`), or, for MaPLe's
  list-passing blocks, the compound prompt the block was handed;
* ``anchor_hidden[n]`` is the incoming hidden state (block ``i-1``'s output) **at the anchor's own slot**:
  the first slot whose source is anchor ``n``.  The released code reads the row before it (the token
  preceding the anchor, ``[SOS]`` when the anchor is first); we do not.  If ``P`` dropped anchor ``n``
  (no slot picks it) its column contributes nothing at the deep layers (a zero source: no value, no
  gradient), as the released code drops the column.

So soft slots are dropped and re-introduced at every layer, anchor slots keep evolving through the tower,
and a slot that repeats an anchor receives a copy of that anchor's (first slot's) hidden state.

Hooks only act inside :meth:`DeepAnchorHooks.active` (the prompt learner enters it around its
normal-prompt pass), so plain ``encode_text`` and the frozen anchor-prompt pass through the same tower are
untouched; with nested contexts (two learners on one tower) only the innermost one's hooks act.  Hooks outside
their context are dormant and do not stop other passes from taking the exact shared-prefix path
(:func:`anchoropt.shared_prefix.dormant_hook_ids`), so a finished run's hooks change nothing for the next run.  The hooks keep no state between calls: the forward's record (``P``, prompts, slot layout) is
read from the active context and attached to the hidden-state tensor a block receives, so a gradient
checkpoint's recompute (run later, during backward, outside the context) replays exactly the same
replacement - also when several forwards ran before one backward.

Speed: the replaced rows lie in the prompt's leading ``[SOS] + slots`` positions, which are the same for
every class at every layer.  The prompt learner therefore runs that prefix once with the per-layer
replacement applied and lets each class suffix attend to its keys/values (:func:`encode_shared_deep`,
the deep twin of :mod:`anchoropt.shared_prefix`), whenever the tower allows the shared prefix; the hooks
do the work otherwise (gradient checkpointing, non-CLIP blocks, bidirectional towers, MaPLe, the CoOp
family's own text encoders).

Block protocols (detected per call):

* open_clip: ``block(x, attn_mask=...)`` or ``checkpoint(block, x, None, None, mask)``, ``x`` ``(C, L, D)``
  (``(L, C, D)`` when the transformer is not ``batch_first``);
* OpenAI ``clip`` (CoOp family): ``block(x)``, ``x`` ``(L, C, D)``;
* MaPLe: ``block([x, compound_prompts, counter])``, ``x`` ``(L, C, D)``.  The block overwrites rows
  ``[1, 1 + n_ctx)`` with ``compound_prompts[counter]`` inside its forward, after any pre-hook; the hook
  therefore hands the block an empty (suppressed) prompt list so that it keeps our arrangement, and a
  forward hook puts MaPLe's list back and advances ``counter`` exactly as the block would have.  The
  compound prompt is rounded to fp16 first, each class's copy (value and gradient), as MaPLe's block does
  (``.half()``, even in fp32).

Axes: ``C`` prompts (classes), ``L`` sequence, ``D`` width, ``K = M + N`` slots, ``M`` soft, ``N`` anchors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Sequence

import torch
from einops import einsum
from torch import nn

from . import shared_prefix
from .towers import TextTower

__all__ = ["DeepPrompts", "DeepAnchorHooks", "DeepForward", "attach_deep", "deep_slot_rows", "encode_shared_deep"]


class DeepPrompts(nn.Module):
    """Per-layer learnable soft prompts ``(depth, M, D)`` for text blocks ``1 .. depth`` (fp32).

    Layer 0's soft tokens are the prompt learner's own ``soft``; ``prompts[i - 1]`` feed block ``i``.
    The per-layer length is the learner's soft-token count ``M``: the position matrix arranges exactly
    ``M`` soft sources and ``N`` anchors at every layer.

    Args:
        depth: number of deep layers (blocks ``1 .. depth``); ``>= 1``.
        length: prompts per layer (``M``); ``>= 0``.
        width: transformer width ``D``.
        std: initial values are ``N(0, std^2)`` (0.02, as MaPLe and the released code).
    """

    def __init__(self, depth: int, length: int, width: int, std: float = 0.02, device=None):
        super().__init__()
        _check_int("depth", depth, minimum=1)
        _check_int("length", length, minimum=0)
        _check_int("width", width, minimum=1)
        self.prompts = nn.Parameter(torch.randn(depth, length, width, device=device) * std)

    @property
    def depth(self) -> int:
        return int(self.prompts.shape[0])

    @property
    def length(self) -> int:
        return int(self.prompts.shape[1])

    @property
    def width(self) -> int:
        return int(self.prompts.shape[2])

    def layer(self, block: int) -> torch.Tensor:
        """Prompts ``(M, D)`` of text block ``block`` (``1 .. depth``)."""
        if not 1 <= block <= self.depth:
            raise IndexError(f"deep prompts cover blocks 1..{self.depth}, got block {block}")
        return self.prompts[block - 1]

    def extra_repr(self) -> str:
        return f"depth={self.depth}, length={self.length}, width={self.width}"


@dataclass(frozen=True, eq=False)
class DeepForward:
    """What one forward's hooks need (built by :meth:`DeepAnchorHooks.active`; read-only).

    Attributes:
        matrix: the ``(K, K)`` position-matrix sample of this forward (with its straight-through graph).
        prompts: ``(depth, M, D)`` per-layer prompts, or ``None`` to take MaPLe's compound prompts.
        n_soft, n_anchor: ``M`` and ``N``.
        slot_start: sequence position of the first slot (1: right after ``[SOS]``).
        anchor_slot: ``(N,)`` first slot whose source is each anchor (0 where absent).
        anchor_present: ``(N,)`` whether any slot picks each anchor.
        grad_enabled: grad mode when the context was entered.
        round_fp16: round each sequence's copy of the layer prompts to fp16 (``.half()``) before it goes in,
            as MaPLe's blocks do even in fp32 (so each copy's gradient is rounded too, before the sum).
    """

    owner: "DeepAnchorHooks"
    matrix: torch.Tensor
    prompts: torch.Tensor | None
    n_soft: int
    n_anchor: int
    slot_start: int
    anchor_slot: torch.Tensor
    anchor_present: torch.Tensor
    grad_enabled: bool
    round_fp16: bool = False

    @property
    def n_slots(self) -> int:
        return self.n_soft + self.n_anchor

    def layer_prompts(self, block: int) -> torch.Tensor | None:
        return None if self.prompts is None else self.prompts[block - 1]


_ACTIVE = threading.local()  # .record: the innermost active DeepForward of this thread


class _Suppressed(list):
    """An empty stand-in for MaPLe's compound-prompt list (the block then skips its own overwrite)."""

    def __init__(self, original: Sequence):
        super().__init__()
        self.original = original


class DeepAnchorHooks:
    """Removable handle: forward(-pre) hooks on text blocks ``1 .. depth`` that apply deep AnchorOPT.

    Build it with :func:`attach_deep`.  Hooks do nothing outside :meth:`active`.  ``remove()`` (or leaving
    a ``with attach_deep(...) as hooks:`` block) takes every hook off again; the tower is then exactly as
    before.

    Args:
        blocks: the text transformer's residual blocks, in order.
        depth: hook blocks ``1 .. depth`` (``0 <= depth <= len(blocks) - 1``; 0 installs nothing).
        batch_first: layout of plain-tensor block inputs (``(C, L, D)`` if True, ``(L, C, D)`` if False).
            MaPLe's list inputs are always sequence-first.
        width: the transformer width ``D`` (checked against the prompts), if known.
    """

    def __init__(self, blocks: Sequence[nn.Module], depth: int, batch_first: bool, width: int | None = None):
        blocks = list(blocks)
        _check_depth(depth, len(blocks))
        self.blocks, self.depth, self.batch_first, self.width = blocks, depth, bool(batch_first), width
        self._tag = f"_anchoropt_deep_{id(self):x}"
        self._handles = []
        for i in range(1, depth + 1):
            self._handles.append(blocks[i].register_forward_pre_hook(partial(self._pre_hook, i), with_kwargs=True))
            self._handles.append(blocks[i].register_forward_hook(_restore_maple_list))
        shared_prefix.register_gated_hooks(self)  # outside active() these hooks leave the fast path open

    # ------------------------------------------------------------------ handle
    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def hook_ids(self) -> set[int]:
        """Ids of the installed hook handles."""
        return {handle.id for handle in self._handles}

    def acting(self) -> bool:
        """Whether a forward run now would be changed by these hooks (this handle owns the innermost context)."""
        record = getattr(_ACTIVE, "record", None)
        return record is not None and record.owner is self

    def remove(self) -> None:
        """Take all hooks off the blocks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "DeepAnchorHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "installed" if self.installed else "removed"
        return f"DeepAnchorHooks(depth={self.depth}, batch_first={self.batch_first}, {state})"

    # ------------------------------------------------------------------ context
    @contextlib.contextmanager
    def active(
        self,
        matrix: torch.Tensor,
        n_soft: int,
        n_anchor: int,
        prompts: torch.Tensor | None = None,
        slot_start: int = 1,
        round_fp16: bool = False,
    ) -> Iterator[DeepForward]:
        """Apply deep AnchorOPT to the prompts run through the tower inside this context.

        Args:
            matrix: the ``(K, K)`` position matrix the input prompt was arranged with (same sample).
            n_soft, n_anchor: ``M`` and ``N`` (``K = M + N``); sources are ``[soft_1..M, anchor_1..N]``.
            prompts: ``(depth, M, D)`` per-layer prompts (:attr:`DeepPrompts.prompts`); ``None`` takes
                each MaPLe block's compound prompt ``compound_prompts[counter]`` instead.
            slot_start: position of the first slot in the sequence (1 for CLIP prompts).
            round_fp16: released MaPLe's ``.half()`` on every injected copy of the layer prompts (see
                :class:`DeepForward`); off by default.
        """
        if not self.installed:
            raise RuntimeError("these deep hooks were removed; attach new ones with anchoropt.attach_deep(...)")
        record = self._record(matrix, n_soft, n_anchor, prompts, slot_start, round_fp16)
        previous = getattr(_ACTIVE, "record", None)
        _ACTIVE.record = record
        try:
            yield record
        finally:
            _ACTIVE.record = previous

    def _record(self, matrix, n_soft, n_anchor, prompts, slot_start, round_fp16=False) -> DeepForward:
        _check_int("n_soft", n_soft, minimum=0)
        _check_int("n_anchor", n_anchor, minimum=0)
        _check_int("slot_start", slot_start, minimum=0)
        size = n_soft + n_anchor
        if not isinstance(matrix, torch.Tensor) or tuple(matrix.shape) != (size, size):
            got = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
            raise ValueError(f"the position matrix must have shape ({size}, {size}) for M={n_soft}, N={n_anchor}, got {got}")
        if prompts is not None:
            expected = (self.depth, n_soft, self.width if self.width is not None else prompts.shape[-1])
            if prompts.dim() != 3 or tuple(prompts.shape) != expected:
                raise ValueError(
                    f"deep prompts must have shape (depth, M, D) = {expected} for these hooks, got {tuple(prompts.shape)}"
                )
        source = matrix.detach().argmax(dim=-1)  # (K,) source picked by each slot (one-hot rows)
        anchors = torch.arange(n_soft, size, device=matrix.device)
        picks = source[:, None] == anchors[None, :]  # (K, N)
        return DeepForward(
            owner=self,
            matrix=matrix,
            prompts=prompts,
            n_soft=n_soft,
            n_anchor=n_anchor,
            slot_start=slot_start,
            anchor_slot=picks.to(torch.uint8).argmax(dim=0),  # the first slot that picks each anchor
            anchor_present=picks.any(dim=0),
            grad_enabled=torch.is_grad_enabled(),
            round_fp16=bool(round_fp16),
        )

    # ------------------------------------------------------------------ the learner's fast path
    def encode_slots(
        self,
        template,
        layout,
        slots: torch.Tensor,
        matrix: torch.Tensor,
        prompts: torch.Tensor,
        n_soft: int,
        n_anchor: int,
        round_fp16: bool = False,
    ) -> torch.Tensor:
        """Deep ``template.encode_slots(layout, slots)``: features ``(C, E)`` (not normalised).

        ``slots`` ``(K, D)`` are the input layer's arranged slots (``P @ [soft; anchors]`` with the same
        ``matrix``).  The deep replacement only touches the slot rows, which lie in the prefix shared by
        every class, so when the tower can share that prefix (:meth:`can_share_prefix`) it runs once with
        the per-layer prompts applied (:func:`encode_shared_deep`); otherwise the tower's own blocks run
        inside :meth:`active` and the hooks do the replacement.  ``round_fp16`` (released MaPLe's ``.half()``
        on each class's copy of the layer prompts, forward and gradient) always takes the per-class pass: one
        shared prefix would round the gradient summed over the classes, not each class's.
        """
        tower = template.tower
        start, stop = layout.slot_start, layout.slot_start + layout.n_slots
        if n_soft + n_anchor != layout.n_slots:
            raise ValueError(f"the layout has {layout.n_slots} slots, not M + N = {n_soft} + {n_anchor}")
        with self.active(matrix, n_soft, n_anchor, prompts, slot_start=start, round_fp16=round_fp16) as record:
            if not round_fp16 and slots.dim() == 2 and self.can_share_prefix(tower, stop, layout.pool_index):
                emb = layout.embeddings
                prefix = torch.cat([emb[:1, :start], slots[None].to(emb.dtype)], dim=1)
                return encode_shared_deep(tower, record, prefix, emb[:, stop:], layout.pool_index)[0]
            return template.encode_slots(layout, slots)

    def can_share_prefix(self, tower: TextTower, prefix_length: int, pool_index: torch.Tensor) -> bool:
        """:meth:`TextTower.can_share_prefix`, except that these (context-gated) hooks do not forbid it."""
        blocks = list(tower.blocks)
        if len(blocks) != len(self.blocks) or any(a is not b for a, b in zip(blocks, self.blocks)):
            return False
        return tower.can_share_prefix(prefix_length, pool_index, allowed_hook_ids=self.hook_ids())

    # ------------------------------------------------------------------ the hook
    def _current(self, hidden: torch.Tensor) -> DeepForward | None:
        """This forward's record: carried by the hidden state (recompute), else the active context."""
        record = getattr(hidden, self._tag, None)
        if record is not None:
            return record
        record = getattr(_ACTIVE, "record", None)
        if record is None or record.owner is not self:  # the innermost active context owns the pass
            return None
        if torch.is_grad_enabled():
            setattr(hidden, self._tag, record)  # so a checkpoint recompute replays this forward
        elif record.grad_enabled:
            raise RuntimeError(
                "deep AnchorOPT hooks ran with gradients disabled inside a forward that records gradients: "
                "reentrant gradient checkpointing (use_reentrant=True) is not supported, because its "
                "recompute sees detached inputs; use torch.utils.checkpoint with use_reentrant=False "
                "(open_clip's set_grad_checkpointing does)"
            )
        return record

    def _pre_hook(self, block: int, module: nn.Module, args: tuple, kwargs: dict):
        if args:
            first, key = args[0], None
        else:
            key = next((k for k in ("q_x", "x", "inputs") if k in kwargs), None)
            if key is None:
                return None
            first = kwargs[key]
        if isinstance(first, torch.Tensor):
            record = self._current(first)
            if record is None:
                return None
            prompts = record.layer_prompts(block)
            if prompts is None:
                raise ValueError(
                    f"block {block} is not a MaPLe list-passing block: pass the per-layer prompts to active()"
                )
            new = deep_slot_rows(first, record, prompts, batch_first=self.batch_first)
        elif isinstance(first, (list, tuple)) and len(first) == 3 and isinstance(first[0], torch.Tensor):
            new = self._maple_inputs(block, first)
            if new is None:
                return None
        else:
            return None
        if key is None:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, key: new}

    def _maple_inputs(self, block: int, inputs: Sequence) -> list | None:
        """``[x', prompts', counter]`` for a MaPLe block, with its own overwrite suppressed when it would run."""
        x, compound, counter = inputs
        record = self._current(x)
        if record is None:
            return None
        will_overwrite = len(compound) > 0 and counter <= len(compound) - 1
        prompts = record.layer_prompts(block)
        if prompts is None:
            if not will_overwrite:
                raise ValueError(
                    f"MaPLe block {block} has no compound prompt left (counter {counter}, {len(compound)} prompts): "
                    "give active() per-layer prompts or use a depth <= len(compound_prompts)"
                )
            # MaPLe's block casts each class's copy of its compound prompt with .half() before inserting it (also
            # in fp32, where cat promotes it back): round the same way, so the soft slots hold exactly MaPLe's
            # values and each copy's gradient is rounded as MaPLe's is
            prompts, record = compound[counter], dataclasses.replace(record, round_fp16=True)
        x = deep_slot_rows(x, record, prompts, batch_first=False)
        return [x, _Suppressed(compound) if will_overwrite else compound, counter]


def _restore_maple_list(module: nn.Module, args: tuple, output):
    """Forward hook: give MaPLe's next block its real prompt list and the counter the block would have set."""
    if isinstance(output, (list, tuple)) and len(output) == 3 and isinstance(output[1], _Suppressed):
        return [output[0], output[1].original, output[2] + 1]
    return None


def deep_slot_rows(
    hidden: torch.Tensor, record: DeepForward, prompts: torch.Tensor, batch_first: bool = True
) -> torch.Tensor:
    """Hidden states with slot rows ``[s0, s0 + K)`` replaced by ``P @ [prompts; anchor_hidden]``.

    Args:
        hidden: ``(C, L, D)`` (``batch_first``) or ``(L, C, D)`` hidden states entering a block.
        record: the forward's :class:`DeepForward` (``P``, ``M``, ``N``, slot layout).
        prompts: this layer's ``(M, D)`` soft prompts.
    """
    seq = 1 if batch_first else 0
    start, size, n_soft = record.slot_start, record.n_slots, record.n_soft
    if hidden.dim() != 3 or hidden.shape[seq] < start + size:
        raise ValueError(
            f"hidden states of shape {tuple(hidden.shape)} have no slot rows [{start}, {start + size}) "
            f"(batch_first={batch_first})"
        )
    if tuple(prompts.shape) != (n_soft, hidden.shape[-1]):
        raise ValueError(f"layer prompts must have shape ({n_soft}, {hidden.shape[-1]}), got {tuple(prompts.shape)}")
    device_type = hidden.device.type
    no_autocast = (
        torch.autocast(device_type, enabled=False)  # a selection: keep the residual stream's precision
        if torch.amp.is_autocast_available(device_type)
        else contextlib.nullcontext()
    )
    with no_autocast:
        matrix = record.matrix.to(device=hidden.device, dtype=hidden.dtype)
        slots = hidden.narrow(seq, start, size)
        carried = slots.index_select(seq, record.anchor_slot.to(hidden.device))  # (C, N, D) / (N, C, D)
        present = record.anchor_present.to(hidden.device)
        present = present[None, :, None] if batch_first else present[:, None, None]
        carried = torch.where(present, carried, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
        prompts = prompts.to(device=hidden.device, dtype=hidden.dtype)
        if record.round_fp16:  # MaPLe: each sequence's copy .half() (value and that copy's gradient rounded)
            copies = prompts.expand(hidden.shape[0 if batch_first else 1], *prompts.shape)
            soft = matrix[:, :n_soft] @ copies.half().to(hidden.dtype)  # (C, K, D)
            soft = soft if batch_first else soft.transpose(0, 1)
        else:
            soft = matrix[:, :n_soft] @ prompts  # (K, D), shared
            soft = soft if batch_first else soft[:, None]
        if batch_first:
            rows = soft + einsum(matrix[:, n_soft:], carried, "slot anchor, c anchor d -> c slot d")
        else:
            rows = soft + einsum(matrix[:, n_soft:], carried, "slot anchor, anchor c d -> slot c d")
        tail = hidden.shape[seq] - start - size
        return torch.cat([hidden.narrow(seq, 0, start), rows, hidden.narrow(seq, start + size, tail)], dim=seq)


def encode_shared_deep(
    tower: TextTower,
    record: DeepForward,
    prefix: torch.Tensor,
    suffix: torch.Tensor,
    pool_index: torch.Tensor,
    bucket: bool = True,
) -> torch.Tensor:
    """:func:`anchoropt.shared_prefix.encode_with_shared_prefix` with the deep replacement in the prefix.

    The prefix ``(G, P, D)`` (``[SOS]`` + slots) runs once; before blocks ``1 .. depth`` its slot rows get
    ``P @ [prompts_i; anchor_hidden]``, and every class suffix attends to the resulting keys/values.  Exact
    (up to float rounding) against the full pass with the hooks.  Features ``(G, C, E)``.
    """
    if record.prompts is None:
        raise ValueError("the shared-prefix path needs the per-layer prompts in the record")
    depth = record.prompts.shape[0]

    def replace_slot_rows(block: int, hidden: torch.Tensor) -> torch.Tensor:
        if not 1 <= block <= depth:
            return hidden
        return deep_slot_rows(hidden, record, record.layer_prompts(block), batch_first=True)

    return shared_prefix.encode_with_shared_prefix(
        tower, prefix, suffix, pool_index, bucket, before_block=replace_slot_rows
    )


def attach_deep(
    target: nn.Module | TextTower | Sequence[nn.Module],
    depth: int,
    batch_first: bool | None = None,
) -> DeepAnchorHooks:
    """Install deep AnchorOPT hooks on text blocks ``1 .. depth`` and return the removable handle.

    Args:
        target: a CLIP model (open_clip ``CLIP`` / ``CustomTextCLIP``, OpenAI ``clip``), a
            :class:`~anchoropt.TextTower`, a text transformer (anything with ``.resblocks``, e.g. MaPLe's),
            or the sequence of blocks itself.
        depth: deep layers; ``0 <= depth <= n_blocks - 1`` (block 0 sees the input prompt).
        batch_first: layout of plain-tensor block inputs; read from the transformer
            (``transformer.batch_first``, else the blocks' attention) when not given.

    Example::

        hooks = attach_deep(model, depth=8)
        with hooks.active(matrix, n_soft=4, n_anchor=1, prompts=deep.prompts):
            features = tower.encode(prompts, pool_index)
        hooks.remove()
    """
    width = None
    if isinstance(target, TextTower):
        transformer, width = target.transformer, target.width
    elif isinstance(target, nn.Module) and hasattr(target, "resblocks"):
        transformer = target
    elif isinstance(target, (nn.ModuleList, nn.Sequential, list, tuple)):
        transformer = None
    else:
        tower = TextTower.from_model(target)
        transformer, width = tower.transformer, tower.width
    blocks = list(transformer.resblocks if transformer is not None else target)
    _check_depth(depth, len(blocks))
    if batch_first is None:
        batch_first = _batch_first(transformer, blocks)
    return DeepAnchorHooks(blocks, depth, batch_first, width=width)


# ---------------------------------------------------------------------- helpers
def _batch_first(transformer: nn.Module | None, blocks: list[nn.Module]) -> bool:
    flag = getattr(transformer, "batch_first", None)
    if flag is None and blocks:
        flag = getattr(getattr(blocks[0], "attn", None), "batch_first", None)
    if flag is None:
        raise ValueError("cannot tell whether these blocks are batch-first: pass batch_first=True or False")
    return bool(flag)


def _check_depth(depth: int, n_blocks: int) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"depth must be an int, got {type(depth).__name__}")
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    if depth > n_blocks - 1:
        raise ValueError(
            f"depth {depth} needs {depth + 1} text blocks (block 0 takes the input prompt), "
            f"but the tower has {n_blocks}: use depth <= {max(n_blocks - 1, 0)}"
        )


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
