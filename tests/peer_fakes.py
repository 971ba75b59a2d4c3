"""Contract fakes of the peers' prompt-learning code, written from ``peer_interfaces.md`` §1-5 (no peer code).

Same attribute names, shapes, buffers, dtypes, return types and call protocols as:

* the vendored OpenAI ``clip`` package: :func:`tokenize` (``(N, 77)`` int ids, raises on overflow), a
  sequence-first text tower with per-block ``attn_mask`` and fp16 weights (``anchoropt.testing.tiny_openai_clip``);
* CoOp (``trainers/coop.py``): :data:`coop` - ``TextEncoder``, ``PromptLearner(cfg, classnames, clip_model)``
  (ctx / token_prefix / token_suffix / tokenized_prompts / n_cls / n_ctx / name_lens / class_token_position;
  end / middle / front), ``CustomCLIP`` (``tokenized_prompts`` an alias of the learner's tensor);
* CoCoOp (``trainers/cocoop.py``): :data:`cocoop` - ``meta_net`` (linear1, relu, linear2), prompts
  ``(B, n_cls, 77, D)``, ``CustomCLIP`` encoding text once per image and returning CE in training;
* MaPLe (``clip/model.py`` + ``trainers/maple.py``): :func:`tiny_maple_clip` with ``[x, prompts, counter]``
  blocks, a vision tower taking ``(image, shared_ctx, deep_prompts)``, :data:`maple` -
  ``MultiModalPromptLearner`` (4-tuple output, ``proj.half()`` unconditionally), ``TextEncoder``, ``CustomCLIP``;
  widths are the tiny tower's (the real one hard-codes 512 / 768);
* DePT (``trainers/elp_coop.py``): :data:`dept` - ``CustomCLIP`` subclassing CoOp's with ``film_lp_img``,
  ``film_lp_text``, ``linear_probe_proj`` and ``_forward_base`` / ``_forward_new``;
* Dassl's trainer steps the shims meet: :func:`build_model` (freeze by name, optimizer from the registered
  module) and :func:`dassl_load` (drop ``token_prefix`` / ``token_suffix``, ``load_state_dict(strict=False)``).

Each method's classes live in a namespace module (``coop.PromptLearner`` ...): ``CustomCLIP`` looks the prompt
learner class up there at construction time, as the real ``CustomCLIP`` reads its module global - which is
what class-level patching relies on.
"""

from __future__ import annotations

import types
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from anchoropt.template import default_tokenizer
from anchoropt.testing import CoOpStyleTextEncoder, LayerNormFp32, QuickGELU, add_text_parameters, tiny_openai_clip

CONTEXT_LENGTH = 77
_BPE = default_tokenizer()  # the CLIP BPE (the peers ship the same vocabulary)


# ---------------------------------------------------------------------- the vendored `clip` package
def tokenize(texts, context_length: int = CONTEXT_LENGTH, truncate: bool = False) -> torch.Tensor:
    """OpenAI ``clip.tokenize`` contract: ``[SOT] bpe [EOT]`` zero-padded, int32, RuntimeError on overflow."""
    if isinstance(texts, str):
        texts = [texts]
    rows = [[_BPE.sot_token_id, *_BPE.encode(text), _BPE.eot_token_id] for text in texts]
    out = torch.zeros(len(rows), context_length, dtype=torch.int)
    for i, row in enumerate(rows):
        if len(row) > context_length:
            if not truncate:
                raise RuntimeError(f"Input {texts[i]} is too long for context length {context_length}")
            row = row[:context_length]
            row[-1] = _BPE.eot_token_id
        out[i, : len(row)] = torch.tensor(row)
    return out


class _SimpleTokenizer:
    def encode(self, text: str) -> list[int]:
        return _BPE.encode(text)


clip = types.SimpleNamespace(tokenize=tokenize)  # the trainer modules' `from clip import clip`


