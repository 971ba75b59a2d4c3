"""Tiny random-weight CLIP models for tests, examples and benchmarks (like timm's test models).

* :func:`tiny_open_clip`          - an open_clip ``CLIP`` (batch-first, model-level causal mask);
* :func:`tiny_custom_text_clip`   - an open_clip ``CustomTextCLIP`` (tower under ``.text``; can be made
                                    SigLIP-like: bidirectional, last-token pooling);
* :func:`tiny_timm_clip`          - an open_clip ``CustomTextCLIP`` whose image tower is a ``TimmModel`` around a
                                    tiny timm trunk: ``"siglip"`` (timm ``VisionTransformer``, no class token, MAP
                                    pooling, SigLIP-like text) or ``"eva"`` (timm ``Eva`` EVA02 trunk with rope,
                                    class-token pooling), as open_clip's SigLIP / EVA configs build them;
* :func:`tiny_openai_clip`        - an OpenAI-``clip``-shaped model as vendored by CoOp / MaPLe / DePT
                                    (sequence-first blocks, per-block ``attn_mask``, fp16 weights).

All use ``vocab_size=49408`` so the real CLIP BPE tokenizer works.  The weights are random: features mean
nothing, but every code path is the real one.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = [
    "tiny_open_clip",
    "tiny_custom_text_clip",
    "tiny_timm_clip",
    "TIMM_TOWERS",
    "tiny_openai_clip",
    "OpenAIStyleCLIP",
    "CoOpStyleTextEncoder",
    "LayerNormFp32",
    "QuickGELU",
    "add_text_parameters",
    "vit_b16_text_clip",
]

VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77


def _configs(width: int, layers: int, heads: int, image_size: int, text_overrides: dict, vision_layers: int = 1):
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=vision_layers, width=64, head_width=32, patch_size=8, image_size=image_size)
    text = CLIPTextCfg(
        context_length=CONTEXT_LENGTH, vocab_size=VOCAB_SIZE, width=width, heads=heads, layers=layers, **text_overrides
    )
    return vision, text


def tiny_open_clip(
    width: int = 64, layers: int = 2, heads: int = 2, embed_dim: int = 32, image_size: int = 32, seed: int = 0,
    vision_layers: int = 1, **text_overrides,
) -> nn.Module:
    """A random open_clip ``CLIP`` small enough for unit tests (``eval()`` mode, fp32; ``vision_layers``
    ViT blocks of width 64, patch 8)."""
    import open_clip

    torch.manual_seed(seed)
    vision, text = _configs(width, layers, heads, image_size, text_overrides, vision_layers)
    return open_clip.CLIP(embed_dim, vision, text, quick_gelu=True).eval()


def tiny_custom_text_clip(
    width: int = 64, layers: int = 2, heads: int = 2, embed_dim: int = 32, image_size: int = 32, seed: int = 0,
    vision_layers: int = 1, **text_overrides,
) -> nn.Module:
    """A random open_clip ``CustomTextCLIP``; e.g. ``no_causal_mask=True, pool_type="last"`` for a SigLIP-like tower."""
    import open_clip

    torch.manual_seed(seed)
    vision, text = _configs(width, layers, heads, image_size, {"proj_bias": True, **text_overrides}, vision_layers)
    return open_clip.CustomTextCLIP(embed_dim, vision, text).eval()


# open_clip config -> (timm model name, timm_pool, timm_proj, text tower overrides), as open_clip's JSON configs
TIMM_TOWERS = {
    "siglip": ("vit_base_patch16_siglip_224", "map", "none", {"no_causal_mask": True, "pool_type": "last"}),  # ViT-B-16-SigLIP
    "eva": ("eva02_base_patch16_clip_224", "token", None, {}),  # EVA02-B-16
}


def tiny_timm_clip(
    kind: str = "siglip", width: int = 64, layers: int = 3, heads: int = 2, embed_dim: int = 32, image_size: int = 32,
    seed: int = 0, vision_layers: int = 3, **trunk_overrides,
) -> nn.Module:
    """A random open_clip ``CustomTextCLIP`` with a timm image tower (``TimmModel``), shaped like ``kind``'s config.

    The trunk is ``timm.create_model(<the config's timm model>, img_size=image_size, patch_size=8, embed_dim=64,
    depth=vision_layers, num_heads=2, **trunk_overrides)`` with open_clip's pooling / head for that config
    (e.g. ``reg_tokens=1`` or ``global_pool="avg"`` as overrides).  ``"siglip"`` has no projection
    (``timm_proj: "none"``), so its ``embed_dim`` is the trunk width.  No weights are downloaded.
    """
    import open_clip
    import timm

    if kind not in TIMM_TOWERS:
        raise ValueError(f"kind must be one of {sorted(TIMM_TOWERS)}, got {kind!r}")
    name, pool, proj, text_overrides = TIMM_TOWERS[kind]
    vision_width = int(trunk_overrides.get("embed_dim", 64))
    if proj == "none":  # the trunk's pooled feature is the image feature (SigLIP: embed_dim == vision width)
        embed_dim = vision_width
    torch.manual_seed(seed)
    _, text = _configs(width, layers, heads, image_size, {"proj_bias": True, **text_overrides})
    # a tiny registered timm model stands in for the config's while open_clip builds its TimmModel
    vision = open_clip.CLIPVisionCfg(image_size=image_size, timm_model_name="test_vit", timm_pool=pool, timm_proj=proj)
    model = open_clip.CustomTextCLIP(embed_dim, vision, text)
    trunk = dict(img_size=image_size, patch_size=8, embed_dim=vision_width, depth=vision_layers, num_heads=2,
                 num_classes=0 if proj == "none" else embed_dim)  # as TimmModel: no extra proj -> timm's head
    trunk.update(trunk_overrides)
    model.visual.trunk = timm.create_model(name, pretrained=False, global_pool=trunk.pop("global_pool", pool), **trunk)
    return model.eval()


def vit_b16_text_clip(seed: int = 0) -> nn.Module:
    """A random open_clip ``CLIP`` with ViT-B/16's text tower (width 512, 12 layers, 8 heads) - benchmarks."""
    return tiny_open_clip(width=512, layers=12, heads=8, embed_dim=512, seed=seed)


