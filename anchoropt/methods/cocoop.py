"""CoCoOp (Zhou et al., CVPR 2022) on any open_clip / OpenAI-clip text tower, with the AnchorOPT template as an option.

    image features (B, E) -> L2-normalise -> meta-net: Linear(E, E/16) - ReLU - Linear(E/16, D) -> bias (B, D)
    context per image      ctx (M, D) + bias[b]                                               (B, M, D)
    prompt per image       [SOS] ctx_b {class} . [EOT]               (template="coop")
                           [SOS] P @ [ctx_b; anchors] {class} . [EOT] (template="anchoropt", one P per batch)
    logits[b, c]           scale * <img_b, text_{b,c}>                                        (B, C)

As the released CoCoOp: the meta-net's hidden width is ``E // 16`` (``vis_dim // 16``), its input the
normalised image feature, and every image gets its own text pass over all classes.  Here those ``B``
passes share their ``[SOS] + slots`` prefix per image and stop at each class's EOT (the core's exact
shared-prefix path, :meth:`~anchoropt.TextTower.encode_shared`), instead of ``B`` full 77-token passes.
With anchors (paper Fig. S3) the meta-net bias shifts the context **before** the position matrix, and the
position logits and the meta-net are trained (the released CoCoOp+AnchorOPT freezes both by accident).

Axes: ``B`` images, ``C`` classes, ``M`` context tokens, ``D`` text width, ``E`` joint-embedding width.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from ..losses import StageIILossConfig
from ..towers import TextTower
from .base import PromptMethod
from .text import ContextPrompt, normalized

__all__ = ["CoCoOp", "meta_net"]


def meta_net(feature_dim: int, width: int, device=None) -> nn.Sequential:
    """CoCoOp's meta-net ``Linear(E, E // 16) - ReLU - Linear(E // 16, D)`` (names ``linear1 / relu / linear2``)."""
    hidden = feature_dim // 16
    if hidden < 1:
        raise ValueError(f"the image features are {feature_dim}-wide: CoCoOp's meta-net needs E >= 16 (hidden E // 16)")
    return nn.Sequential(OrderedDict([
        ("linear1", nn.Linear(feature_dim, hidden, device=device)),
        ("relu", nn.ReLU(inplace=True)),
        ("linear2", nn.Linear(hidden, width, device=device)),
    ]))


class CoCoOp(PromptMethod):
    """CoCoOp over a frozen CLIP: ``forward(image_features (B, E)) -> (logits (B, C), logits_anchor | None)``.

    Args:
        model: the frozen CLIP (open_clip ``CLIP`` / ``CustomTextCLIP``, OpenAI-``clip``) or its :class:`TextTower`.
        classnames: the class set.
        template: ``"coop"`` (CoCoOp) or ``"anchoropt"`` (CoCoOp + AnchorOPT; needs ``anchors``).
        n_ctx: ``M`` context tokens (4 as released).
        loss: Stage II loss settings (CE weight; with anchors also KD weight / temperature / normalisation).
        text_options: :class:`~anchoropt.methods.text.ContextPrompt`'s ``anchors`` (``(N, D)`` Stage I
            anchors, required by ``template="anchoropt"``), ``tau``, ``position_init``, ``preposition``,
            ``tokenizer``.
    """

    name = "cocoop"
    takes_images = False

    def __init__(
        self,
        model: nn.Module | TextTower,
        classnames: Sequence[str],
        template: str = "coop",
        n_ctx: int = 4,
        *,
        loss: StageIILossConfig | None = None,
        **text_options,
    ):
        super().__init__(ContextPrompt(model, classnames, template, n_ctx, **text_options), loss)
        tower = self.text.tower
        self.meta_net = meta_net(tower.output_dim, tower.width, device=tower.device)

    def features(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image_features (B, E), text (B, C, E))``: every image's own text features (not normalised)."""
        return image_features, self.text_features(image_features, normalize=False)

    def text_features(
        self, image_features: torch.Tensor, matrix: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """Image-conditioned text features ``(B, C, E)`` (float32, L2-normalised unless ``normalize=False``)."""
        if image_features.dim() != 2:
            raise ValueError(f"expected image features of shape (B, E), got {tuple(image_features.shape)}")
        first = self.meta_net.linear1
        if image_features.shape[1] != first.in_features:
            raise ValueError(
                f"image features are {image_features.shape[1]}-wide but the meta-net takes {first.in_features}"
            )
        image = normalized(image_features).to(first.weight.device)
        bias = self.meta_net(image.to(first.weight.dtype))  # (B, D)
        ctx = self.text.ctx[None] + bias[:, None].to(self.text.ctx.dtype)  # (B, M, D)
        features = self.text.features(ctx, matrix)
        return normalized(features) if normalize else features
