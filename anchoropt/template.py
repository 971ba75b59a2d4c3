"""AnchorPromptTemplate: tokenisation and layout of AnchorOPT's two prompts for a list of class names.

* anchor prompt  ``[SOS] [Anc] x N {preposition} {class} . [EOT]``   (Stage I, and the frozen Stage II branch)
* normal prompt  ``[SOS] [slot] x (M + N) {class} . [EOT]``          (Stage II; slots = position-matrix output)

Each prompt is tokenised once with placeholder words in its slots; the template keeps the frozen token
embeddings around the slots and the **true** pooled (EOT) position of every prompt, so features are read
where the tower reads them for real text (the released code reads the "." token instead).

Axes: ``C`` classes, ``K`` slots of a prompt, ``L`` stored sequence length, ``D`` width, ``B`` batch.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .towers import TextTower

__all__ = ["AnchorPromptTemplate", "PromptLayout", "Tokenizer", "default_tokenizer"]

Tokenizer = Callable[..., torch.Tensor]
"""A callable mapping a list of strings to token ids ``(len, context_length)`` (open_clip / OpenAI clip)."""

_PLACEHOLDERS = ("X", "Y")  # two single-token words; where their tokenisations differ are the slots


def default_tokenizer(context_length: int = 77) -> Tokenizer:
    """open_clip's CLIP BPE tokenizer (vocabulary shipped with open_clip, works offline)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


class PromptLayout:
    """One tokenised prompt kind for ``C`` classes; its tensors are buffers of the owning template.

    Attributes:
        token_ids: ``(C, L)`` ids of the sentence with placeholder words in the slots.
        embeddings: ``(C, L, D)`` frozen token embeddings (slot rows hold the placeholders' embeddings).
        pool_index: ``(C,)`` position the tower pools (the true EOT).
        slot_start: first slot position (1 for CLIP: right after SOS).
        n_slots: ``K``, number of learnable slots.
    """

    def __init__(self, owner: nn.Module, name: str, slot_start: int, n_slots: int):
        self._owner, self._name = owner, name
        self.slot_start, self.n_slots = slot_start, n_slots

    token_ids = property(lambda self: getattr(self._owner, f"{self._name}_token_ids"))
    embeddings = property(lambda self: getattr(self._owner, f"{self._name}_embeddings"))
    pool_index = property(lambda self: getattr(self._owner, f"{self._name}_pool_index"))


