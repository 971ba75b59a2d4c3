"""Stage II: a CoOp-style shallow prompt learner with AnchorOPT's frozen anchors and position matrix.

    soft (M, D) ++ anchors (N, D)  --PositionMatrix-->  slots (M+N, D)  --template-->  normal prompt
    anchors                        ------------------------------------------------>  anchor prompt

The normal prompt is trained (soft tokens + position logits); the anchor prompt is frozen, so its text
features are computed once per class set and reused until the anchors or the classes change.
``deep_depth > 0`` gives the deep variant (per-layer soft prompts, anchors carried: :mod:`anchoropt.deep`).
``attributes=[...]`` puts ATPrompt's fixed attribute words, each after its own soft block, before the
arranged slots (AnchorOPT on an ATPrompt template); ``pooling="released"`` reads the normal prompt at
EOT - N as the released code does.

Axes: ``B`` images, ``C`` classes, ``M`` soft tokens, ``N`` anchors, ``D`` width, ``E`` feature width.
"""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import functional
from ._cache import TensorSnapshot
from .deep import DeepAnchorHooks, DeepPrompts, attach_deep
from .io import read_prompt_learner, save_prompt_learner
from .position import PositionMatrix
from .template import AnchorPromptTemplate, Tokenizer, text_tokens
from .towers import TextTower

__all__ = ["AnchorOPTPromptLearner", "context_init", "load_prompt_learner", "model_logit_scale", "word_embeddings"]