def make_cfg(
    method: str = "coop",
    n_ctx: int = 4,
    ctx_init: str = "",
    prec: str = "fp32",
    csc: bool = False,
    class_token_position: str = "end",
    subsample: str = "base",
    depth: int = 3,
    image_size: int = 32,
    **anchoropt,
) -> types.SimpleNamespace:
    """A tiny nested cfg with the keys the peers read (``TRAINER.<M>.*``, ``INPUT.SIZE``, ``DATASET.*``)."""
    ns = types.SimpleNamespace
    trainer = ns(
        COOP=ns(N_CTX=n_ctx, CTX_INIT=ctx_init, CSC=csc, CLASS_TOKEN_POSITION=class_token_position, PREC=prec),
        COCOOP=ns(N_CTX=n_ctx, CTX_INIT=ctx_init, PREC=prec),
        MAPLE=ns(N_CTX=n_ctx, CTX_INIT=ctx_init, PREC=prec, PROMPT_DEPTH=depth),
        LINEAR_PROBE=ns(TYPE="linear", WEIGHT=0.7, TEST_TIME_FUSION=True),
        FILM=ns(LINEAR_PROBE=True),
        NAMES_TO_UPDATE=["prompt_learner", "linear_probe", "film"],
        NAME={"coop": "CoOp", "cocoop": "CoCoOp", "maple": "MaPLe", "dept": "ExtrasLinearProbeCoOp"}[method],
    )
    if anchoropt:
        trainer.ANCHOROPT = ns(**anchoropt)
    return ns(
        TRAINER=trainer,
        INPUT=ns(SIZE=(image_size, image_size)),
        DATASET=ns(SUBSAMPLE_CLASSES=subsample, NAME="Caltech101"),
        OPTIM=ns(NAME="sgd", LR=0.002, MOMENTUM=0.9, WEIGHT_DECAY=5e-4),
    )


def tiny_clip(prec: str = "fp32", seed: int = 0) -> nn.Module:
    """``load_clip_to_cpu`` + the trainers' precision step: fp16 weights, ``.float()`` for fp32 / amp."""
    model = tiny_openai_clip(fp16=True, seed=seed)
    return model.float() if prec in ("fp32", "amp") else model


def _ctx_and_prefix(cfg_node, n_cls: int, clip_model, csc: bool = False):
    """The peers' context init: words of CTX_INIT (n_ctx overridden) or N(0, .02) in clip dtype."""
    n_ctx, ctx_init, dtype = cfg_node.N_CTX, cfg_node.CTX_INIT, clip_model.dtype
    width = clip_model.ln_final.weight.shape[0]
    if ctx_init:
        ctx_init = ctx_init.replace("_", " ")
        n_ctx = len(ctx_init.split(" "))
        with torch.no_grad():
            embedding = clip_model.token_embedding(tokenize(ctx_init).long()).type(dtype)
        return embedding[0, 1 : 1 + n_ctx].clone(), ctx_init, n_ctx
    shape = (n_cls, n_ctx, width) if csc else (n_ctx, width)
    ctx = torch.empty(*shape, dtype=dtype)
    nn.init.normal_(ctx, std=0.02)
    return ctx, " ".join(["X"] * n_ctx), n_ctx


def _class_tokens(module: nn.Module, classnames, prompt_prefix: str, n_ctx: int, clip_model) -> None:
    classnames = [name.replace("_", " ") for name in classnames]
    module.name_lens = [len(_SimpleTokenizer().encode(name)) for name in classnames]
    prompts = [prompt_prefix + " " + name + "." for name in classnames]
    tokenized = torch.cat([tokenize(p) for p in prompts])
    with torch.no_grad():
        embedding = clip_model.token_embedding(tokenized.long()).type(clip_model.dtype)
    module.register_buffer("token_prefix", embedding[:, :1, :])
    module.register_buffer("token_suffix", embedding[:, 1 + n_ctx :, :])
    module.n_cls, module.n_ctx = len(classnames), n_ctx
    module.tokenized_prompts = tokenized  # plain attribute: not a buffer, never moved, never saved


# ---------------------------------------------------------------------- CoOp
TextEncoder = CoOpStyleTextEncoder  # CoOp's TextEncoder (CoCoOp's and DePT's are the same code)


