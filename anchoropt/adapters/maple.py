"""MaPLe + AnchorOPT: inject AnchorOPT into MaPLe's ``MultiModalPromptLearner`` (``trainers/maple.py``).

Input layer, paper S2.2.4 / Fig. S4: the initial text soft tokens are mapped to visual tokens
(``proj(ctx)``, MaPLe's own output #2) **before** the position matrix; only the text prompt (output #1) is
arranged as ``[SOS] P @ [ctx; anchors] class . [EOT]``.  The learner keeps returning MaPLe's 4-tuple
``(prompts, proj(ctx), compound_prompts_text, visual_deep_prompts)``.

Deep part (paper Fig. S4 / S6, "retain the anchors, drop and re-introduce the soft tokens"): MaPLe's text
blocks ``1 .. PROMPT_DEPTH-1`` normally overwrite rows ``[1, 1 + n_ctx)`` with ``compound_prompts_text``.
With ``deep=True`` (default) the shim installs :mod:`anchoropt.deep`'s hooks on those blocks: at each of them
the ``M + N`` slot rows become ``P @ [compound_prompts_text[i-1]; anchor hidden states]`` with the **same**
position-matrix sample as the input layer, the anchors' hidden states read at the anchors' own slots, and
MaPLe's own overwrite suppressed.  The compound prompts are rounded to fp16 first, each class's copy (value and
gradient), exactly as MaPLe's block does (``.half()``, in fp32 too).  The hooks act only on the text pass right after the learner's rewrite, and
only when it carries the learner's ``C`` prompts and compound prompts: after a bare ``prompt_learner()`` call,
an unrelated pass through the tower is untouched.  MaPLe's vision side (``proj(ctx)`` and the deep visual prompts) is
untouched.  ``deep=False`` keeps MaPLe's own overwrite (then only the last ``N`` slots carry their hidden
states - not the paper's design; a warning says so).

Anchor logits use CLIP's **vanilla** image features by default (MaPLe's image encoder run without its
prompts, as the authors do with a second CLIP), so one extra frozen image pass per step;
``anchor_image="model"`` uses MaPLe's prompted image features instead (no extra pass).

Peer bug handled: MaPLe calls ``self.proj.half()`` unconditionally, so ``proj(ctx)`` fails under fp32 and
(outside CUDA autocast) amp.  The shim casts ``proj`` to the dtype of ``ctx`` (and back on ``remove()``).

Docs: ``docs/integrations/maple.md``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..deep import DeepAnchorHooks, attach_deep
from ..towers import TextTower, swap_block_masks
from .base import AnchorOPTInjection
from .inputs import warn_once

__all__ = ["MaPLeInjection", "ListProtocolTextTower", "patch", "wrap", "ANCHOR_IMAGE"]

ANCHOR_IMAGE = ("vanilla", "model")


class ListProtocolTextTower(TextTower):
    """:class:`~anchoropt.TextTower` for MaPLe-built CLIPs, whose blocks take and return ``[x, prompts, counter]``.

    The anchor prompt runs with no deep prompts (``[x, [], 0]``), i.e. through the vanilla CLIP text tower.
    """

    def run_transformer(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        with swap_block_masks(self.blocks, attn_mask):
            outputs = self.transformer([x.permute(1, 0, 2), [], 0])
        return outputs[0].permute(1, 0, 2)


class MaPLeInjection(AnchorOPTInjection):
    """AnchorOPT on a MaPLe ``MultiModalPromptLearner`` (4-tuple output)."""

    peer_class_attr = "MultiModalPromptLearner"
    defaults = {"kd_weight": 10.0, "anchor_image": "vanilla", "deep": True}
    kind = "maple"
    _peer_name = "MaPLe MultiModalPromptLearner"

    def __init__(self, prompt_learner: nn.Module, *, anchor_image: str = "vanilla", deep: bool = True, **kwargs: Any):
        if anchor_image not in ANCHOR_IMAGE:
            raise ValueError(f"anchor_image must be one of {ANCHOR_IMAGE}, got {anchor_image!r}")
        super().__init__(prompt_learner, **kwargs)
        self.anchor_image = anchor_image
        self._vanilla: torch.Tensor | None = None
        self._deep_hooks: DeepAnchorHooks | None = None
        self._deep_context: contextlib.AbstractContextManager | None = None
        self._deep_armed = False
        depth = len(getattr(prompt_learner, "compound_prompts_text", ()))
        try:
            if deep and depth > 0:
                self._attach_deep(depth)
        except BaseException:
            self.remove()
            raise
        if not deep and depth > 0:
            warn_once(
                f"MaPLe PROMPT_DEPTH={depth + 1} with deep=False: MaPLe's own blocks overwrite rows [1, 1+n_ctx) at "
                "layers 1..depth-1, so an anchor's hidden state survives only in the last n_anchor slots; the "
                "paper's deep variant is deep=True (TRAINER.ANCHOROPT.DEEP True)"
            )

    # ------------------------------------------------------------------ deep variant
    @property
    def deep(self) -> bool:
        return self._deep_hooks is not None

    def _attach_deep(self, depth: int) -> None:
        text = self._clip.transformer
        self._deep_hooks = attach_deep(text, depth, batch_first=False)  # MaPLe blocks: [x (L, C, D), prompts, counter]
        self._hooks += [
            text.register_forward_pre_hook(self._deep_enter),
            text.register_forward_hook(self._deep_exit, always_call=True),
        ]

    def after_rewrite(self) -> None:
        self._deep_armed = self._deep_hooks is not None  # the next text pass encodes these prompts

    def _deep_enter(self, module: nn.Module, args: tuple) -> None:
        armed, self._deep_armed = self._deep_armed, False  # one rewrite arms at most the next text pass
        if self._busy or not armed or self.last_matrix is None or not self._encodes_our_prompts(args):
            return
        self._close_deep()
        # prompts=None: each block's own compound prompt, compound_prompts_text[counter]
        context = self._deep_hooks.active(self.last_matrix, self.n_soft, self.n_anchor)
        context.__enter__()
        self._deep_context = context

    def _encodes_our_prompts(self, args: tuple) -> bool:
        """Whether a text pass's input ``[x (L, C, D), compound_prompts, counter]`` holds this learner's prompts
        (C classes, enough compound prompts): after a bare ``prompt_learner()`` call, an unrelated pass through
        the tower (another model's, a vanilla ``[x, [], 0]`` one) is left alone."""
        inputs = args[0] if args else None
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 3 or not isinstance(inputs[0], torch.Tensor):
            return False
        x, compound = inputs[0], inputs[1]
        return (
            x.dim() == 3 and x.shape[1] == self._pool_index.shape[0]
            and len(compound) >= self._deep_hooks.depth
        )

    def _deep_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._close_deep()

    def _close_deep(self) -> None:
        context, self._deep_context = self._deep_context, None
        if context is not None:
            context.__exit__(None, None, None)

    def remove(self) -> None:
        self._close_deep()
        if self._deep_hooks is not None:
            self._deep_hooks.remove()
            self._deep_hooks = None
        super().remove()

    # ------------------------------------------------------------------ learner protocol
    def check_learner(self, learner: nn.Module) -> None:
        if not isinstance(getattr(learner, "proj", None), nn.Module):
            raise TypeError(f"{type(learner).__name__} has no proj: not a MaPLe MultiModalPromptLearner")
        if not hasattr(learner, "compound_prompts_text"):
            raise TypeError(f"{type(learner).__name__} has no compound_prompts_text: not a MaPLe prompt learner")

    def _prepare_learner(self, learner: nn.Module) -> None:
        proj_dtype, ctx_dtype = learner.proj.weight.dtype, learner.ctx.dtype
        self._proj_dtype = proj_dtype if proj_dtype != ctx_dtype else None
        if self._proj_dtype is not None:  # MaPLe's unconditional proj.half() (trainers/maple.py)
            learner.proj.to(ctx_dtype)

    def _undo_prepare(self, learner: nn.Module) -> None:
        if getattr(self, "_proj_dtype", None) is not None:
            learner.proj.to(self._proj_dtype)
            self._proj_dtype = None

    def prompts_of(self, output: Any) -> torch.Tensor:
        if not isinstance(output, (tuple, list)) or len(output) != 4 or not isinstance(output[0], torch.Tensor):
            raise TypeError(
                "expected MaPLe's (prompts, proj(ctx), compound_prompts_text, visual_deep_prompts) from the "
                f"prompt learner, got a {type(output).__name__}"
            )
        return output[0]

    def with_prompts(self, output: Any, prompts: torch.Tensor) -> Any:
        return type(output)([prompts, *output[1:]]) if isinstance(output, list) else (prompts, *output[1:])

    def make_tower(self, clip_model: nn.Module) -> TextTower:
        return ListProtocolTextTower(clip_model)

    # ------------------------------------------------------------------ anchor branch image features
    def anchor_image_features(self) -> torch.Tensor:
        if self.anchor_image == "model":
            return self.captured_image_features()
        args = self._visual_args
        if args is None or len(args) < 2 or not isinstance(args[1], torch.Tensor):
            raise RuntimeError(
                "no MaPLe image-encoder call was captured: run the model on a batch first, or pass "
                "image_features= (or build the shim with anchor_image='model')"
            )
        if self._vanilla is None:  # once per model forward (reset by the image encoder's pre-hook)
            image, shared_ctx = args[0], args[1]
            with torch.no_grad(), self._busy_scope():
                self._vanilla = self._clip.visual(image, shared_ctx[..., :0, :], [])
        return self._vanilla

    def _visual_pre_hook(self, module: nn.Module, args: tuple) -> None:
        super()._visual_pre_hook(module, args)
        if not self._busy:
            self._vanilla = None

    def clear(self) -> None:
        super().clear()
        self._vanilla = None


wrap = MaPLeInjection.wrap
"""Attach AnchorOPT to a built MaPLe ``MultiModalPromptLearner`` (``clip_model``: the MaPLe-built CLIP).

MaPLe-only options: ``deep`` (default True: the deep variant on text blocks ``1 .. PROMPT_DEPTH-1``) and
``anchor_image`` (``"vanilla"``, default, or ``"model"``)."""

patch = MaPLeInjection.patch
"""Replace ``module.MultiModalPromptLearner`` (e.g. ``trainers.maple``); also covers DePT's ELP-MaPLe."""