class AnchorOPTPromptLearner(nn.Module):
    """Soft tokens + frozen anchors -> position matrix -> normal prompt (paper §3.2.2).

    Args:
        tower: the frozen CLIP (or its :class:`TextTower`).
        classnames: the class set to build prompts for (change it later with :meth:`set_classnames`).
        anchors: ``(N, D)`` Stage I anchors (kept frozen, saved with the learner).
        n_soft: ``M`` soft tokens.
        soft_init: ``None`` for ``N(0, 0.02^2)`` soft tokens, or words (e.g. ``"a photo of a"``) whose
            token embeddings initialise them (must give exactly ``M`` tokens).
        preposition: the anchor prompt's word between anchors and class ("of").
        tokenizer: CLIP BPE by default.
        position: a ready :class:`PositionMatrix`; else one is built from ``tau``, ``arrangement`` and
            ``position_init``.
        deep_depth: deep variant (paper §3.2.3): per-layer soft prompts for text blocks ``1 .. deep_depth``
            (:class:`~anchoropt.deep.DeepPrompts`, ``M`` per layer, as ``self.deep``) with the anchors'
            own hidden states carried through; installs context-gated hooks on the tower
            (``self.deep_hooks``, removable).  ``0`` (default) is the shallow variant.
        attributes: ATPrompt attribute words (e.g. ``["color", "shape"]``) before the arranged slots,
            each after ``n_attr_soft`` soft tokens of its own (``self.attribute_soft``, init
            ``N(0, attr_init_std^2)``, 0.01 as ATPrompt's release); multi-token words are kept whole.
        n_attr_soft: soft tokens before each attribute (``M`` when ``None``, as ATPrompt's scripts).
        pooling: ``"eot"`` (default) or ``"released"`` (normal prompt read at EOT - N, released behaviour).
        legacy_single_token: ATPrompt's released one-token slice of the attribute words (never the default).
    """

    def __init__(
        self,
        tower: TextTower | nn.Module,
        classnames: Sequence[str],
        anchors: torch.Tensor,
        n_soft: int = 4,
        soft_init: str | None = None,
        preposition: str | None = "of",
        tokenizer: Tokenizer | None = None,
        position: PositionMatrix | None = None,
        tau: float = 1.0,
        arrangement: str = "learned",
        position_init: str = "randn",
        deep_depth: int = 0,
        attributes: Sequence[str] = (),
        n_attr_soft: int | None = None,
        attr_init_std: float = 0.01,
        pooling: str = "eot",
        legacy_single_token: bool = False,
    ):
        super().__init__()
        self.tower = TextTower.from_model(tower)
        anchors = _checked_anchors(anchors, self.tower.width)
        self.preposition, self._tokenizer = preposition, tokenizer
        if deep_depth and attributes:
            raise ValueError("the deep variant on an ATPrompt template (attributes) is not supported")
        self._layout_options = dict(attributes=tuple(attributes), n_attr_soft=n_attr_soft, pooling=pooling,
                                    legacy_single_token=bool(legacy_single_token))
        self.template = AnchorPromptTemplate(self.tower, classnames, n_soft, anchors.shape[0], preposition, tokenizer,
                                             **self._layout_options)
        self.soft = nn.Parameter(self._initial_soft(n_soft, soft_init))
        self.register_buffer("anchors", anchors.to(self.tower.device))
        if position is None:
            position = PositionMatrix(n_soft, anchors.shape[0], tau=tau, init=position_init, arrangement=arrangement)
        elif (position.n_soft, position.n_anchor) != (n_soft, anchors.shape[0]):
            raise ValueError(
                f"the position matrix arranges {position.n_soft} soft + {position.n_anchor} anchor tokens, "
                f"but this learner has {n_soft} + {anchors.shape[0]}"
            )
        self.position = position.to(self.tower.device)
        n_attr = self.template.n_attribute_slots
        self.attribute_soft = nn.Parameter(
            torch.randn(n_attr, self.tower.width, device=self.tower.device) * attr_init_std
        ) if n_attr else None
        # (template, snapshot of the tensors used, features): valid while the class set and the values are the same
        self._anchor_cache: tuple[AnchorPromptTemplate, TensorSnapshot, torch.Tensor] | None = None
        self._normal_cache: tuple[AnchorPromptTemplate, TensorSnapshot, torch.Tensor] | None = None  # eval only
        # Deep variant: created last, so a deep learner's other tensors equal a shallow one's for a seed.
        self.deep_hooks: DeepAnchorHooks | None = attach_deep(self.tower, deep_depth) if deep_depth else None
        self.deep = DeepPrompts(deep_depth, n_soft, self.tower.width, device=self.tower.device) if deep_depth else None

    # ------------------------------------------------------------------ facts
    @property
    def classnames(self) -> list[str]:
        return self.template.classnames

    @property
    def n_soft(self) -> int:
        return self.soft.shape[0]

    @property
    def n_anchor(self) -> int:
        return self.anchors.shape[0]

    @property
    def attributes(self) -> tuple[str, ...]:
        return self._layout_options["attributes"]

    @property
    def pooling(self) -> str:
        return self._layout_options["pooling"]

    @property
    def layout_options(self) -> dict:
        """The template options (``attributes``, ``n_attr_soft``, ``pooling``, ``legacy_single_token``)."""
        return dict(self._layout_options)

    # ------------------------------------------------------------------ class set and anchors
    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the class-dependent prompts for another class list (e.g. base -> novel)."""
        device = self.anchors.device
        self.template = AnchorPromptTemplate(
            self.tower, classnames, self.n_soft, self.n_anchor, self.preposition, self._tokenizer,
            **self._layout_options,
        ).to(device)
        self._anchor_cache = self._normal_cache = None

    @torch.no_grad()
    def set_anchors(self, anchors: torch.Tensor) -> None:
        """Replace the frozen anchors ``(N, D)`` (the one-stage variant does this every step)."""
        self.anchors.copy_(_checked_anchors(anchors, self.tower.width, self.n_anchor))

    # ------------------------------------------------------------------ text features
    def slot_tokens(self, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """The arranged ``(M+N, D)`` slot embeddings ``P @ [soft; anchors]``."""
        sources = torch.cat([self.soft, self.anchors.detach().to(self.soft.dtype)], dim=0)
        return self.position(sources, matrix)

    def normal_features(self, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """Normal-prompt text features ``(C, E)``, float32, L2-normalised (differentiable).

        One position-matrix sample (``matrix``, else :meth:`PositionMatrix.matrix`) arranges the input
        slots and, in the deep variant, every deep layer's slots.
        """
        frozen = matrix is None and self._features_are_frozen()
        learned = self._learned_tensors()
        cache = self._normal_cache
        if frozen and cache is not None and cache[0] is self.template and cache[1].matches(learned):
            return cache[2]
        matrix = self.position.matrix() if matrix is None else matrix
        slots = self.slot_tokens(matrix)
        if self.attribute_soft is not None:
            slots = torch.cat([self.attribute_soft.to(slots.dtype), slots], dim=0)
        if self.deep is None:
            features = self.template.encode_slots(self.template.normal, slots)
        else:
            hooks = self._installed_deep_hooks()
            features = hooks.encode_slots(
                self.template, self.template.normal, slots, matrix, self.deep.prompts, self.n_soft, self.n_anchor
            )
        features = F.normalize(features.float(), dim=-1)
        _check_text_features(features, "normal", self)
        self._normal_cache = (self.template, TensorSnapshot(learned), features) if frozen else None
        return features

    def _features_are_frozen(self) -> bool:
        """Whether the normal features cannot change between calls with the same tensors (evaluation without
        gradients and without test-time sampling), so they may be cached."""
        return not (self.training or self.position.sample_in_eval or torch.is_grad_enabled())

    def _learned_tensors(self) -> tuple[torch.Tensor, ...]:
        """What the text features depend on besides the frozen tower and the class set (``self.template``):
        every parameter and the anchors, compared by value (see :mod:`anchoropt._cache`)."""
        return (*self.parameters(), self.anchors)

    def deep_context(self, matrix: torch.Tensor):
        """Context in which the tower's deep hooks apply this learner's per-layer prompts with ``matrix``.

        For code that runs the text tower itself (e.g. a CoOp-family text encoder fed with
        ``template.normal_prompts(slot_tokens(matrix))``).  A no-op context for the shallow learner.
        """
        if self.deep is None:
            return contextlib.nullcontext()
        return self._installed_deep_hooks().active(
            matrix, self.n_soft, self.n_anchor, self.deep.prompts, slot_start=self.template.normal.slot_start
        )

    def _installed_deep_hooks(self) -> DeepAnchorHooks:
        if self.deep_hooks is None or not self.deep_hooks.installed:
            raise RuntimeError(
                "this deep prompt learner's tower hooks were removed; re-attach them with "
                "learner.deep_hooks = anchoropt.attach_deep(learner.tower, learner.deep.depth)"
            )
        return self.deep_hooks

    def anchor_features(self) -> torch.Tensor:
        """Frozen anchor-prompt text features ``(C, E)``, float32, L2-normalised; computed once per class set."""
        cache = self._anchor_cache
        if cache is None or cache[0] is not self.template or not cache[1].matches((self.anchors,)):
            with torch.no_grad():
                features = self.template.encode_slots(self.template.anchor, self.anchors)
                features = F.normalize(features.float(), dim=-1)
            _check_text_features(features, "anchor", self)
            self._anchor_cache = (self.template, TensorSnapshot((self.anchors,)), features)
        return self._anchor_cache[2]

    # ------------------------------------------------------------------ logits
    def forward(
        self,
        image_features: torch.Tensor,
        logit_scale: torch.Tensor | float | None = None,
        matrix: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits_normal, logits_anchor)``, each ``(B, C)``, for image features ``(B, E)``; ``matrix`` (a
        ``(K, K)`` position matrix) arranges the normal prompt instead of :meth:`PositionMatrix.matrix`."""
        functional.check_features(image_features, "image_features", self.tower.output_dim)
        scale = self.logit_scale() if logit_scale is None else logit_scale
        normal = functional.clip_logits(image_features, self.normal_features(matrix), scale)
        anchor = functional.clip_logits(image_features, self.anchor_features(), scale)
        return normal, anchor

    @torch.no_grad()
    def heads(self, image_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every way this learner scores ``(B, E)`` images: ``{"normal", "anchor", "ensemble"}`` -> ``(B, C)``."""
        normal, anchor = self(image_features)
        return {"normal": normal, "anchor": anchor, "ensemble": functional.ensemble_logits(normal, anchor)}

    @torch.no_grad()
    def predict(
        self,
        image_features: torch.Tensor,
        mode: str = "base",
        logit_scale: torch.Tensor | float | None = None,
    ):
        """Logits for inference: ``"base"`` (normal prompt), ``"novel"`` (ensemble) or ``"both"``.

        Deterministic in any mode: the evaluation position matrix (row-wise argmax) arranges the prompt even
        when the learner is in ``train()`` mode, so two calls agree; only ``position.sample_in_eval=True``
        (the released code's stochastic test) samples.
        """
        sampled_here = self.training and not self.position.sample_in_eval
        matrix = self.position.deterministic_matrix() if sampled_here else None
        return functional.select_logits(*self(image_features, logit_scale, matrix), mode)

    def logit_scale(self) -> torch.Tensor:
        """The CLIP model's ``logit_scale.exp()`` (100 when the model has none)."""
        return model_logit_scale(self.tower)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory) -> None:
        """Write the learned tensors (safetensors) and config (JSON) to ``directory``; see :mod:`anchoropt.io`."""
        save_prompt_learner(self, directory)

    @classmethod
    def from_pretrained(cls, directory, tower, classnames: Sequence[str], tokenizer: Tokenizer | None = None):
        """Rebuild a saved learner on ``tower`` for ``classnames`` (any class list, e.g. novel classes)."""
        return load_prompt_learner(directory, tower, classnames, tokenizer)

    # ------------------------------------------------------------------ construction helpers
    def _initial_soft(self, n_soft: int, soft_init: str | None) -> torch.Tensor:
        if soft_init is None:
            return torch.randn(n_soft, self.tower.width, device=self.tower.device) * 0.02
        return word_embeddings(self.tower, self.template.tokenizer, soft_init, n_soft, "soft_init", "n_soft")


def model_logit_scale(tower: TextTower) -> torch.Tensor:
    """The CLIP model's ``logit_scale.exp()`` (100 when the model has none)."""
    scale = getattr(tower.model, "logit_scale", None)
    return scale.detach().float().exp() if isinstance(scale, torch.Tensor) else torch.tensor(100.0)


def word_embeddings(
    tower: TextTower, tokenizer: Tokenizer, words: str, n: int, what: str = "words", count: str = "n"
) -> torch.Tensor:
    """Token embeddings ``(n, D)`` (float32 copy) of ``words``, which must be exactly ``n`` tokens."""
    tokens = text_tokens(tokenizer, words)
    if tokens.numel() != n:
        raise ValueError(f"{what} {words!r} gives {tokens.numel()} tokens but {count} is {n}")
    return tower.embed(tokens[None])[0].float().clone()


def context_init(tower: TextTower, tokenizer: Tokenizer, words: str, n: int) -> tuple[torch.Tensor, str]:
    """``(embeddings (n, D), rest)``: the first ``n`` tokens of ``words`` initialise ``n`` context tokens and
    the words after them (``rest``, ``""`` when there are none) stay as fixed text before the class name.

    Released MaPLe's ``CTX_INIT`` with ``N_CTX`` 2: ``"a photo of a"`` -> ``ctx`` from ``"a photo"``, prompt
    ``[SOS] ctx_1 ctx_2 of a {class} . [EOT]``.  The split must fall between words (CLIP's BPE tokenises
    word by word, so the rest keeps its tokens); ``words`` must give at least ``n`` tokens.
    """
    if not isinstance(words, str) or not words.split():
        raise ValueError(f"soft_init must be non-empty words such as 'a photo of a', got {words!r}")
    parts = words.split()
    total = text_tokens(tokenizer, words).numel()
    if total < n:
        raise ValueError(f"soft_init {words!r} gives {total} tokens but n_soft is {n}: the phrase needs at least "
                         f"n_soft tokens (its first n_soft initialise the context, any words after them are kept "
                         f"as fixed text before the class name)")
    if total == n:
        return word_embeddings(tower, tokenizer, words, n, "soft_init", "n_soft"), ""
    for k in range(1, len(parts)):
        head = " ".join(parts[:k])
        count = text_tokens(tokenizer, head).numel()
        if count == n:
            return word_embeddings(tower, tokenizer, head, n, "soft_init", "n_soft"), " ".join(parts[k:])
        if count > n:
            break
    raise ValueError(f"the first {n} tokens of soft_init {words!r} end inside a word: choose n_soft so that "
                     f"the context covers whole words (or init words that split there)")


def _check_text_features(features: torch.Tensor, prompt: str, learner: AnchorOPTPromptLearner) -> None:
    """Refuse non-finite text features, naming the likely cause (fp16 overflow) and what to do."""
    if bool(torch.isfinite(features).all()):
        return
    norms = {name: float(t.detach().float().norm(dim=-1).max()) for name, t in
             (("anchors", learner.anchors), ("soft", learner.soft)) if t.numel()}
    sizes = ", ".join(f"largest {name} norm {value:.3g}" for name, value in norms.items())
    if learner.tower.dtype == torch.float16:
        advice = ("the float16 text tower overflowed (float16 holds at most 65504): run the tower in float32 or "
                  "bfloat16 (--precision fp32 / bf16, or model.float()), or use anchors / soft tokens of smaller "
                  "norm (e.g. a lower learning rate)")
    else:
        advice = "the learned tensors or the text tower's weights hold NaN / inf (check the anchors and the lr)"
    raise FloatingPointError(f"the {prompt}-prompt text features are NaN / inf ({sizes}): {advice}")


def _checked_anchors(anchors: torch.Tensor, width: int, n_anchor: int | None = None) -> torch.Tensor:
    if not isinstance(anchors, torch.Tensor):
        raise TypeError(f"anchors must be a tensor of shape (N, {width}), got {type(anchors).__name__}")
    if anchors.dim() == 1:
        anchors = anchors[None]
    if anchors.dim() != 2 or anchors.shape[1] != width:
        raise ValueError(
            f"anchors of shape {tuple(anchors.shape)} do not fit this text tower: expected (N, {width}); "
            "were they learned with a CLIP of another width?"
        )
    if n_anchor is not None and anchors.shape[0] != n_anchor:
        raise ValueError(f"expected {n_anchor} anchor(s), got {anchors.shape[0]}")
    if not torch.isfinite(anchors).all():
        raise ValueError("anchors contain NaN or inf")
    return anchors.detach().float().clone()


def load_prompt_learner(
    directory: str | os.PathLike,
    tower: TextTower | nn.Module,
    classnames: Sequence[str],
    tokenizer: Tokenizer | None = None,
) -> AnchorOPTPromptLearner:
    """Rebuild a saved prompt learner on ``tower`` for ``classnames`` (any class list, e.g. novel classes).

    The files are checked first (:func:`anchoropt.io.read_prompt_learner`); the class-dependent prompts are
    built for ``classnames``, the learned tensors loaded into them.
    """
    tower = TextTower.from_model(tower)
    config, tensors = read_prompt_learner(directory, tower.width)
    learner = AnchorOPTPromptLearner(
        tower,
        classnames,
        tensors["anchors"],
        n_soft=config["n_soft"],
        preposition=config["preposition"],
        tokenizer=tokenizer,
        tau=config["tau"],
        arrangement=config["arrangement"],
        deep_depth=int(config.get("deep_depth", 0)),
        attributes=list(config.get("attributes", [])),
        n_attr_soft=int(config.get("n_attr_soft", config["n_soft"])),
        pooling=config.get("pooling", "eot"),
        legacy_single_token=bool(config.get("legacy_single_token", False)),
    )
    learner.position.sample_in_eval = bool(config.get("sample_in_eval", False))
    learner.load_state_dict({k: v.to(tower.device) for k, v in tensors.items()}, strict=True)
    return learner