class CoOpPromptLearner(nn.Module):
    def __init__(self, cfg, classnames, clip_model):
        super().__init__()
        node = cfg.TRAINER.COOP
        assert cfg.INPUT.SIZE[0] == clip_model.visual.input_resolution
        ctx, prefix, n_ctx = _ctx_and_prefix(node, len(classnames), clip_model, csc=node.CSC and not node.CTX_INIT)
        self.ctx = nn.Parameter(ctx)
        _class_tokens(self, classnames, prefix, n_ctx, clip_model)
        self.class_token_position = node.CLASS_TOKEN_POSITION

    def forward(self):
        ctx = self.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        prefix, suffix = self.token_prefix, self.token_suffix
        if self.class_token_position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        rows = []
        for i in range(self.n_cls):
            n = self.name_lens[i]
            name, rest = suffix[i : i + 1, :n], suffix[i : i + 1, n:]
            if self.class_token_position == "middle":
                half = self.n_ctx // 2
                parts = [prefix[i : i + 1], ctx[i : i + 1, :half], name, ctx[i : i + 1, half:], rest]
            elif self.class_token_position == "front":
                parts = [prefix[i : i + 1], name, ctx[i : i + 1], rest]
            else:
                raise ValueError
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows, dim=0)


class CoOpCustomCLIP(nn.Module):
    def __init__(self, cfg, classnames, clip_model):
        super().__init__()
        self.prompt_learner = coop.PromptLearner(cfg, classnames, clip_model)  # module-global lookup
        self.tokenized_prompts = self.prompt_learner.tokenized_prompts
        self.image_encoder = clip_model.visual
        self.text_encoder = TextEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale
        self.dtype = clip_model.dtype

    def forward(self, image):
        image_features = self.image_encoder(image.type(self.dtype))
        text_features = self.text_encoder(self.prompt_learner(), self.tokenized_prompts)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        return self.logit_scale.exp() * image_features @ text_features.t()


# ---------------------------------------------------------------------- CoCoOp
class CoCoOpPromptLearner(nn.Module):
    def __init__(self, cfg, classnames, clip_model):
        super().__init__()
        node = cfg.TRAINER.COCOOP
        assert cfg.INPUT.SIZE[0] == clip_model.visual.input_resolution
        ctx, prefix, n_ctx = _ctx_and_prefix(node, len(classnames), clip_model)
        self.ctx = nn.Parameter(ctx)
        vis_dim, ctx_dim = clip_model.visual.output_dim, clip_model.ln_final.weight.shape[0]
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, max(vis_dim // 16, 1))),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(max(vis_dim // 16, 1), ctx_dim)),
        ]))
        if node.PREC == "fp16":
            self.meta_net.half()
        _class_tokens(self, classnames, prefix, n_ctx, clip_model)

    def construct_prompts(self, ctx, prefix, suffix, label=None):
        if label is not None:
            prefix, suffix = prefix[label], suffix[label]
        return torch.cat([prefix, ctx, suffix], dim=1)

    def forward(self, im_features):
        bias = self.meta_net(im_features).unsqueeze(1)  # (B, 1, D)
        ctx_shifted = self.ctx.unsqueeze(0) + bias  # (B, n_ctx, D)
        prompts = [
            self.construct_prompts(c.unsqueeze(0).expand(self.n_cls, -1, -1), self.token_prefix, self.token_suffix)
            for c in ctx_shifted
        ]
        return torch.stack(prompts)  # (B, n_cls, L, D)


class CoCoOpCustomCLIP(nn.Module):
    def __init__(self, cfg, classnames, clip_model):
        super().__init__()
        self.prompt_learner = cocoop.PromptLearner(cfg, classnames, clip_model)
        self.tokenized_prompts = self.prompt_learner.tokenized_prompts
        self.image_encoder = clip_model.visual
        self.text_encoder = TextEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale
        self.dtype = clip_model.dtype

    def forward(self, image, label=None):
        logit_scale = self.logit_scale.exp()
        image_features = self.image_encoder(image.type(self.dtype))
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        prompts = self.prompt_learner(image_features)
        logits = []
        for pts_i, imf_i in zip(prompts, image_features):  # one text pass per image
            text_features = self.text_encoder(pts_i, self.tokenized_prompts)
            text_features = text_features / text_features.norm(dim=-1, keepdim=True)
            logits.append(logit_scale * imf_i @ text_features.t())
        logits = torch.stack(logits)
        if self.prompt_learner.training:
            return F.cross_entropy(logits, label)
        return logits


