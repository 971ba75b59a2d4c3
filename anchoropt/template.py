"""Prompt templates: tokenisation and layout of slot prompts for a list of class names.

A layout is a sequence of *segments* followed by the class name and a period: an ``int`` is that many
learnable slots, a ``str`` fixed words (tokenised whole, however many BPE tokens they take).  Examples:

* AnchorOPT anchor prompt  ``[N, "of"]``              -> ``[SOS] [Anc] x N of {class} . [EOT]``
* AnchorOPT normal prompt  ``[M + N]``                -> ``[SOS] [slot] x (M + N) {class} . [EOT]``
* CoOp                     ``[M]``                    -> ``[SOS] [soft] x M {class} . [EOT]``
* ATPrompt                 ``[n, "color", n, "shape", M]`` -> ``[SOS] [soft] x n color [soft] x n shape [soft] x M {class} .``

Each prompt is tokenised once with placeholder words in its slots; the template keeps the frozen token
embeddings around the slots and the **true** pooled (EOT) position of every prompt, so features are read
where the tower reads them for real text.  Two switches reproduce the released code instead (documented,
never the default): ``pool_offset=N`` reads EOT - N (the released AnchorOPT normal prompt), and
``legacy_single_token=True`` places the slots as if every fixed segment were one token (ATPrompt's
one-token slice: a multi-token attribute keeps only its first token and the next slot block overwrites
the rest).

Axes: ``C`` classes, ``K`` slots of a prompt, ``L`` stored sequence length, ``D`` width, ``B`` batch.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch import nn

from .towers import TextTower

__all__ = [
    "pad_id",
    "text_tokens",
    "AnchorPromptTemplate",
    "PromptTemplate",
    "PromptLayout",
    "Segment",
    "Tokenizer",
    "attribute_segments",
    "check_template",
    "default_tokenizer",
]

Tokenizer = Callable[..., torch.Tensor]
"""A callable mapping a list of strings to token ids ``(len, context_length)`` (open_clip / OpenAI clip)."""

Segment = Union[int, str]
"""A layout segment: ``int`` learnable slots or ``str`` fixed words."""

POOLINGS = ("eot", "released")
_PLACEHOLDERS = ("X", "Y")  # two single-token words; where their tokenisations differ are the slots


def default_tokenizer(context_length: int = 77) -> Tokenizer:
    """open_clip's CLIP BPE tokenizer (vocabulary shipped with open_clip, works offline)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def attribute_segments(attributes: Sequence[str], n_attr_soft: int, n_class_slots: int) -> list[Segment]:
    """ATPrompt's layout ``[n, attr1, n, attr2, ..., M]`` (every attribute after its own soft block)."""
    if isinstance(attributes, str):
        raise TypeError("attributes must be a list of words, not a single string")
    segments: list[Segment] = []
    for word in attributes:
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"attribute words must be non-empty strings, got {word!r}")
        segments += [n_attr_soft, word.strip()] if n_attr_soft else [word.strip()]
    return segments + [n_class_slots]


class PromptLayout:
    """One tokenised prompt kind for ``C`` classes; its tensors are buffers of the owning template.

    Attributes:
        token_ids: ``(C, L)`` ids of the sentence with placeholder words in the slots.
        embeddings: ``(C, L, D)`` frozen token embeddings (slot rows hold the placeholders' embeddings).
        pool_index: ``(C,)`` position the tower pools (the true EOT unless ``pool_offset``).
        segments: the layout's segments.
        slot_positions: sequence position of every slot, in slot order.
        slot_start / slot_stop: first slot position / one past the last (everything before ``slot_stop``
            is shared by all classes).
        n_slots: ``K``, number of learnable slots.
    """

    def __init__(self, owner: nn.Module, name: str, segments: Sequence[Segment], slot_positions: Sequence[int]):
        self._owner, self._name = owner, name
        self.segments = tuple(segments)
        self.slot_positions = tuple(int(p) for p in slot_positions)
        self.n_slots = len(self.slot_positions)
        self.slot_start = self.slot_positions[0]
        self.slot_stop = self.slot_positions[-1] + 1
        self.runs = _runs(self.slot_positions)  # (first slot, last slot + 1, first position) of each block

    token_ids = property(lambda self: getattr(self._owner, f"{self._name}_token_ids"))
    embeddings = property(lambda self: getattr(self._owner, f"{self._name}_embeddings"))
    pool_index = property(lambda self: getattr(self._owner, f"{self._name}_pool_index"))

    @property
    def contiguous(self) -> bool:
        """Whether the slots form one block (AnchorOPT's and CoOp's layouts)."""
        return len(self.runs) == 1


