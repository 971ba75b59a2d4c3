"""The baselines AnchorOPT is compared with, on the same template and text-tower machinery.

* :class:`ZeroShotClassifier` - zero-shot CLIP: hand-written template(s) ``"a photo of a {}."``, optionally
  an ensemble (the normalised mean of each template's normalised features, CLIP's practice);
* :class:`SoftPromptLearner` - CoOp: ``[SOS] [soft] x M {class} . [EOT]`` (generic or class-specific
  context), and ATPrompt: ``[soft] x n attr1 [soft] x n attr2 ... [soft] x M {class} .`` with fixed
  attribute words as hard anchors (whole, however many BPE tokens; ``legacy_single_token=True`` is the
  released one-token slice).  Both train with plain cross-entropy.

AnchorOPT itself is :class:`~anchoropt.prompts.AnchorOPTPromptLearner` (``attributes=`` puts its arranged
slots on an ATPrompt template).  Every learner here answers ``heads(image_features)`` with its named
logits, which is what :mod:`anchoropt.methods.registry` and the experiment runner score.

Axes: ``B`` images, ``C`` classes, ``M`` class soft tokens, ``K`` slots, ``D`` width, ``E`` feature width.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional
from .._cache import TensorSnapshot
from ..prompts import context_init, model_logit_scale
from ..template import (
    PromptTemplate,
    Tokenizer,
    _clean_classnames,
    attribute_segments,
    check_template,
    default_tokenizer,
)
from ..towers import TextTower

__all__ = ["ZeroShotClassifier", "SoftPromptLearner", "DEFAULT_TEMPLATE", "ENSEMBLE_TEMPLATES"]

DEFAULT_TEMPLATE = "a photo of a {}."
# The seven ImageNet templates CLIP's authors selected for their prompt ensemble (CLIP repository notebook).
ENSEMBLE_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


class ZeroShotClassifier(nn.Module):
    """Zero-shot CLIP with hand-written templates; nothing is learned.

    Args:
        tower: the frozen CLIP (or its :class:`TextTower`).
        classnames: class names (``_`` read as a space).
        templates: one template or several (an ensemble), each with one ``{}`` for the class name.
        tokenizer: CLIP BPE by default.
    """

    def __init__(
        self,
        tower: TextTower | nn.Module,
        classnames: Sequence[str],
        templates: str | Sequence[str] = DEFAULT_TEMPLATE,
        tokenizer: Tokenizer | None = None,
    ):
        super().__init__()
        self.tower = TextTower.from_model(tower)
        self.templates = _checked_templates(templates)
        self.tokenizer = tokenizer or default_tokenizer(self.tower.context_length)
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Encode the templates for another class list (the features are computed here, once)."""
        self.classnames = _clean_classnames(classnames)
        self._features = self._encode()

    def texts(self) -> list[list[str]]:
        """The sentences encoded, ``[template][class]``."""
        return [[t.format(name) for name in self.classnames] for t in self.templates]

    @torch.no_grad()
    def _encode(self) -> torch.Tensor:
        per_template = [F.normalize(self.tower.encode_text(self.tokenizer(s)).float(), dim=-1) for s in self.texts()]
        return F.normalize(torch.stack(per_template).mean(dim=0), dim=-1)

    def text_features(self) -> torch.Tensor:
        """``(C, E)`` float32, L2-normalised (the template ensemble's mean, renormalised)."""
        return self._features

    def forward(self, image_features: torch.Tensor, logit_scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """Logits ``(B, C)`` for image features ``(B, E)``."""
        functional.check_features(image_features, "image_features", self.tower.output_dim)
        scale = model_logit_scale(self.tower) if logit_scale is None else logit_scale
        return functional.clip_logits(image_features, self._features, scale)

    @torch.no_grad()
    def heads(self, image_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"zeroshot": (B, C)}``."""
        return {"zeroshot": self(image_features)}

    def logit_scale(self) -> torch.Tensor:
        return model_logit_scale(self.tower)


class SoftPromptLearner(nn.Module):
    """CoOp and ATPrompt: learnable soft tokens (and fixed attribute words) before the class name.

    Args:
        tower: the frozen CLIP (or its :class:`TextTower`).
        classnames: the class set to build prompts for (:meth:`set_classnames` changes it).
        n_soft: ``M``, the class soft tokens right before the class name.
        soft_init: words whose token embeddings initialise the class soft tokens, else ``N(0, soft_init_std^2)``
            (0.02, as CoOp and ATPrompt).  Exactly ``M`` tokens: all of them; more (released MaPLe's
            ``"a photo of a"`` with ``M = 2``): the first ``M`` initialise the context and the words after
            them stay as fixed text between the context and the class name (:attr:`context_words`, e.g.
            ``[SOS] ctx_1 ctx_2 of a {class} . [EOT]``); fewer is an error.
        class_specific: CoOp's class-specific context (``soft`` is ``(C, M, D)``); such a learner can only
            score the classes it was trained on.
        attributes: ATPrompt's attribute words; each follows its own ``n_attr_soft`` soft tokens
            (``self.attribute_soft``, init ``N(0, attr_init_std^2)``, 0.01 as released).
        n_attr_soft: soft tokens before each attribute (``M`` when ``None``, as ATPrompt's scripts).
        legacy_single_token: the released ATPrompt slice (one token per attribute word; a multi-token word
            such as "playfulness" keeps "play" and the next block overwrites the rest).  Never the default.
        tokenizer: CLIP BPE by default.
    """

    def __init__(
        self,
        tower: TextTower | nn.Module,
        classnames: Sequence[str],
        n_soft: int = 4,
        soft_init: str | None = None,
        class_specific: bool = False,
        attributes: Sequence[str] = (),
        n_attr_soft: int | None = None,
        attr_init_std: float = 0.01,
        soft_init_std: float = 0.02,
        legacy_single_token: bool = False,
        tokenizer: Tokenizer | None = None,
    ):
        super().__init__()
        if not isinstance(n_soft, int) or n_soft < 1:
            raise ValueError(f"n_soft must be an int >= 1, got {n_soft!r}")
        self.tower = TextTower.from_model(tower)
        self.attributes = tuple(attributes)
        self.n_attr_soft = n_soft if n_attr_soft is None else int(n_attr_soft)
        self.class_specific, self.legacy_single_token = bool(class_specific), bool(legacy_single_token)
        self._tokenizer = tokenizer or default_tokenizer(self.tower.context_length)  # one, for every class set
        self._n_class_soft = n_soft
        self._trained_classnames: list[str] | None = None
        words = None
        self.context_words = ""  # fixed words between the class context and the class name (MaPLe's "of a")
        if soft_init is not None:
            words, self.context_words = context_init(self.tower, self._tokenizer, soft_init, n_soft)
        self.set_classnames(classnames)
        width, device = self.tower.width, self.tower.device
        if words is not None:
            soft = words.expand(self.template.n_classes, -1, -1).clone() if class_specific else words
        else:
            shape = (self.template.n_classes, n_soft, width) if class_specific else (n_soft, width)
            soft = torch.randn(*shape, device=device) * soft_init_std
        self.soft = nn.Parameter(soft.to(device))
        n_attr = self.template.prompt.n_slots - n_soft
        self.attribute_soft = nn.Parameter(torch.randn(n_attr, width, device=device) * attr_init_std) if n_attr else None
        self._trained_classnames = list(self.template.classnames)

    @property
    def classnames(self) -> list[str]:
        return self.template.classnames

    @property
    def n_soft(self) -> int:
        return self.soft.shape[-2]

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the class-dependent prompts for another class list (e.g. base -> novel)."""
        if self.class_specific and self._trained_classnames is not None and \
                _clean_classnames(classnames) != self._trained_classnames:
            raise ValueError(
                "a class-specific context (CoOp CSC) has one context per trained class and cannot score other "
                f"classes; it was trained on {len(self._trained_classnames)} classes"
            )
        segments = attribute_segments(self.attributes, self.n_attr_soft, self._n_class_soft)
        if self.context_words:
            segments.append(self.context_words)
        self.template = PromptTemplate(self.tower, classnames, segments, self._tokenizer, self.legacy_single_token)
        self._cache: tuple[PromptTemplate, TensorSnapshot, torch.Tensor] | None = None  # eval-time features

    def slot_tokens(self) -> torch.Tensor:
        """The slot embeddings in layout order: ``(K, D)``, or ``(C, K, D)`` with a class-specific context."""
        if self.attribute_soft is None:
            return self.soft
        attrs = self.attribute_soft.to(self.soft.dtype)
        if self.class_specific:
            attrs = attrs.expand(self.soft.shape[0], -1, -1)
        return torch.cat([attrs, self.soft], dim=-2)

    def text_features(self) -> torch.Tensor:
        """Prompt text features ``(C, E)``, float32, L2-normalised (cached in evaluation without gradients)."""
        frozen = not (self.training or torch.is_grad_enabled())
        learned = tuple(self.parameters())
        cache = self._cache
        if frozen and cache is not None and cache[0] is self.template and cache[1].matches(learned):
            return cache[2]
        layout = self.template.prompt
        if self.class_specific:
            features = self.template.encode(layout, self.template.fill_per_class(layout, self.slot_tokens()))
        else:
            features = self.template.encode_slots(layout, self.slot_tokens())
        features = F.normalize(features.float(), dim=-1)
        self._cache = (self.template, TensorSnapshot(learned), features) if frozen else None
        return features

    def forward(self, image_features: torch.Tensor, logit_scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """Logits ``(B, C)`` for image features ``(B, E)``."""
        functional.check_features(image_features, "image_features", self.tower.output_dim)
        scale = model_logit_scale(self.tower) if logit_scale is None else logit_scale
        return functional.clip_logits(image_features, self.text_features(), scale)

    @torch.no_grad()
    def heads(self, image_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"prompt": (B, C)}``."""
        return {"prompt": self(image_features)}

    def logit_scale(self) -> torch.Tensor:
        return model_logit_scale(self.tower)


def _checked_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    items = (templates,) if isinstance(templates, str) else tuple(templates)
    if not items:
        raise ValueError("give at least one zero-shot template, e.g. 'a photo of a {}.'")
    for template in items:
        if not isinstance(template, str):
            raise ValueError(f"a zero-shot template needs exactly one '{{}}' for the class name, got {template!r}")
        check_template(template, "zero-shot template")
    return items