# ---------------------------------------------------------------------- MaPLe: CLIP with list-protocol blocks
class MaPLeBlock(nn.Module):
    """``ResidualAttentionBlock_MaPLe``: ``forward([x, compound_prompts_deeper, counter])`` -> the same list.

    Layers after the first replace, while prompts are left: text rows ``[1, 1 + n_ctx)``, vision the last
    ``n_ctx`` rows, with the layer's prompt cast ``.half()`` (promoted back by ``cat`` in fp32), then
    ``counter += 1``.
    """

    def __init__(self, width, heads, attn_mask, n_ctx, text_layer, index):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = LayerNormFp32(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width)
        ))
        self.ln_2 = LayerNormFp32(width)
        self.text_layer, self.attn_mask = text_layer, attn_mask
        self.compound_prompt_nctx = n_ctx
        self.first_layer = index == 0

    def attention(self, x):
        self.attn_mask = self.attn_mask.to(dtype=x.dtype, device=x.device) if self.attn_mask is not None else None
        return self.attn(x, x, x, need_weights=False, attn_mask=self.attn_mask)[0]

    def forward(self, inputs):
        x, prompts, counter = inputs[0], inputs[1], inputs[2]
        if not self.first_layer and len(prompts) > 0 and not counter > len(prompts) - 1:
            n = self.compound_prompt_nctx
            layer = prompts[counter].expand(x.shape[1], -1, -1).permute(1, 0, 2).half()
            if self.text_layer:
                x = torch.cat([x[:1], layer, x[1 + n :]], dim=0)
            else:
                x = torch.cat([x[: x.shape[0] - n], layer], dim=0)
            counter += 1
        x = x + self.attention(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return [x, prompts, counter]


class MaPLeTransformer(nn.Module):
    def __init__(self, width, layers, heads, attn_mask, n_ctx, text_layer):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[MaPLeBlock(width, heads, attn_mask, n_ctx, text_layer, i) for i in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class MaPLeVisual(nn.Module):
    """``VisionTransformer_MaPLe``: ``forward(x, shared_ctx, compound_deeper_prompts)``; appends ``shared_ctx.half()``."""

    def __init__(self, image_size, patch, width, layers, heads, output_dim, n_ctx):
        super().__init__()
        self.input_resolution, self.output_dim, self.width = image_size, output_dim, width
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((image_size // patch) ** 2 + 1, width))
        self.ln_pre = LayerNormFp32(width)
        self.transformer = MaPLeTransformer(width, layers, heads, None, n_ctx, text_layer=False)
        self.ln_post = LayerNormFp32(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.VPT_shallow = True

    def forward(self, x, shared_ctx, compound_deeper_prompts):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = torch.cat([x, shared_ctx.expand(x.shape[0], -1, -1).half()], dim=1)
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer([x, compound_deeper_prompts, 0])[0].permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class MaPLeCLIP(nn.Module):
    """A MaPLe-built CLIP (``design_details["trainer"] == "MaPLe"``): ``encode_text`` / ``encode_image`` are
    broken there (list protocol, missing ``shared_ctx``), so this fake has none."""

    def __init__(self, width=64, layers=3, heads=2, embed_dim=32, image_size=32, vision_width=48, n_ctx=2):
        super().__init__()
        mask = torch.full((CONTEXT_LENGTH, CONTEXT_LENGTH), float("-inf")).triu_(1)
        self.visual = MaPLeVisual(image_size, 8, vision_width, 2, 2, embed_dim, n_ctx)
        self.transformer = MaPLeTransformer(width, layers, heads, mask, n_ctx, text_layer=True)
        add_text_parameters(self, width, embed_dim)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype


def tiny_maple_clip(prec: str = "fp32", n_ctx: int = 2, seed: int = 0, **kwargs) -> MaPLeCLIP:
    """``clip.build_model(state_dict, design_details)``: fp16 conversion, then ``.float()`` for fp32 / amp."""
    torch.manual_seed(seed)
    model = MaPLeCLIP(n_ctx=n_ctx, **kwargs).eval()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)):
            module.half()
    for p in (model.text_projection, model.visual.proj):
        p.data = p.data.half()
    return model.float() if prec in ("fp32", "amp") else model


class MaPLeTextEncoder(TextEncoder):
    def forward(self, prompts, tokenized_prompts, compound_prompts_deeper_text):
        x = prompts + self.positional_embedding.type(self.dtype)
        x = self.transformer([x.permute(1, 0, 2), compound_prompts_deeper_text, 0])[0].permute(1, 0, 2)
        x = self.ln_final(x).type(self.dtype)
        return x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ self.text_projection


class MultiModalPromptLearner(nn.Module):
    def __init__(self, cfg, classnames, clip_model):
        super().__init__()
        node = cfg.TRAINER.MAPLE
        assert node.PROMPT_DEPTH >= 1 and cfg.INPUT.SIZE[0] == clip_model.visual.input_resolution
        n_ctx, dtype = node.N_CTX, clip_model.dtype
        ctx_dim, vis_width = clip_model.ln_final.weight.shape[0], clip_model.visual.width
        if node.CTX_INIT and n_ctx <= 4:  # MaPLe keeps n_ctx: the remaining init words go to token_suffix
            with torch.no_grad():
                emb = clip_model.token_embedding(tokenize(node.CTX_INIT.replace("_", " ")).long()).type(dtype)
            ctx, prefix = emb[0, 1 : 1 + n_ctx].clone(), node.CTX_INIT.replace("_", " ")
        else:
            ctx = torch.empty(n_ctx, ctx_dim, dtype=dtype)
            nn.init.normal_(ctx, std=0.02)
            prefix = " ".join(["X"] * n_ctx)
        self.compound_prompts_depth = node.PROMPT_DEPTH
        self.proj = nn.Linear(ctx_dim, vis_width)
        self.proj.half()  # unconditional, as MaPLe (peer bug under fp32 / amp)
        self.ctx = nn.Parameter(ctx)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(n_ctx, ctx_dim).normal_(std=0.02)) for _ in range(node.PROMPT_DEPTH - 1)]
        )
        self.compound_prompt_projections = nn.ModuleList(
            [nn.Linear(ctx_dim, vis_width) for _ in range(node.PROMPT_DEPTH - 1)]
        )
        _class_tokens(self, classnames, prefix, n_ctx, clip_model)

    def forward(self):
        ctx = self.ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        prompts = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        visual_deep = [layer(self.compound_prompts_text[i]) for i, layer in enumerate(self.compound_prompt_projections)]
        return prompts, self.proj(self.ctx), self.compound_prompts_text, visual_deep


