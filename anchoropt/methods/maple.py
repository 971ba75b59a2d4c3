"""MaPLe (Khattak et al., CVPR 2023) on open_clip's text and vision transformers, with the AnchorOPT template as an option.

    text   input   [SOS] ctx (M, D) {class} . [EOT]            (template="anchoropt": P @ [ctx; anchors])
           blocks 1 .. J   ctx rows <- compound_prompts_text[j-1] (J, M, D)  (anchors' hidden states carried)
    vision input   [CLS] patches ++ proj(ctx) (M, Dv)           coupling: one Linear(D, Dv)
           blocks 1 .. J   last M rows <- compound_prompt_projections[j-1](compound_prompts_text[j-1])
    logits        scale * cos(prompted image feature, prompted text feature)                     (B, C)

``J = prompt_depth - 1`` (MaPLe's ``PROMPT_DEPTH``, 9 as released -> 8 deep layers), ``M = n_ctx`` (2 as
released for MaPLe, 4-8 in the AnchorOPT tables).  The text side is :class:`~anchoropt.methods.text.ContextPrompt`
with deep prompts - the core's deep hooks and its exact shared-prefix path; with anchors it is the deep
AnchorOPT variant (the same position-matrix sample at every layer, the anchors' own hidden states carried),
as the MaPLe shim does.  The shared vision prompt is ``proj(ctx)`` of the **un-arranged** context (paper
Fig. S4, the released MaPLe+AnchorOPT).  The vision side is :class:`~anchoropt.methods.vision.VisionPrompts`.

Anchor logits (with anchors) use CLIP's **vanilla** image features (no vision prompts), as the authors' second,
unprompted CLIP does (``anchor_image="model"`` uses the prompted ones: no extra image pass).

Image towers (:mod:`~anchoropt.methods.image_towers`): open_clip's ``VisionTransformer`` and open_clip's timm
towers with a timm ``VisionTransformer`` (SigLIP / SigLIP2, MAP pooling) or ``Eva`` (EVA02, rope) trunk.  The
prompts are stripped before the final norm / pooling: exactly MaPLe for class-token pooling, our extension for
average / attention / MAP pooling (MaPLe only had CLS pooling).

Context init: random ``N(0, 0.02^2)`` unless ``ctx_init``; released MaPLe's ``ctx_init="a photo of a"`` with
``n_ctx=2`` initialises the context from "a photo" and keeps "of a" as fixed words,
``[SOS] ctx_1 ctx_2 of a {class} . [EOT]`` (the registry's ``maple`` under ``released_settings`` / ``--preset``;
the released ``+anchoropt`` trainer ignores ``CTX_INIT``).

Axes: ``B`` images, ``C`` classes, ``M`` context tokens, ``J`` deep layers, ``D`` text width, ``Dv`` vision width.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from ..losses import StageIILossConfig
from ..towers import TextTower
from .base import MethodOutput, PromptMethod
from .text import ContextPrompt
from .vision import VisionPrompts, vision_blocks

__all__ = ["MaPLe", "ANCHOR_IMAGE"]

ANCHOR_IMAGE = ("vanilla", "model")


class MaPLe(PromptMethod):
    """MaPLe over a frozen open_clip model: ``forward(images (B, 3, H, W)) -> (logits (B, C), logits_anchor | None)``.

    Args:
        model: the frozen open_clip ``CLIP`` / ``CustomTextCLIP`` (image tower: an open_clip ``VisionTransformer``,
            or a ``TimmModel`` around a timm ``VisionTransformer`` / ``Eva``).
        classnames: the class set.
        template: ``"coop"`` (MaPLe) or ``"anchoropt"`` (MaPLe + AnchorOPT, deep variant; needs ``anchors``).
        n_ctx: ``M`` context tokens (2 as released).
        prompt_depth: MaPLe's ``PROMPT_DEPTH`` (9 as released): deep prompts for blocks ``1 .. prompt_depth - 1``
            of both towers (each needs at least ``prompt_depth`` blocks).
        anchor_image: ``"vanilla"`` (default) or ``"model"`` image features for the anchor logits.
        fp16_prompts: released MaPLe's ``.half()`` on the prompts it injects, also in fp32 (default off: ours
            keeps them in the towers' precision).  On, every injected copy - the shared vision prompts per image,
            the deep vision prompts per image, the deep text prompts per class - is rounded to fp16, in value
            and in its gradient, exactly as ``clip/model.py`` of the release; the layer-0 text context is not
            (the release does not round it either).  The text side then runs per class (no shared prefix),
            as the release does.  ``maple:fp16_prompts=true``; the released settings (``--preset``) set it.
        loss: Stage II loss settings.
        text_options: :class:`~anchoropt.methods.text.ContextPrompt`'s ``anchors``, ``tau``, ``tokenizer`` ...
    """

    name = "maple"
    takes_images = True

    def __init__(
        self,
        model: nn.Module,
        classnames: Sequence[str],
        template: str = "coop",
        n_ctx: int = 2,
        *,
        prompt_depth: int = 9,
        anchor_image: str = "vanilla",
        fp16_prompts: bool = False,
        loss: StageIILossConfig | None = None,
        **text_options,
    ):
        if isinstance(prompt_depth, bool) or not isinstance(prompt_depth, int) or prompt_depth < 1:
            raise ValueError(f"prompt_depth must be an int >= 1, got {prompt_depth!r}")
        if anchor_image not in ANCHOR_IMAGE:
            raise ValueError(f"anchor_image must be one of {ANCHOR_IMAGE}, got {anchor_image!r}")
        visual = getattr(model, "visual", None)
        if isinstance(model, TextTower) or not isinstance(visual, nn.Module):
            raise TypeError("MaPLe prompts both towers: pass the CLIP model itself (with .visual), not a text tower")
        depth = prompt_depth - 1
        blocks = vision_blocks(visual)
        if blocks and depth > blocks - 1:
            raise ValueError(f"prompt_depth {prompt_depth} needs {prompt_depth} vision blocks; this tower has {blocks}")
        super().__init__(None, loss)
        if not isinstance(fp16_prompts, bool):
            raise ValueError(f"fp16_prompts must be True or False, got {fp16_prompts!r}")
        # checks the image tower before the text hooks go on
        self.vision = VisionPrompts(visual, n_ctx, depth, round_fp16=fp16_prompts)
        try:
            self.text = ContextPrompt(model, classnames, template, n_ctx, deep_depth=depth, **text_options)
        except BaseException:
            self.vision.remove()
            raise
        self.text.fp16_deep_prompts = fp16_prompts
        self.prompt_depth, self.anchor_image, self.fp16_prompts = prompt_depth, anchor_image, fp16_prompts
        width, device = self.vision.tower.width, self.text.tower.device
        self.proj = nn.Linear(self.text.tower.width, width, device=device)
        single = nn.Linear(self.text.tower.width, width, device=device)  # MaPLe clones one layer J times
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(single) for _ in range(depth)])
        self._visual = [visual]  # a plain reference: the frozen tower is not part of this module's state

    @property
    def visual(self) -> nn.Module:
        return self._visual[0]

    def vision_prompts(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(shared (M, Dv), deep (J, M, Dv) or None)``: the text prompts coupled to the vision side."""
        shared = self.proj(self.text.ctx)
        deep = self.text.deep_prompts
        if deep is None:
            return shared, None
        return shared, torch.stack([layer(deep[j]) for j, layer in enumerate(self.compound_prompt_projections)])

    def encode_images(self, images: torch.Tensor, prompted: bool = True) -> torch.Tensor:
        """Image features ``(B, E)`` (not normalised), with MaPLe's vision prompts unless ``prompted=False``."""
        if images.dim() != 4:
            raise ValueError(f"MaPLe takes images (B, 3, H, W), got a tensor of shape {tuple(images.shape)}")
        images = images.to(device=self.proj.weight.device, dtype=self.vision.tower.dtype)
        if not prompted:
            with torch.no_grad():
                return self.visual(images)
        shared, deep = self.vision_prompts()
        with self.vision.active(shared, deep):
            return self.visual(images)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompted image features (B, E), text features (C, E))``, not normalised."""
        return self.encode_images(images), self.text.features()

    def forward(self, images: torch.Tensor) -> MethodOutput:
        image, text = self.features(images)
        return self.output(self.similarity(image, text), self.anchor_from(images, image))

    def anchor_from(self, images: torch.Tensor, prompted: torch.Tensor) -> torch.Tensor | None:
        """Anchor logits ``(B, C)`` from vanilla (or, ``anchor_image="model"``, the prompted) image features."""
        if not self.has_anchors:
            return None
        image = prompted.detach() if self.anchor_image == "model" else self.encode_images(images, prompted=False)
        return self.anchor_logits(image)

    def remove_hooks(self) -> None:
        """Take MaPLe's hooks off both towers (the module cannot run afterwards)."""
        self.vision.remove()
        self.text.remove_hooks()
