"""Registry entries (:mod:`anchoropt.methods.registry`) for the method modules: CoCoOp, MaPLe and DePT, alone, +ATPrompt, +AnchorOPT.

| name | module | template | scored (seen / unseen classes) |
|---|---|---|---|
| ``cocoop`` / ``cocoop+atprompt`` | :class:`~anchoropt.methods.CoCoOp` | coop / atprompt | normal / normal |
| ``cocoop+anchoropt`` | ``CoCoOp`` | anchoropt | normal / ensemble |
| ``maple`` / ``maple+atprompt`` | :class:`~anchoropt.methods.MaPLe` (images in) | coop / atprompt | normal / normal |
| ``maple+anchoropt`` | ``MaPLe`` (deep AnchorOPT) | anchoropt | normal / ensemble |
| ``dept`` / ``dept+atprompt`` | :class:`~anchoropt.methods.DePT` over CoOp | coop / atprompt | fused / similarity |
| ``dept+anchoropt`` | ``DePT`` over CoOp, no KD | anchoropt | fused / ensemble |

Settings read (:class:`~anchoropt.methods.registry.MethodSettings`): ``n_soft`` (M), ``soft_init``; ATPrompt's
``attributes``, ``n_attr_soft``, ``legacy``; AnchorOPT's ``anchors``, ``tau``, ``preposition``, ``pooling``;
MaPLe's ``deep_depth`` (``PROMPT_DEPTH - 1``; 0 means the released ``PROMPT_DEPTH`` 9, capped by the towers'
blocks); the loss weights; DePT's ``lp_weight`` (fusion weight ``w``, 0.7 by default) and ``head_lr_scale``
(the head's learning-rate multiplier, 6.5 as DePT's ``LR_EXP``), e.g. ``dept:lp_weight=0.6:head_lr_scale=6.5``.
DePT keeps its own loss (no KD), its head trains in its own optimiser group (``DePT.optimizer_groups``, which
the runner uses) and it takes the **raw** image features (``image_input="raw_features"``: the runner gives it
the frozen image tower's output without the L2 normalisation the other methods get), as DePT's code.

:func:`released_settings` gives an entry's released per-dataset settings: the AnchorOPT tables
(:func:`anchoropt.methods.presets.preset` with ``method="cocoop" | "maple" | "dept"``) for ``+anchoropt``, ATPrompt's
tables (``docs/ATPrompt.md`` of the released code: context length, epochs, DePT's ``w``) and attribute words for
``+atprompt``, and each method's released configuration for the method alone (MaPLe's ``soft_init``
"a photo of a" with ``n_soft`` 2: "a photo" initialises the context, "of a" stays before the class).
``--preset NAME`` of the runner applies them, DePT's per-dataset ``w``, the init words and MaPLe's fp16 rounding of
its injected prompts (``fp16_prompts``) included
(:data:`PRESET_SETTINGS`); options in the method spec win over the preset.

Importing :mod:`anchoropt.methods` registers the entries.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch
from torch import nn

from ..losses import StageIILossConfig
from .registry import Method, MethodSettings, get_method, register_method
from .cocoop import CoCoOp
from .dept import DePT
from .maple import MaPLe
from .vision import vision_blocks

__all__ = ["PRESET_METHOD", "PRESET_SETTINGS", "method_output_loss", "register_all", "released_settings",
           "preset_method_settings"]

PRESET_METHOD = {f"{base}{suffix}": base for base in ("cocoop", "maple", "dept")
                 for suffix in ("", "+atprompt", "+anchoropt")}
"""Registry name -> the ``method=`` of :func:`anchoropt.methods.presets.preset` whose released table applies."""


# The methods' released configurations (CoCoOp vit_b16_c4_ep10_batch1_ctxv1, MaPLe vit_b16_c2_ep5_batch4_2ctx,
# DePT vit_b16_ep10_bs4_lr35 over CoOp): context length, epochs, batch, lr, (MaPLe) prompt depth, (DePT) w.
_ALONE = {
    "cocoop": dict(n_soft=4, epochs=10, batch_size=1, lr=0.002, soft_init="a photo of a"),
    "maple": dict(n_soft=2, epochs=5, batch_size=4, lr=0.0035, deep_depth=8, soft_init="a photo of a",
                  fp16_prompts=True),
    "dept": dict(n_soft=4, epochs=10, batch_size=4, lr=0.0035, lp_weight=0.7),
}
# ATPrompt's tables for these methods (docs/ATPrompt.md, base-to-novel): (n_soft, epochs[, DePT's w]).
_ATPROMPT = {
    "cocoop": {**dict.fromkeys(("imagenet", "caltech101", "oxford_pets", "food101", "fgvc_aircraft", "sun397", "dtd"),
                               (2, 10)), "ucf101": (4, 10),
               **dict.fromkeys(("stanford_cars", "oxford_flowers", "eurosat"), (6, 10))},
    "maple": {**dict.fromkeys(("caltech101", "oxford_pets", "oxford_flowers", "eurosat"), (4, 10)),
              **dict.fromkeys(("imagenet", "stanford_cars", "food101", "sun397", "dtd"), (4, 5)),
              **dict.fromkeys(("fgvc_aircraft", "ucf101"), (2, 5))},
    "dept": {**dict.fromkeys(("eurosat", "fgvc_aircraft", "food101", "oxford_flowers", "sun397"), (4, 10, 0.7)),
             "caltech101": (4, 10, 0.6), "dtd": (4, 10, 0.6), "ucf101": (4, 10, 0.5),
             "oxford_pets": (2, 10, 0.7), "stanford_cars": (2, 10, 0.6)},
}


def released_settings(name: str, dataset: str | None = None) -> dict:
    """The released settings of registry entry ``name`` (for ``dataset`` where the authors list one).

    Keys are :class:`~anchoropt.methods.registry.MethodSettings` / run-config names (``n_soft``, ``epochs``,
    ``batch_size``, ``lr``, ``ce_weight``, ``kd_weight``, ``kd_temperature``, ``kd_normalization``,
    ``deep_depth``, ``attributes``, ``soft_init``) plus DePT's ``lp_weight`` and MaPLe's ``fp16_prompts`` (every
    MaPLe entry: the released MaPLe, MaPLe+ATPrompt and MaPLe+AnchorOPT code all round the injected prompts).
    """
    from . import presets

    if name not in PRESET_METHOD:
        raise KeyError(f"no released settings for {name!r}; entries: {', '.join(PRESET_METHOD)}")
    base, template = name.split("+")[0], _template(name)
    out = dict(_ALONE[base])
    if template == "anchoropt":
        p = presets.preset(dataset or "default", base)
        out.update(n_soft=p.n_soft, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, ce_weight=p.ce_weight,
                   kd_weight=p.kd_weight, kd_temperature=p.kd_temperature, kd_normalization=p.kd_normalization)
        out.pop("soft_init", None)  # the released +AnchorOPT trainers ignore CTX_INIT (random context)
        if "linear_probe_weight" in p.extra:
            out["lp_weight"] = p.extra["linear_probe_weight"]
    elif template == "atprompt":
        out.pop("soft_init", None)  # the released *_atp trainers ignore CTX_INIT (random context)
        row = _typical_row(_ATPROMPT[base])
        if dataset is not None:
            key = presets.canonical_name(dataset)
            out["attributes"] = presets.atprompt_attributes(key)
            row = _ATPROMPT[base].get(key, row)
        out.update(n_soft=row[0], epochs=row[1], **({"lp_weight": row[2]} if len(row) > 2 else {}))
    return out


def _typical_row(table: dict) -> tuple:
    """The settings most datasets of an ATPrompt table share, column by column (a dataset the authors do not
    list: ``docs/ATPrompt.md`` gives per-dataset values only)."""
    return tuple(statistics.mode(column) for column in zip(*table.values()))


PRESET_SETTINGS = ("soft_init", "lp_weight", "fp16_prompts")
"""The :class:`~anchoropt.methods.registry.MethodSettings` fields of :func:`released_settings` that ``--preset`` fills (the
others are run-config fields: ``n_soft``, ``epochs``, ``lr`` ...)."""


def preset_method_settings(spec: str, dataset: str) -> dict:
    """The released :data:`PRESET_SETTINGS` of method spec ``spec`` for ``dataset`` that its options do not set
    (``{}`` for a method without released settings here)."""
    from .registry import parse_method

    choice = parse_method(spec)
    if choice.method.name not in PRESET_METHOD:
        return {}
    released = released_settings(choice.method.name, dataset)
    return {k: released[k] for k in PRESET_SETTINGS if k in released and k not in choice.options}


def method_output_loss(settings: MethodSettings) -> Callable[[tuple, torch.Tensor], torch.Tensor]:
    """The registry loss of the method modules: their :class:`~anchoropt.methods.base.MethodOutput` knows it."""
    return lambda outputs, labels: outputs.loss(labels)


def _template(name: str) -> str:
    return "anchoropt" if name.endswith("+anchoropt") else "atprompt" if name.endswith("+atprompt") else "coop"


def _text_options(name: str, s: MethodSettings) -> dict:
    template = _template(name)
    options: dict = dict(ctx_init=s.soft_init, tokenizer=s.tokenizer)
    if template == "atprompt":
        if not s.attributes:
            raise ValueError(f"{name} needs attribute words: a dataset preset with ATPrompt attributes "
                             f"(--preset oxford_pets ...), --attributes WORD [WORD ...], or '{name}:attributes=a|b'")
        options.update(attributes=s.attributes, n_attr_ctx=s.n_attr_soft, legacy=s.legacy)
    if template == "anchoropt":
        if s.anchors is None:
            raise ValueError(f"{name} needs Stage I anchors (settings.anchors)")
        options.update(anchors=s.anchors, tau=s.tau, preposition=s.preposition, pooling=s.pooling)
    return options


def _loss(s: MethodSettings, kd: bool = True) -> StageIILossConfig:
    return StageIILossConfig(s.ce_weight, s.kd_weight if kd else 0.0, s.kd_temperature, s.kd_normalization)


def _prompt_depth(model: nn.Module, s: MethodSettings) -> int:
    if s.deep_depth:
        return s.deep_depth + 1
    from ..towers import TextTower

    visual = getattr(model, "visual", None)
    vision = vision_blocks(visual) if isinstance(visual, nn.Module) else 0
    return max(1, min(9, len(TextTower.from_model(model).blocks), vision or 9))


def _builder(name: str) -> Callable[[nn.Module, list, MethodSettings], nn.Module]:
    base = name.split("+")[0]

    def build(model: nn.Module, classnames, s: MethodSettings) -> nn.Module:
        template, options = _template(name), _text_options(name, s)
        if base == "cocoop":
            return CoCoOp(model, classnames, template, s.n_soft, loss=_loss(s), **options)
        if base == "maple":
            return MaPLe(model, classnames, template, s.n_soft, prompt_depth=_prompt_depth(model, s), loss=_loss(s),
                         fp16_prompts=s.fp16_prompts, **options)
        return DePT(model, classnames, template, s.n_soft, lp_weight=s.lp_weight, head_lr_scale=s.head_lr_scale,
                    loss=_loss(s, kd=False), **options)

    return build


_SUMMARIES = {
    "cocoop": "CoCoOp: meta-net bias on the context from each image, CE",
    "maple": "MaPLe: deep text prompts coupled to deep vision prompts, CE (images in)",
    "dept": "DePT: CwT + linear-probe head on the base classes fused with CoOp, CE",
}
_IMAGE_INPUT = {"maple": "images", "dept": "raw_features"}  # CoCoOp: L2-normalised features
_PROMPT = ("n_soft", "soft_init")
_ATTR = ("attributes", "n_attr_soft", "legacy")
_ANCHOR = ("tau", "pooling", "preposition")
_KD = ("ce_weight", "kd_weight", "kd_temperature", "kd_normalization")


def _entry(name: str) -> Method:
    base, template = name.split("+")[0], _template(name)
    options = [*_PROMPT, *(_ATTR if template == "atprompt" else ()), *(_ANCHOR if template == "anchoropt" else ())]
    options += ["ce_weight"] if base == "dept" else (_KD if template == "anchoropt" else ["ce_weight"])
    if base == "maple":
        options += ["deep_depth", "fp16_prompts"]
    if base == "dept":
        options += ["lp_weight", "head_lr_scale"]
    summary = _SUMMARIES[base] + {"coop": "", "atprompt": "; ATPrompt attribute template",
                                  "anchoropt": "; + AnchorOPT anchors and position matrix"}[template]
    anchored = template == "anchoropt"
    unseen = "ensemble" if anchored else ("similarity" if base == "dept" else "normal")
    modes = {"base": "normal", "novel": "ensemble", "anchor": "anchor"} if anchored else {}
    return Method(name, summary, _builder(name), method_output_loss, seen_head="normal", unseen_head=unseen,
                  needs_anchors=anchored, image_input=_IMAGE_INPUT.get(base, "features"),
                  options=tuple(dict.fromkeys(options)), mode_heads=modes, text_per_image=base == "cocoop")


def register_all(replace: bool = False) -> list[Method]:
    """Register the nine entries (idempotent: entries already registered by this module are kept)."""
    done = []
    for name in PRESET_METHOD:
        try:
            existing = get_method(name)
        except KeyError:
            existing = None
        if existing is not None and not replace:
            done.append(existing)
            continue
        done.append(register_method(_entry(name), replace=replace))
    return done


register_all()
