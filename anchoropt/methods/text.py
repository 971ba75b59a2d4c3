"""The learned text prompt every method module shares: CoOp's context, ATPrompt's attributes, AnchorOPT's anchors.

Templates (``template=``), each the core's own learner:

* ``"coop"``       ``[SOS] ctx_1 .. ctx_M {class} . [EOT]``                       :class:`~anchoropt.SoftPromptLearner`
* ``"atprompt"``   ``[SOS] [a]xn attr1 [a]xn attr2 .. ctx_1 .. ctx_M {class} .``    ``SoftPromptLearner(attributes=)``
* ``"anchoropt"``  ``[SOS] P @ [ctx; anchors] {class} . [EOT]`` (+ the frozen anchor prompt
                   ``[SOS] anchors of {class} . [EOT]``; ``attributes=`` puts it on an ATPrompt template)
                                                                                  :class:`~anchoropt.AnchorOPTPromptLearner`

``ctx`` (the ``M`` class context tokens) is what the methods condition: CoCoOp adds its meta-net bias to it
(not to ATPrompt's attribute tokens, as the released CoCoOp+ATPrompt), MaPLe couples it to the vision prompts.
``deep_depth > 0`` adds MaPLe-style deep text prompts for blocks ``1 .. deep_depth`` replacing the ``M``
context rows (:mod:`anchoropt.deep`; ATPrompt's attribute tokens and AnchorOPT's anchors keep their hidden
states, as the released MaPLe+ATPrompt / MaPLe+AnchorOPT).  Every text pass goes through the core's exact
fast path (truncation, shared prefix; per image for CoCoOp).

Axes: ``G`` prompt groups (images for CoCoOp), ``C`` classes, ``M`` context tokens, ``N`` anchors,
``K`` slots of the prompt, ``D`` text width, ``E`` joint-embedding width.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .baselines import SoftPromptLearner
from ..deep import DeepAnchorHooks, DeepPrompts, attach_deep
from ..prompts import AnchorOPTPromptLearner, model_logit_scale
from ..template import Tokenizer
from ..towers import TextTower

__all__ = ["ContextPrompt", "TEMPLATES"]

TEMPLATES = ("coop", "atprompt", "anchoropt")


class ContextPrompt(nn.Module):
    """A method's learned text prompt over a frozen CLIP text tower (the core learner as ``self.learner``).

    Args:
        model: the frozen CLIP (open_clip ``CLIP`` / ``CustomTextCLIP``, OpenAI-``clip``) or its :class:`TextTower`.
        classnames: the class set (change it with :meth:`set_classnames`).
        template: ``"coop"``, ``"atprompt"`` or ``"anchoropt"`` (see the module docstring).
        n_ctx: ``M`` class context tokens; ``N(0, 0.02^2)`` unless ``ctx_init``.
        ctx_init: init words: exactly ``M`` tokens initialise the context; a longer phrase (released MaPLe's
            ``"a photo of a"`` with ``M = 2``) initialises it from its first ``M`` tokens and keeps the words
            after them as fixed text before the class name (``"coop"`` / ``"atprompt"`` templates;
            :class:`~anchoropt.SoftPromptLearner`); ``"anchoropt"`` takes exactly ``M`` tokens.
        anchors: ``(N, D)`` Stage I anchors; required by ``"anchoropt"``.
        attributes, n_attr_ctx, legacy: ATPrompt's attribute words (required by ``"atprompt"``, optional for
            ``"anchoropt"``), soft tokens per attribute (``M`` when ``None``), the released one-token slice.
        deep_depth: deep text prompts for blocks ``1 .. deep_depth`` (MaPLe: ``PROMPT_DEPTH - 1``).
        tau, position_init, preposition, pooling: AnchorOPT's position matrix, anchor prompt and pooling.
        tokenizer: CLIP BPE by default.

    ``fp16_deep_prompts`` (attribute, False): round each class's copy of the deep prompts to fp16 as it goes in,
    as released MaPLe's text blocks do (``.half()``, also in fp32); :class:`~anchoropt.methods.MaPLe` sets it.
    """

    fp16_deep_prompts: bool = False

    def __init__(
        self,
        model: nn.Module | TextTower,
        classnames: Sequence[str],
        template: str = "coop",
        n_ctx: int = 4,
        *,
        ctx_init: str | None = None,
        anchors: torch.Tensor | None = None,
        attributes: Sequence[str] = (),
        n_attr_ctx: int | None = None,
        legacy: bool = False,
        deep_depth: int = 0,
        tau: float = 1.0,
        position_init: str = "randn",
        preposition: str | None = "of",
        pooling: str = "eot",
        tokenizer: Tokenizer | None = None,
    ):
        super().__init__()
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
        if template == "atprompt" and not attributes:
            raise ValueError("template='atprompt' needs attributes=: ATPrompt's attribute words, e.g. ['color', 'shape']")
        if template == "anchoropt" and anchors is None:
            raise ValueError("template='anchoropt' needs anchors=: the (N, D) Stage I anchors")
        if template != "anchoropt" and anchors is not None:
            raise ValueError(f"template={template!r} takes no anchors (use template='anchoropt')")
        if template == "coop" and attributes:
            raise ValueError("template='coop' takes no attributes (use template='atprompt')")
        tower = TextTower.from_model(model)
        attrs = dict(attributes=tuple(attributes), n_attr_soft=n_attr_ctx, legacy_single_token=legacy)
        self.kind = template
        if template == "anchoropt":
            if deep_depth and attributes:
                raise ValueError("deep prompts on AnchorOPT over an ATPrompt template are not supported")
            self.learner: SoftPromptLearner | AnchorOPTPromptLearner = AnchorOPTPromptLearner(
                tower, classnames, anchors, n_soft=n_ctx, soft_init=ctx_init, preposition=preposition,
                tokenizer=tokenizer, tau=tau, position_init=position_init, deep_depth=deep_depth, pooling=pooling,
                **attrs,
            )
            self.deep_hooks: DeepAnchorHooks | None = None
            self.deep = None
        else:
            self.learner = SoftPromptLearner(tower, classnames, n_soft=n_ctx, soft_init=ctx_init, tokenizer=tokenizer,
                                             **attrs)
            self.deep_hooks = attach_deep(tower, deep_depth) if deep_depth else None
            self.deep = DeepPrompts(deep_depth, n_ctx, tower.width, device=tower.device) if deep_depth else None

    # ------------------------------------------------------------------ facts
    @property
    def tower(self) -> TextTower:
        return self.learner.tower

    @property
    def ctx(self) -> nn.Parameter:
        """The ``(M, D)`` class context tokens (fp32)."""
        return self.learner.soft

    @property
    def n_ctx(self) -> int:
        return int(self.ctx.shape[-2])

    @property
    def template(self):
        return self.learner.template

    @property
    def layout(self):
        """The learned prompt's layout (its slots: attribute tokens, then the ``M`` (+ ``N``) class slots)."""
        return self.template.normal if self.has_anchors else self.template.prompt

    @property
    def classnames(self) -> list[str]:
        return self.template.classnames

    @property
    def has_anchors(self) -> bool:
        return isinstance(self.learner, AnchorOPTPromptLearner)

    @property
    def deep_prompts(self) -> torch.Tensor | None:
        """``(depth, M, D)`` deep text prompts (MaPLe's ``compound_prompts_text``), or ``None``."""
        deep = self.learner.deep if self.has_anchors else self.deep
        return None if deep is None else deep.prompts

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the class-dependent prompts (base -> novel, another dataset)."""
        self.learner.set_classnames(classnames)

    def logit_scale(self) -> torch.Tensor:
        """The CLIP model's ``logit_scale.exp()`` (100 when the model has none), float32."""
        return model_logit_scale(self.tower)

    # ------------------------------------------------------------------ prompts
    def sample_matrix(self) -> torch.Tensor | None:
        """One position-matrix sample ``(K, K)`` for the next pass (``None`` without anchors)."""
        return self.learner.position.matrix() if self.has_anchors else None

    def slots(self, ctx: torch.Tensor | None = None, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """The layout's slot embeddings ``(..., K, D)`` from context tokens ``ctx`` ``(..., M, D)`` (default :attr:`ctx`).

        ``[attribute tokens;] ctx``, or with anchors ``[attribute tokens;] P @ [ctx; anchors]`` (one ``matrix``).
        """
        ctx = self.ctx if ctx is None else ctx
        lead = ctx.shape[:-2]
        if self.has_anchors:
            anchors = self.learner.anchors.detach().to(ctx.dtype)
            ctx = self.learner.position(torch.cat([ctx, anchors.expand(*lead, *anchors.shape)], dim=-2), matrix)
        attrs = self.learner.attribute_soft
        if attrs is None:
            return ctx
        return torch.cat([attrs.to(ctx.dtype).expand(*lead, *attrs.shape), ctx], dim=-2)

    def features(self, ctx: torch.Tensor | None = None, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """Text features (not normalised) of the learned prompt: ``(C, E)``, or ``(G, C, E)`` for ``ctx`` ``(G, M, D)``.

        ``matrix``: the position-matrix sample (drawn here when ``None``).  Deep prompts take one ``(M, D)`` ctx.
        """
        if self.has_anchors and matrix is None:
            matrix = self.sample_matrix()
        slots = self.slots(ctx, matrix)
        deep, layout = self.deep_prompts, self.layout
        if deep is None:
            return self.template.encode_slots(layout, slots)
        if slots.dim() != 2:
            raise ValueError("deep text prompts take one context (M, D), not a batch of them")
        if self.has_anchors:
            hooks, n_anchor = self.learner._installed_deep_hooks(), self.learner.n_anchor
        else:
            hooks, n_anchor, matrix = self.deep_hooks, 0, torch.eye(self.n_ctx, device=slots.device)
        rounded = self.fp16_deep_prompts
        if layout.n_slots == self.n_ctx + n_anchor:  # the slots are the prompt's only learned rows: fast path
            return hooks.encode_slots(self.template, layout, slots, matrix, deep, self.n_ctx, n_anchor, rounded)
        # ATPrompt: the deep prompts replace the last M slots (the class context); attribute tokens are carried
        start = layout.slot_positions[-self.n_ctx]
        with hooks.active(matrix, self.n_ctx, n_anchor, deep, slot_start=start, round_fp16=rounded):
            return self.template.encode_slots(layout, slots)

    def anchor_features(self) -> torch.Tensor | None:
        """Frozen anchor-prompt features ``(C, E)``, float32, L2-normalised (``None`` without anchors)."""
        return self.learner.anchor_features() if self.has_anchors else None

    def remove_hooks(self) -> None:
        """Take the deep hooks off the tower (the prompt cannot run deep afterwards)."""
        hooks = self.learner.deep_hooks if self.has_anchors else self.deep_hooks
        if hooks is not None:
            hooks.remove()


def normalized(features: torch.Tensor) -> torch.Tensor:
    """Float32 L2-normalised features along the last axis."""
    return F.normalize(features.float(), dim=-1)