class PromptTemplate(nn.Module):
    """Slot prompts for one class set: any number of layouts, each built from :data:`Segment` s.

    Holds class-dependent tensors as non-persistent buffers (rebuilt for a new class list, never saved).

    Args:
        tower: the frozen text tower (or a model :class:`TextTower` accepts).
        classnames: class names; ``_`` is read as a space, as the CoOp family does.
        segments: the ``"prompt"`` layout (e.g. ``[4]`` for CoOp); ``None`` for a subclass that
            registers its own layouts.
        tokenizer: callable ``list[str] -> (n, context_length)`` ids; CLIP BPE by default.
        legacy_single_token: place slots as if every fixed segment were one token (ATPrompt's released
            slice; see the module docstring).  Never the default.
    """

    def __init__(
        self,
        tower: TextTower | nn.Module,
        classnames: Sequence[str],
        segments: Sequence[Segment] | None = None,
        tokenizer: Tokenizer | None = None,
        legacy_single_token: bool = False,
    ):
        super().__init__()
        self.tower = TextTower.from_model(tower)
        self.classnames = _clean_classnames(classnames)
        self.tokenizer = tokenizer or default_tokenizer(self.tower.context_length)
        self.legacy_single_token = bool(legacy_single_token)
        if segments is not None:
            self.prompt = self._register_layout("prompt", segments, legacy=self.legacy_single_token)

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    # ------------------------------------------------------------------ prompt assembly
    def fill(self, layout: PromptLayout, slots: torch.Tensor) -> torch.Tensor:
        """Put ``slots`` ``(..., K, D)`` (shared by all classes) into ``layout``'s slot rows -> ``(..., C, L, D)``."""
        self._check_slots(layout, slots)
        emb = layout.embeddings
        lead = slots.shape[:-2]
        pieces = self._pieces(layout, emb, slots.to(emb.dtype).unsqueeze(-3), lead, 0, emb.shape[1])
        return torch.cat(pieces, dim=-2)

    def fill_per_class(self, layout: PromptLayout, slots: torch.Tensor) -> torch.Tensor:
        """Class-specific slots ``(C, K, D)`` (CoOp's CSC) -> prompts ``(C, L, D)``."""
        self._check_slots(layout, slots)
        if slots.dim() != 3 or slots.shape[0] != self.n_classes:
            raise ValueError(f"class-specific slots must have shape ({self.n_classes}, K, D), got {tuple(slots.shape)}")
        emb = layout.embeddings
        return torch.cat(self._pieces(layout, emb, slots.to(emb.dtype), (), 0, emb.shape[1]), dim=-2)

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
        stop = layout.slot_stop
        shared = emb[:1].expand(grouped.shape[0], -1, -1)  # (G, L, D): the prefix is the same for every class
        prefix = torch.cat(self._pieces(layout, shared, grouped.to(emb.dtype), (), 0, stop), dim=1)
        features = self.tower.encode_shared(prefix, emb[:, stop:], layout.pool_index, layout.token_ids)
        return features if slots.dim() == 3 else features[0]

    def _pieces(self, layout, emb, slots, lead, begin, end) -> list[torch.Tensor]:
        """Frozen rows ``emb[..., begin:end]`` with the slot rows taken from ``slots`` (``(..., C|1, K, D)``)."""
        pieces, at = [], begin
        rows = emb.shape[-3]

        def frozen(a, b):
            part = emb[..., a:b, :]
            return part.expand(*lead, *part.shape) if lead else part

        for first, last, position in layout.runs:
            if position > at:
                pieces.append(frozen(at, position))
            block = slots[..., first:last, :]
            pieces.append(block.expand(*block.shape[:-3], rows, *block.shape[-2:]))
            at = position + last - first
        if end > at:
            pieces.append(frozen(at, end))
        return pieces

    def _check_slots(self, layout: PromptLayout, slots: torch.Tensor) -> None:
        expected = (layout.n_slots, self.tower.width)
        if slots.dim() < 2 or tuple(slots.shape[-2:]) != expected:
            raise ValueError(f"slots must have shape (..., {expected[0]}, {expected[1]}), got {tuple(slots.shape)}")

    def layout_texts(self, layout: PromptLayout) -> list[str]:
        """The placeholder sentences that were tokenised (for inspection and error messages)."""
        return [_sentence(_PLACEHOLDERS[0], layout.segments, name) for name in self.classnames]

    # ------------------------------------------------------------------ construction
    def _register_layout(
        self, name: str, segments: Sequence[Segment], pool_offset: int = 0, legacy: bool = False
    ) -> PromptLayout:
        segments = _checked_segments(segments)
        ids, positions = self._tokenize_with_slots(segments)
        if legacy:
            positions = _single_token_positions(segments, positions[0])
        pool_index = self.tower.pool_index(ids)
        if pool_offset:
            if self.tower.pool_type not in ("argmax", "eos"):
                raise ValueError(f"released pooling (EOT - {pool_offset}) needs a tower that pools at the EOT token, "
                                 f"this one pools {self.tower.pool_type!r}")
            pool_index = pool_index - pool_offset
        length = self.tower.run_length(pool_index)
        if positions[-1] >= int(pool_index.min()) or positions[-1] >= length:
            raise ValueError(f"the {name} prompt's slots do not fit before its pooled position")
        stop = positions[-1] + 1
        if not bool((ids[:, :stop] == ids[:1, :stop]).all()):
            raise ValueError(f"the tokens before the {name} prompt's last slot differ between classes")
        ids = ids[:, :length].to(self.tower.device)
        self.register_buffer(f"{name}_token_ids", ids, persistent=False)
        self.register_buffer(f"{name}_embeddings", self.tower.embed(ids), persistent=False)
        self.register_buffer(f"{name}_pool_index", pool_index.to(self.tower.device), persistent=False)
        return PromptLayout(self, name, segments, positions)

    def _tokenize_with_slots(self, segments: Sequence[Segment]) -> tuple[torch.Tensor, list[int]]:
        """Token ids ``(C, L)`` and the slot positions, checked for every class."""
        first, second = (
            self._tokenize([_sentence(p, segments, name) for name in self.classnames]) for p in _PLACEHOLDERS
        )
        n_slots = sum(s for s in segments if isinstance(s, int))
        self._check_fit(first, segments, n_slots)
        self._check_distinct(first)
        differ = (first != second).any(dim=0).nonzero().flatten().tolist()
        blocks = [s for s in segments if isinstance(s, int) and s > 0]
        if len(differ) != n_slots or [last - first for first, last, _ in _runs(differ)] != _merged(segments):
            raise ValueError(
                "the tokenizer does not map each placeholder word to exactly one token at the same positions "
                f"for all classes (slot positions found: {differ}, slot blocks {blocks}); use a CLIP BPE tokenizer"
            )
        return first, differ

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

    def _check_fit(self, ids: torch.Tensor, segments: Sequence[Segment], n_slots: int) -> None:
        """Refuse class names whose prompt is cut off by the context length."""
        pad = pad_id(self.tokenizer)
        long_ids = _tokenize_long(self.tokenizer, [_sentence("X", segments, n) for n in self.classnames])
        if long_ids is not None:
            too_long = ((long_ids != pad).sum(dim=1) > ids.shape[1]).nonzero().flatten().tolist()
        else:  # tokenizer without a context_length argument: a cut prompt fills the context to its last position
            too_long = (ids[:, -1] != pad).nonzero().flatten().tolist()
        if too_long:
            names = ", ".join(repr(self.classnames[i]) for i in too_long[:5])
            raise ValueError(
                f"class name(s) {names} do not fit the text tower's context length of {ids.shape[1]} tokens "
                f"together with {n_slots} prompt slot(s); shorten the name(s) or use fewer tokens"
            )


