"""The learned text prompt every method module shares: CoOp's context, optionally with AnchorOPT's anchors.

Templates (``template=``):

* ``"coop"``       ``[SOS] ctx_1 .. ctx_M {class} . [EOT]``                  (CoOp / CoCoOp / MaPLe / DePT)
* ``"anchoropt"``  ``[SOS] P @ [ctx; anchors] {class} . [EOT]``              (+ the frozen anchor prompt
                   ``[SOS] anchors of {class} . [EOT]``), the core :class:`~anchoropt.AnchorOPTPromptLearner`

``ctx`` (``M`` context tokens) is what the methods condition: CoCoOp adds its meta-net bias to it, MaPLe
couples it to the vision prompts.  ``deep_depth > 0`` adds MaPLe-style deep text prompts for blocks
``1 .. deep_depth`` (:mod:`anchoropt.deep`; with anchors the anchors' hidden states are carried through).
Every text pass goes through the core fast path (truncation, shared prefix, per image for CoCoOp).

Axes: ``G`` prompt groups (images for CoCoOp), ``C`` classes, ``M`` context tokens, ``N`` anchors,
``K`` slots of the prompt, ``D`` text width, ``E`` joint-embedding width.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..deep import DeepAnchorHooks, DeepPrompts, attach_deep
from ..prompts import AnchorOPTPromptLearner
from ..template import AnchorPromptTemplate, Tokenizer
from ..towers import TextTower

__all__ = ["ContextPrompt", "TEMPLATES"]

TEMPLATES = ("coop", "anchoropt")


class ContextPrompt(nn.Module):
    """A method's learned text prompt over a frozen CLIP text tower.

    Args:
        model: the frozen CLIP (open_clip ``CLIP`` / ``CustomTextCLIP``, OpenAI-``clip``) or its :class:`TextTower`.
        classnames: the class set (change it with :meth:`set_classnames`).
        template: ``"coop"`` or ``"anchoropt"`` (see the module docstring).
        n_ctx: ``M`` context tokens, ``N(0, 0.02^2)`` as every released method initialises them.
        anchors: ``(N, D)`` Stage I anchors; required by ``"anchoropt"``.
        deep_depth: deep text prompts for blocks ``1 .. deep_depth`` (MaPLe: ``PROMPT_DEPTH - 1``).
        tau, position_init, preposition: AnchorOPT's position matrix and anchor prompt.
        tokenizer: CLIP BPE by default.
    """

    def __init__(
        self,
        model: nn.Module | TextTower,
        classnames: Sequence[str],
        template: str = "coop",
        n_ctx: int = 4,
        *,
        anchors: torch.Tensor | None = None,
        deep_depth: int = 0,
        tau: float = 1.0,
        position_init: str = "randn",
        preposition: str | None = "of",
        tokenizer: Tokenizer | None = None,
    ):
        super().__init__()
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
            raise ValueError(f"n_ctx must be an int >= 1, got {n_ctx!r}")
        self.tower = TextTower.from_model(model)
        self.kind, self._tokenizer, self._n_ctx = template, tokenizer, n_ctx
        self.anchoropt: AnchorOPTPromptLearner | None = None
        if template == "anchoropt":
            if anchors is None:
                raise ValueError("template='anchoropt' needs anchors=: the (N, D) Stage I anchors")
            self.anchoropt = AnchorOPTPromptLearner(
                self.tower, classnames, anchors, n_soft=n_ctx, preposition=preposition, tokenizer=tokenizer,
                tau=tau, position_init=position_init, deep_depth=deep_depth,
            )
        else:
            if anchors is not None:
                raise ValueError(f"template={template!r} takes no anchors (use template='anchoropt')")
            self._template = self._coop_template(classnames)
            self._ctx = nn.Parameter(torch.randn(n_ctx, self.tower.width, device=self.tower.device) * 0.02)
            self.deep_hooks: DeepAnchorHooks | None = attach_deep(self.tower, deep_depth) if deep_depth else None
            self.deep = DeepPrompts(deep_depth, n_ctx, self.tower.width, device=self.tower.device) if deep_depth else None

    # ------------------------------------------------------------------ facts
    @property
    def ctx(self) -> nn.Parameter:
        """The ``(M, D)`` context tokens (fp32)."""
        return self.anchoropt.soft if self.anchoropt is not None else self._ctx

    @property
    def n_ctx(self) -> int:
        return int(self.ctx.shape[0])

    @property
    def template(self) -> AnchorPromptTemplate:
        return self.anchoropt.template if self.anchoropt is not None else self._template

    @property
    def layout(self):
        """The learned prompt's layout (slots right after ``[SOS]``)."""
        return self.template.normal

    @property
    def classnames(self) -> list[str]:
        return self.template.classnames

    @property
    def deep_prompts(self) -> torch.Tensor | None:
        """``(depth, M, D)`` deep text prompts (MaPLe's ``compound_prompts_text``), or ``None``."""
        deep = self.anchoropt.deep if self.anchoropt is not None else self.deep
        return None if deep is None else deep.prompts

    @property
    def has_anchors(self) -> bool:
        return self.anchoropt is not None

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the class-dependent prompts (base -> novel, another dataset)."""
        if self.anchoropt is not None:
            self.anchoropt.set_classnames(classnames)
        else:
            self._template = self._coop_template(classnames).to(self.ctx.device)

    # ------------------------------------------------------------------ prompts
    def sample_matrix(self) -> torch.Tensor | None:
        """One position-matrix sample ``(K, K)`` for the next pass (``None`` without anchors)."""
        return None if self.anchoropt is None else self.anchoropt.position.matrix()

    def slots(self, ctx: torch.Tensor | None = None, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """The prompt's slot embeddings ``(..., K, D)`` from context tokens ``ctx`` ``(..., M, D)`` (default: :attr:`ctx`).

        With anchors: ``P @ [ctx; anchors]`` (one ``matrix`` for every leading index).
        """
        ctx = self.ctx if ctx is None else ctx
        if self.anchoropt is None:
            return ctx
        anchors = self.anchoropt.anchors.detach().to(ctx.dtype)
        sources = torch.cat([ctx, anchors.expand(*ctx.shape[:-2], *anchors.shape)], dim=-2)
        return self.anchoropt.position(sources, matrix)

    def features(self, ctx: torch.Tensor | None = None, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """Text features (not normalised) of the learned prompt: ``(C, E)``, or ``(G, C, E)`` for ``ctx`` ``(G, M, D)``.

        ``matrix``: the position-matrix sample (drawn here when ``None``).  Deep prompts apply to ``(M, D)`` ctx.
        """
        if self.anchoropt is not None and matrix is None:
            matrix = self.sample_matrix()
        slots = self.slots(ctx, matrix)
        deep = self.deep_prompts
        if deep is None:
            return self.template.encode_slots(self.layout, slots)
        if slots.dim() != 2:
            raise ValueError("deep text prompts take one context (M, D), not a batch of them")
        if self.anchoropt is not None:
            hooks, n_anchor = self.anchoropt._installed_deep_hooks(), self.anchoropt.n_anchor
        else:
            hooks, n_anchor = self.deep_hooks, 0
            matrix = torch.eye(self.n_ctx, device=slots.device)
        return hooks.encode_slots(self.template, self.layout, slots, matrix, deep, self.n_ctx, n_anchor)

    def anchor_features(self) -> torch.Tensor | None:
        """Frozen anchor-prompt features ``(C, E)``, float32, L2-normalised (``None`` without anchors)."""
        return None if self.anchoropt is None else self.anchoropt.anchor_features()

    def logit_scale(self) -> torch.Tensor:
        """The CLIP model's ``logit_scale.exp()`` (100 when the model has none), float32."""
        scale = getattr(self.tower.model, "logit_scale", None)
        return scale.detach().float().exp() if isinstance(scale, torch.Tensor) else torch.tensor(100.0)

    def remove_hooks(self) -> None:
        """Take the deep hooks off the tower (the prompt cannot run deep afterwards)."""
        hooks = self.anchoropt.deep_hooks if self.anchoropt is not None else getattr(self, "deep_hooks", None)
        if hooks is not None:
            hooks.remove()

    def _coop_template(self, classnames: Sequence[str]) -> AnchorPromptTemplate:
        # CoOp's layout [SOS] [slot] x M {class} . is the normal layout of a template with 0 + M slots
        return AnchorPromptTemplate(self.tower, classnames, n_soft=0, n_anchor=self._n_ctx, preposition=None,
                                    tokenizer=self._tokenizer)


def normalized(features: torch.Tensor) -> torch.Tensor:
    """Float32 L2-normalised features along the last axis."""
    return F.normalize(features.float(), dim=-1)