class AnchorPromptTemplate(nn.Module):
    """Anchor and normal prompts of AnchorOPT for one class set.

    Holds class-dependent tensors as non-persistent buffers (rebuilt for a new class list, never saved).

    Args:
        tower: the frozen text tower (or a model :class:`TextTower` accepts).
        classnames: class names; ``_`` is read as a space, as the CoOp family does.
        n_soft: ``M``, soft tokens of the normal prompt (0 allowed).
        n_anchor: ``N``, anchor tokens (>= 1).
        preposition: word(s) between anchors and class name in the anchor prompt; ``""`` or ``None``
            for none ("of" in the paper).
        tokenizer: callable ``list[str] -> (n, context_length)`` ids; CLIP BPE by default.
    """

    def __init__(
        self,
        tower: TextTower | nn.Module,
        classnames: Sequence[str],
        n_soft: int = 4,
        n_anchor: int = 1,
        preposition: str | None = "of",
        tokenizer: Tokenizer | None = None,
    ):
        super().__init__()
        self.tower = TextTower.from_model(tower)
        self.classnames = _clean_classnames(classnames)
        if not isinstance(n_soft, int) or n_soft < 0:
            raise ValueError(f"n_soft must be an int >= 0, got {n_soft!r}")
        if not isinstance(n_anchor, int) or n_anchor < 1:
            raise ValueError(f"n_anchor must be an int >= 1, got {n_anchor!r}")
        self.n_soft, self.n_anchor = n_soft, n_anchor
        self.preposition = (preposition or "").strip()
        self.tokenizer = tokenizer or default_tokenizer(self.tower.context_length)
        self.anchor = self._register_layout("anchor", n_anchor, self.preposition)
        self.normal = self._register_layout("normal", n_soft + n_anchor, "")

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    # ------------------------------------------------------------------ prompt assembly
    def anchor_prompts(self, anchors: torch.Tensor) -> torch.Tensor:
        """Anchor-prompt embeddings ``(C, L, D)`` with ``anchors`` ``(N, D)`` in the anchor slots."""
        return self.fill(self.anchor, anchors)

    def normal_prompts(self, slots: torch.Tensor) -> torch.Tensor:
        """Normal-prompt embeddings: ``slots`` ``(M+N, D)`` -> ``(C, L, D)``, or ``(B, M+N, D)`` -> ``(B, C, L, D)``."""
        return self.fill(self.normal, slots)

    def fill(self, layout: PromptLayout, slots: torch.Tensor) -> torch.Tensor:
        """Put ``slots`` ``(..., K, D)`` (shared by all classes) into ``layout``'s slot rows."""
        self._check_slots(layout, slots)
        emb = layout.embeddings
        lead = slots.shape[:-2]
        start, stop = layout.slot_start, layout.slot_start + layout.n_slots
        prefix = emb[:, :start].expand(*lead, *emb[:, :start].shape)
        suffix = emb[:, stop:].expand(*lead, *emb[:, stop:].shape)
        middle = slots.to(emb.dtype).unsqueeze(-3).expand(*lead, emb.shape[0], *slots.shape[-2:])
        return torch.cat([prefix, middle, suffix], dim=-2)

    def encode(self, layout: PromptLayout, embeddings: torch.Tensor) -> torch.Tensor:
        """Features ``(C, E)`` (not normalised) of filled prompts ``(C, L, D)`` of ``layout``."""
        return self.tower.encode(embeddings, layout.pool_index, layout.token_ids)

    def encode_slots(self, layout: PromptLayout, slots: torch.Tensor) -> torch.Tensor:
        """Features (not normalised) of ``layout`` with ``slots`` filled: ``(K, D) -> (C, E)``, ``(G, K, D) -> (G, C, E)``.

        Same result as ``encode(layout, fill(layout, slots))``, but the tokens up to the last slot are
        shared by every class, so the tower may run them once (:meth:`TextTower.encode_shared`).
        """
        self._check_slots(layout, slots)
        grouped = slots if slots.dim() == 3 else slots[None]
        emb = layout.embeddings
        start, stop = layout.slot_start, layout.slot_start + layout.n_slots
        prefix = torch.cat([emb[:1, :start].expand(grouped.shape[0], -1, -1), grouped.to(emb.dtype)], dim=1)
        features = self.tower.encode_shared(prefix, emb[:, stop:], layout.pool_index, layout.token_ids)
        return features if slots.dim() == 3 else features[0]

    def _check_slots(self, layout: PromptLayout, slots: torch.Tensor) -> None:
        expected = (layout.n_slots, self.tower.width)
        if slots.dim() < 2 or tuple(slots.shape[-2:]) != expected:
            raise ValueError(f"slots must have shape (..., {expected[0]}, {expected[1]}), got {tuple(slots.shape)}")

    def texts(self, kind: str = "normal") -> list[str]:
        """The placeholder sentences that were tokenised (for inspection and error messages)."""
        layout_slots = self.n_anchor if kind == "anchor" else self.n_soft + self.n_anchor
        word = self.preposition if kind == "anchor" else ""
        return [_sentence(_PLACEHOLDERS[0], layout_slots, word, name) for name in self.classnames]

    # ------------------------------------------------------------------ construction
    def _register_layout(self, name: str, n_slots: int, word: str) -> PromptLayout:
        ids, start = self._tokenize_with_slots(n_slots, word)
        pool_index = self.tower.pool_index(ids)
        length = self.tower.run_length(pool_index)
        if start + n_slots > length:
            raise ValueError(f"the {name} prompt's slots do not fit before its pooled position")
        if not bool((ids[:, :start] == ids[:1, :start]).all()):
            raise ValueError(f"the tokens before the {name} prompt's slots differ between classes")
        ids = ids[:, :length].to(self.tower.device)
        self.register_buffer(f"{name}_token_ids", ids, persistent=False)
        self.register_buffer(f"{name}_embeddings", self.tower.embed(ids), persistent=False)
        self.register_buffer(f"{name}_pool_index", pool_index.to(self.tower.device), persistent=False)
        return PromptLayout(self, name, start, n_slots)

    def _tokenize_with_slots(self, n_slots: int, word: str) -> tuple[torch.Tensor, int]:
        """Token ids ``(C, L)`` and the first slot position, checked for every class."""
        first, second = (
            self._tokenize([_sentence(p, n_slots, word, name) for name in self.classnames]) for p in _PLACEHOLDERS
        )
        self._check_fit(first, n_slots, word)
        self._check_distinct(first)
        differ = (first != second).any(dim=0).nonzero().flatten().tolist()
        if len(differ) != n_slots or differ != list(range(differ[0], differ[0] + n_slots)):
            raise ValueError(
                "the tokenizer does not map each placeholder word to exactly one token at the same positions "
                f"for all classes (slot positions found: {differ}); use a CLIP BPE tokenizer"
            )
        return first, differ[0]

    def _tokenize(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != len(texts):
            raise TypeError(f"the tokenizer must return a (n, context_length) tensor, got {type(ids).__name__}")
        if ids.shape[1] != self.tower.context_length:
            raise ValueError(
                f"the tokenizer pads to {ids.shape[1]} tokens but the text tower has context length "
                f"{self.tower.context_length}"
            )
        return ids.long()

    def _check_distinct(self, ids: torch.Tensor) -> None:
        """Refuse class names whose prompts are the same tokens (e.g. ``Cat`` / ``cat``: CLIP's tokenizer ignores
        case), which would give classes with identical logits."""
        seen: dict[tuple, int] = {}
        for i, row in enumerate(ids.tolist()):
            j = seen.setdefault(tuple(row), i)
            if j != i:
                raise ValueError(
                    f"class names {self.classnames[j]!r} and {self.classnames[i]!r} give the same tokens (the "
                    "tokenizer ignores case and punctuation differences), so they would get identical logits: "
                    "merge them or rename one"
                )

    def _check_fit(self, ids: torch.Tensor, n_slots: int, word: str) -> None:
        """Refuse class names whose prompt is cut off by the context length."""
        long_ids = _tokenize_long(self.tokenizer, [_sentence("X", n_slots, word, n) for n in self.classnames])
        if long_ids is not None:
            n_tokens = (long_ids != 0).sum(dim=1)  # CLIP tokenizers pad with id 0
            too_long = (n_tokens > ids.shape[1]).nonzero().flatten().tolist()
        else:  # tokenizer without a context_length argument: a cut prompt has its EOT forced to the last position
            too_long = (self.tower.pool_index(ids) == ids.shape[1] - 1).nonzero().flatten().tolist()
        if too_long:
            names = ", ".join(repr(self.classnames[i]) for i in too_long[:5])
            raise ValueError(
                f"class name(s) {names} do not fit the text tower's context length of {ids.shape[1]} tokens "
                f"together with {n_slots} prompt slot(s); shorten the name(s) or use fewer tokens"
            )


def _sentence(placeholder: str, n_slots: int, word: str, classname: str) -> str:
    parts = [placeholder] * n_slots + ([word] if word else []) + [classname]
    return " ".join(parts) + "."


def _clean_classnames(classnames: Sequence[str]) -> list[str]:
    if isinstance(classnames, str) or not isinstance(classnames, Sequence):
        raise TypeError("classnames must be a list of strings")
    if len(classnames) == 0:
        raise ValueError("classnames is empty: give at least one class name")
    cleaned = []
    for i, name in enumerate(classnames):
        if not isinstance(name, str):
            raise TypeError(f"class name #{i} is a {type(name).__name__}, not a string: {name!r}")
        text = name.replace("_", " ").strip()
        if not text:
            raise ValueError(f"class name #{i} is empty")
        cleaned.append(text)
    duplicates = sorted({n for n in cleaned if cleaned.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate class names: {duplicates}")
    return cleaned


def _tokenize_long(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor | None:
    """Token ids with a generous context length, to count tokens; ``None`` if the tokenizer cannot."""
    try:
        return tokenizer(texts, context_length=1024)
    except TypeError:
        return None