# ---------------------------------------------------------------------- OpenAI-clip layout
class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (as OpenAI clip's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _SequenceFirstBlock(nn.Module):
    """Residual block on ``(L, B, D)`` hidden states that reads its causal mask from ``self.attn_mask``."""

    def __init__(self, width: int, heads: int, attn_mask: torch.Tensor | None):
        super().__init__()
        self.ln_1 = LayerNormFp32(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = LayerNormFp32(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width)
        ))
        self.attn_mask = attn_mask

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        mask = None if self.attn_mask is None else self.attn_mask.to(dtype=x.dtype, device=x.device)
        return self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _SequenceFirstTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask: torch.Tensor | None):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[_SequenceFirstBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class _TinyVisual(nn.Module):
    """Patch embedding + mean pooling + projection: just enough of a vision tower for the shims' contracts."""

    def __init__(self, width: int, output_dim: int, image_size: int, patch: int = 8):
        super().__init__()
        self.input_resolution, self.output_dim = image_size, output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.ln_post = LayerNormFp32(width)
        self.proj = nn.Parameter(torch.randn(width, output_dim) * width**-0.5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.conv1(image.to(self.conv1.weight.dtype)).flatten(2).mean(dim=2)  # (B, width)
        return self.ln_post(x) @ self.proj


def add_text_parameters(model: nn.Module, width: int, embed_dim: int) -> None:
    """Give ``model`` OpenAI clip's text-side tensors around its transformer: ``token_embedding``,
    ``positional_embedding``, ``ln_final``, ``text_projection`` and ``logit_scale`` (random, CLIP-like scales)."""
    model.token_embedding = nn.Embedding(VOCAB_SIZE, width)
    nn.init.normal_(model.token_embedding.weight, std=0.02)
    model.positional_embedding = nn.Parameter(torch.randn(CONTEXT_LENGTH, width) * 0.01)
    model.ln_final = LayerNormFp32(width)
    model.text_projection = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)
    model.logit_scale = nn.Parameter(torch.tensor(4.6052))


class OpenAIStyleCLIP(nn.Module):
    """A CLIP with the OpenAI ``clip`` package's attribute names and sequence-first text transformer."""

    def __init__(self, embed_dim: int, width: int, layers: int, heads: int, image_size: int, causal: bool = True):
        super().__init__()
        mask = torch.full((CONTEXT_LENGTH, CONTEXT_LENGTH), float("-inf")).triu_(1) if causal else None
        self.visual = _TinyVisual(64, embed_dim, image_size)
        self.transformer = _SequenceFirstTransformer(width, layers, heads, mask)
        add_text_parameters(self, width, embed_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image.to(self.dtype))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(text).to(self.dtype) + self.positional_embedding.to(self.dtype)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x).to(self.dtype)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


class CoOpStyleTextEncoder(nn.Module):
    """The CoOp family's ``TextEncoder`` contract: ``forward(prompts (C, L, D), tokenized_prompts (C, L))``
    adds positions, runs the sequence-first transformer, ``ln_final``, pools at ``argmax`` and projects."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.dtype = clip_model.dtype

    def forward(self, prompts: torch.Tensor, tokenized_prompts: torch.Tensor) -> torch.Tensor:
        x = prompts + self.positional_embedding.type(self.dtype)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x).type(self.dtype)
        return x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ self.text_projection


def _to_half(model: OpenAIStyleCLIP) -> OpenAIStyleCLIP:
    """Cast like OpenAI clip's ``build_model``: linear / conv / attention weights and projections to fp16."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.half()
        elif isinstance(module, nn.MultiheadAttention):
            module.half()
    model.text_projection.data = model.text_projection.data.half()
    model.visual.proj.data = model.visual.proj.data.half()
    return model


def tiny_openai_clip(
    width: int = 64, layers: int = 2, heads: int = 2, embed_dim: int = 32, image_size: int = 32, seed: int = 0,
    fp16: bool = True, causal: bool = True,
) -> OpenAIStyleCLIP:
    """A random OpenAI-``clip``-shaped model; fp16 weights by default as ``clip.build_model`` leaves them."""
    torch.manual_seed(seed)
    model = OpenAIStyleCLIP(embed_dim, width, layers, heads, image_size, causal=causal).eval()
    return _to_half(model) if fp16 else model