class MaPLeCustomCLIP(nn.Module):
    def __init__(self, cfg, classnames, clip_model):
        super().__init__()
        self.prompt_learner = maple.MultiModalPromptLearner(cfg, classnames, clip_model)
        self.tokenized_prompts = self.prompt_learner.tokenized_prompts
        self.image_encoder = clip_model.visual
        self.text_encoder = MaPLeTextEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale
        self.dtype = clip_model.dtype

    def forward(self, image, label=None):
        prompts, shared_ctx, deep_text, deep_vision = self.prompt_learner()
        text_features = self.text_encoder(prompts, self.tokenized_prompts, deep_text)
        image_features = self.image_encoder(image.type(self.dtype), shared_ctx, deep_vision)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        logits = self.logit_scale.exp() * image_features @ text_features.t()
        if self.prompt_learner.training:
            return F.cross_entropy(logits, label)
        return logits


# ---------------------------------------------------------------------- DePT (ELP-CoOp)
class FiLM(nn.Module):
    """DePT's channel-wise transformation: per-channel ``scale`` (ones) and ``bias`` (zeros)."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return (x * self.scale.to(x.dtype)) + self.bias.to(x.dtype)


class DePTCustomCLIP(CoOpCustomCLIP):
    def __init__(self, cfg, classnames, clip_model):
        super().__init__(cfg, classnames, clip_model)
        self.subsample_classes = cfg.DATASET.SUBSAMPLE_CLASSES
        self.lp_cfg = cfg.TRAINER.LINEAR_PROBE
        clip_dim = clip_model.text_projection.size(1)
        self.film_lp_img, self.film_lp_text = FiLM(clip_dim), FiLM(clip_dim)
        if self.subsample_classes == "base":
            self.linear_probe_proj = nn.Linear(clip_dim, len(classnames)).type(self.dtype)
        else:
            self.linear_probe_proj = nn.Identity()

    def forward(self, img, labels=None):
        if self.subsample_classes == "base":
            return self._forward_base(img, labels)
        return self._forward_new(img)

    def _forward_base(self, img, labels=None):
        text_feats, img_feats = self._forward_feats(img)
        logits = self._similarity(text_feats, img_feats)
        text_lp, img_lp = self.film_lp_text(text_feats), self.film_lp_img(img_feats)
        if labels is None:
            logits_lp, labels_lp = self.linear_probe_proj(img_lp), None
        else:
            logits_lp = self.linear_probe_proj(torch.cat([text_lp[labels], img_lp]))
            labels_lp = torch.cat([labels, labels])
        w = self.lp_cfg.WEIGHT
        if self.prompt_learner.training:
            return (1 - w) * F.cross_entropy(logits, labels) + w * F.cross_entropy(logits_lp, labels_lp)
        return (1 - w) * logits + w * logits_lp

    def _forward_new(self, img):
        assert not self.prompt_learner.training
        return self._similarity(*self._forward_feats(img))

    def _forward_feats(self, img):
        text_feats = self.text_encoder(self.prompt_learner(), self.tokenized_prompts)
        return text_feats, self.image_encoder(img.type(self.dtype))

    def _similarity(self, text_feats, img_feats):
        text_feats = text_feats / text_feats.norm(dim=-1, keepdim=True)
        img_feats = img_feats / img_feats.norm(dim=-1, keepdim=True)
        return self.logit_scale.exp() * img_feats @ text_feats.t()


# ---------------------------------------------------------------------- namespaces ("trainer modules")
def _namespace(name: str, **members) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(members, clip=clip)
    return module


coop = _namespace("peer_fakes.coop", PromptLearner=CoOpPromptLearner, CustomCLIP=CoOpCustomCLIP, TextEncoder=TextEncoder)
cocoop = _namespace("peer_fakes.cocoop", PromptLearner=CoCoOpPromptLearner, CustomCLIP=CoCoOpCustomCLIP,
                    TextEncoder=TextEncoder)
maple = _namespace("peer_fakes.maple", MultiModalPromptLearner=MultiModalPromptLearner, CustomCLIP=MaPLeCustomCLIP,
                   TextEncoder=MaPLeTextEncoder)
dept = _namespace("peer_fakes.elp_coop", CustomCLIP=DePTCustomCLIP, FiLM=FiLM)

NAMESPACES = {"coop": coop, "cocoop": cocoop, "maple": maple, "dept": dept}


# ---------------------------------------------------------------------- Dassl trainer steps
def build_model(method: str, cfg, classnames, clip_model):
    """The trainers' ``build_model``: CustomCLIP, freeze by name, optimizer the peer's way.

    CoOp / CoCoOp: optimizer over ``model.prompt_learner``; MaPLe: over the whole model (frozen ones get no
    grad), names with "prompt_learner" or "VPT" trained; DePT ELP: ``requires_grad`` by substring of
    ``NAMES_TO_UPDATE``, optimizer over the whole model.  Returns ``(model, optimizer, registered_module)``.
    """
    model = NAMESPACES[method].CustomCLIP(cfg, classnames, clip_model)
    if method == "dept":
        names = cfg.TRAINER.NAMES_TO_UPDATE
        for name, param in model.named_parameters():
            param.requires_grad_(any(n in name for n in names))
    else:
        for name, param in model.named_parameters():
            if "prompt_learner" not in name and not (method == "maple" and "VPT" in name):
                param.requires_grad_(False)
    registered = model.prompt_learner if method in ("coop", "cocoop") else model
    optim = torch.optim.SGD(registered.parameters(), lr=cfg.OPTIM.LR, momentum=0.9, weight_decay=5e-4)
    return model, optim, registered


def dassl_load(module: nn.Module, state_dict: dict, prefix_keys: bool = False):
    """``load_model``: drop the fixed token vectors, then ``load_state_dict(strict=False)``."""
    state_dict = dict(state_dict)
    names = ("prompt_learner.token_prefix", "prompt_learner.token_suffix") if prefix_keys else (
        "token_prefix", "token_suffix")
    for key in names:
        state_dict.pop(key, None)
    return module.load_state_dict(state_dict, strict=False)


# ---------------------------------------------------------------------- test data
BASE = ["dog", "golden retriever", "cat", "aircraft_carrier"]
NOVEL = ["horse", "fire truck", "tabby cat"]


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def word_embedding(clip_model, text: str) -> torch.Tensor:
    """Token embeddings ``(n, D)`` (float32) of the words of ``text`` (no SOS / EOT)."""
    ids = tokenize(text).long()[0]
    n = int(ids.argmax()) - 1
    with torch.no_grad():
        return clip_model.token_embedding(ids[1 : 1 + n]).float()
