"""Registry entries (:mod:`anchoropt.registry`) for the method modules: CoCoOp, MaPLe and DePT, alone, +ATPrompt, +AnchorOPT.

| name | module | template | scored (seen / unseen classes) |
|---|---|---|---|
| ``cocoop`` / ``cocoop+atprompt`` | :class:`~anchoropt.methods.CoCoOp` | coop / atprompt | normal / normal |
| ``cocoop+anchoropt`` | ``CoCoOp`` | anchoropt | normal / ensemble |
| ``maple`` / ``maple+atprompt`` | :class:`~anchoropt.methods.MaPLe` (images in) | coop / atprompt | normal / normal |
| ``maple+anchoropt`` | ``MaPLe`` (deep AnchorOPT) | anchoropt | normal / ensemble |
| ``dept`` / ``dept+atprompt`` | :class:`~anchoropt.methods.DePT` over CoOp | coop / atprompt | fused / similarity |
| ``dept+anchoropt`` | ``DePT`` over CoOp, no KD | anchoropt | fused / ensemble |

Settings read (:class:`~anchoropt.registry.MethodSettings`): ``n_soft`` (M), ``soft_init``; ATPrompt's
``attributes``, ``n_attr_soft``, ``legacy``; AnchorOPT's ``anchors``, ``tau``, ``preposition``, ``pooling``;
MaPLe's ``deep_depth`` (``PROMPT_DEPTH - 1``; 0 means the released ``PROMPT_DEPTH`` 9, capped by the towers'
blocks); the loss weights.  DePT keeps its own loss (no KD) and its released fusion weight 0.7.  The authors'
per-dataset tables for these methods are :func:`anchoropt.presets.preset` with ``method="cocoop" | "maple" |
"dept"`` (:data:`PRESET_METHOD` maps each entry to its table).

Importing :mod:`anchoropt.methods` registers the entries.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..losses import StageIILossConfig
from ..registry import Method, MethodSettings, get_method, register_method
from .cocoop import CoCoOp
from .dept import DePT
from .maple import MaPLe

__all__ = ["PRESET_METHOD", "method_output_loss", "register_all"]

PRESET_METHOD = {f"{base}{suffix}": base for base in ("cocoop", "maple", "dept")
                 for suffix in ("", "+atprompt", "+anchoropt")}
"""Registry name -> the ``method=`` of :func:`anchoropt.presets.preset` whose released table applies."""


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

    vision = len(getattr(getattr(getattr(model, "visual", None), "transformer", None), "resblocks", ()))
    return max(1, min(9, len(TextTower.from_model(model).blocks), vision or 9))


def _builder(name: str) -> Callable[[nn.Module, list, MethodSettings], nn.Module]:
    base = name.split("+")[0]

    def build(model: nn.Module, classnames, s: MethodSettings) -> nn.Module:
        template, options = _template(name), _text_options(name, s)
        if base == "cocoop":
            return CoCoOp(model, classnames, template, s.n_soft, loss=_loss(s), **options)
        if base == "maple":
            return MaPLe(model, classnames, template, s.n_soft, prompt_depth=_prompt_depth(model, s), loss=_loss(s),
                         **options)
        return DePT(model, classnames, template, s.n_soft, loss=_loss(s, kd=False), **options)

    return build


_SUMMARIES = {
    "cocoop": "CoCoOp: meta-net bias on the context from each image, CE",
    "maple": "MaPLe: deep text prompts coupled to deep vision prompts, CE (images in)",
    "dept": "DePT: CwT + linear-probe head on the base classes fused with CoOp, CE",
}
_PROMPT = ("n_soft", "soft_init")
_ATTR = ("attributes", "n_attr_soft", "legacy")
_ANCHOR = ("tau", "pooling", "preposition")
_KD = ("ce_weight", "kd_weight", "kd_temperature", "kd_normalization")


def _entry(name: str) -> Method:
    base, template = name.split("+")[0], _template(name)
    options = [*_PROMPT, *(_ATTR if template == "atprompt" else ()), *(_ANCHOR if template == "anchoropt" else ())]
    options += ["ce_weight"] if base == "dept" else (_KD if template == "anchoropt" else ["ce_weight"])
    if base == "maple":
        options.append("deep_depth")
    summary = _SUMMARIES[base] + {"coop": "", "atprompt": "; ATPrompt attribute template",
                                  "anchoropt": "; + AnchorOPT anchors and position matrix"}[template]
    anchored = template == "anchoropt"
    unseen = "ensemble" if anchored else ("similarity" if base == "dept" else "normal")
    modes = {"base": "normal", "novel": "ensemble", "anchor": "anchor"} if anchored else {}
    return Method(name, summary, _builder(name), method_output_loss, seen_head="normal", unseen_head=unseen,
                  needs_anchors=anchored, image_input="images" if base == "maple" else "features",
                  options=tuple(dict.fromkeys(options)), mode_heads=modes)


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