class AnchorPromptTemplate(PromptTemplate):
    """Anchor and normal prompts of AnchorOPT for one class set.

    Args:
        tower: the frozen text tower (or a model :class:`TextTower` accepts).
        classnames: class names; ``_`` is read as a space, as the CoOp family does.
        n_soft: ``M``, soft tokens of the normal prompt (0 allowed).
        n_anchor: ``N``, anchor tokens (>= 1).
        preposition: word(s) between anchors and class name in the anchor prompt; ``""`` or ``None``
            for none ("of" in the paper).
        tokenizer: callable ``list[str] -> (n, context_length)`` ids; CLIP BPE by default.
        attributes: ATPrompt attribute words placed before the arranged slots of the normal prompt, each
            after its own block of ``n_attr_soft`` soft slots (AnchorOPT on an ATPrompt template).
        n_attr_soft: soft slots before each attribute (``M`` when ``None``).
        pooling: ``"eot"`` (the true EOT, default) or ``"released"``: the normal prompt is read at EOT - N,
            the token the released code pools (its "." for N = 1).
        legacy_single_token: ATPrompt's one-token slice for the attribute words (see the module docstring).
    """

    def __init__(
        self,
        tower: TextTower | nn.Module,
        classnames: Sequence[str],
        n_soft: int = 4,
        n_anchor: int = 1,
        preposition: str | None = "of",
        tokenizer: Tokenizer | None = None,
        attributes: Sequence[str] = (),
        n_attr_soft: int | None = None,
        pooling: str = "eot",
        legacy_single_token: bool = False,
    ):
        super().__init__(tower, classnames, None, tokenizer, legacy_single_token)
        if not isinstance(n_soft, int) or n_soft < 0:
            raise ValueError(f"n_soft must be an int >= 0, got {n_soft!r}")
        if not isinstance(n_anchor, int) or n_anchor < 1:
            raise ValueError(f"n_anchor must be an int >= 1, got {n_anchor!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        self.n_soft, self.n_anchor, self.pooling = n_soft, n_anchor, pooling
        self.preposition = (preposition or "").strip()
        self.attributes = tuple(attributes)
        self.n_attr_soft = n_soft if n_attr_soft is None else int(n_attr_soft)
        anchor_segments: list[Segment] = [n_anchor] + ([self.preposition] if self.preposition else [])
        self.anchor = self._register_layout("anchor", anchor_segments)
        normal_segments = attribute_segments(self.attributes, self.n_attr_soft, n_soft + n_anchor)
        self.normal = self._register_layout("normal", normal_segments, n_anchor if pooling == "released" else 0,
                                            legacy=self.legacy_single_token)

    @property
    def n_attribute_slots(self) -> int:
        """Soft slots before the attributes (0 without attributes); they precede the arranged ``M + N``."""
        return self.normal.n_slots - self.n_soft - self.n_anchor

    def anchor_prompts(self, anchors: torch.Tensor) -> torch.Tensor:
        """Anchor-prompt embeddings ``(C, L, D)`` with ``anchors`` ``(N, D)`` in the anchor slots."""
        return self.fill(self.anchor, anchors)

    def normal_prompts(self, slots: torch.Tensor) -> torch.Tensor:
        """Normal-prompt embeddings: ``slots`` ``(K, D)`` -> ``(C, L, D)``, or ``(B, K, D)`` -> ``(B, C, L, D)``."""
        return self.fill(self.normal, slots)

    def texts(self, kind: str = "normal") -> list[str]:
        """The placeholder sentences that were tokenised (for inspection and error messages)."""
        return self.layout_texts(self.anchor if kind == "anchor" else self.normal)


def _checked_segments(segments: Sequence[Segment]) -> list[Segment]:
    if isinstance(segments, (str, int)):
        raise TypeError("segments must be a list of slot counts (int) and fixed words (str)")
    checked: list[Segment] = []
    for segment in segments:
        if isinstance(segment, bool) or not isinstance(segment, (int, str)):
            raise TypeError(f"a layout segment must be an int (slots) or a str (words), got {segment!r}")
        if isinstance(segment, int) and segment < 0:
            raise ValueError(f"a slot count must be >= 0, got {segment}")
        if isinstance(segment, str) and not segment.strip():
            raise ValueError("a fixed-word segment is empty")
        if segment != 0:
            checked.append(segment.strip() if isinstance(segment, str) else segment)
    if not any(isinstance(s, int) for s in checked):
        raise ValueError(f"the layout {list(segments)} has no learnable slot")
    return checked


def _merged(segments: Sequence[Segment]) -> list[int]:
    """Sizes of the slot blocks as they appear in the sequence (adjacent int segments merge)."""
    sizes: list[int] = []
    previous_int = False
    for segment in segments:
        if isinstance(segment, int):
            if previous_int:
                sizes[-1] += segment
            else:
                sizes.append(segment)
        previous_int = isinstance(segment, int)
    return sizes


def _single_token_positions(segments: Sequence[Segment], start: int) -> list[int]:
    """Slot positions if every fixed segment were one token (the released ATPrompt slice)."""
    positions, at = [], start
    for segment in segments:
        if isinstance(segment, int):
            positions.extend(range(at, at + segment))
            at += segment
        else:
            at += 1
    return positions


def _runs(positions: Sequence[int]) -> list[tuple[int, int, int]]:
    """Blocks of consecutive positions as ``(first slot, last slot + 1, first position)``."""
    runs: list[tuple[int, int, int]] = []
    for i, position in enumerate(positions):
        if runs and position == runs[-1][2] + (i - runs[-1][0]):
            runs[-1] = (runs[-1][0], i + 1, runs[-1][2])
        else:
            runs.append((i, i + 1, position))
    return runs


def _sentence(placeholder: str, segments: Sequence[Segment], classname: str) -> str:
    parts: list[str] = []
    for segment in segments:
        parts += [placeholder] * segment if isinstance(segment, int) else [segment]
    return " ".join(parts + [classname]) + "."


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


def pad_id(tokenizer: Tokenizer) -> int:
    """The id the tokenizer pads with: the last one of the empty text (0 for CLIP BPE, SigLIP's end token)."""
    return int(tokenizer([""])[0, -1])


def text_tokens(tokenizer: Tokenizer, words: str) -> torch.Tensor:
    """The token ids ``(n,)`` of ``words`` alone, without the tokenizer's special and padding tokens.

    Found against the empty text, so no token id is assumed: CLIP BPE (``[SOS] words [EOT] 0 ...``) and
    tokenizers without a start token that pad with their end token (SigLIP's, ``words [EOS] [EOS] ...``) alike.
    """
    ids, empty = tokenizer([words])[0], tokenizer([""])[0]
    pad = int(empty[-1])
    n = int((ids != pad).sum() - (empty != pad).sum())
    differ = (ids[: len(empty)] != empty[: len(ids)]).nonzero()
    start = int(differ[0]) if len(differ) else 0  # the shared leading special tokens ([SOS])
    return ids[start:start + max(n, 0)]


def _tokenize_long(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor | None:
    """Token ids with a generous context length, to count tokens; ``None`` if the tokenizer cannot."""
    try:
        return tokenizer(texts, context_length=1024)
    except TypeError:
        return None


def check_template(template: str, what: str = "template") -> str:
    """``template`` if it formats with one class name: exactly one ``{}`` and no other ``{...}`` field
    (``'{} and {}'``, ``'{} {x}'`` and ``'{0'`` are refused with a message naming ``what``)."""
    import string

    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"{what} {template!r} is not a valid template ({err}): write one '{{}}' for the class "
                         "name and double any other brace ('{{{{', '}}}}')") from None
    if fields != [""]:
        raise ValueError(f"{what} {template!r} needs exactly one '{{}}' for the class name and no other "
                         f"'{{...}}' field (found {len(fields)}: {fields}); double any other brace ('{{{{', '}}}}')")
    return template
