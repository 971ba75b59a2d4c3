"""Method registry (``anchoropt.methods.registry``): a method's name -> how to build its learner, its training loss and how it is scored.

| name | learner | loss |
|---|---|---|
| ``zeroshot`` | :class:`~anchoropt.methods.baselines.ZeroShotClassifier` | (nothing trained) |
| ``coop`` | :class:`~anchoropt.methods.baselines.SoftPromptLearner` | CE |
| ``coop+atprompt`` | ``SoftPromptLearner(attributes=...)`` | CE |
| ``coop+anchoropt`` | :class:`~anchoropt.prompts.AnchorOPTPromptLearner` | CE + KD (Stage II) |
| ``coop+atprompt+anchoropt`` | ``AnchorOPTPromptLearner(attributes=...)`` | CE + KD (Stage II) |
| ``kgcoop`` | :class:`~anchoropt.methods.kgcoop.KgCoOpLearner` | CE + ``kg_weight`` x (1 - cos to the hand prompt) |

A *method spec* is a name with options after a colon, e.g. ``coop+anchoropt:pooling=released``,
``coop:csc=true``, ``zeroshot:ensemble=true``, ``coop+atprompt:attributes=color|shape,legacy=true``
(list values separated by ``|``; options separated by ``,`` or ``:``, e.g.
``dept:lp_weight=0.6:head_lr_scale=6.5``).  The options a method accepts are fields of :class:`MethodSettings`.

Every learner answers ``set_classnames(names)``, ``forward(inputs)`` (what its loss takes) and
``heads(inputs) -> {head: (B, C) logits}``; a method names the head that scores classes seen in
training and the one for unseen classes (AnchorOPT: the normal prompt / the normal + anchor ensemble).
A new method (CoCoOp, MaPLe, DePT, ...) is one :func:`register_method` call::

    register_method(Method("cocoop", "CoCoOp: image-conditioned context", build=build_cocoop, loss=cross_entropy_loss,
                           options=("n_soft",)))

``image_input="images"`` marks a method whose learner runs the image tower itself (visual prompts), so the
runner passes images and never caches image features for it; ``image_input="raw_features"`` one that takes
the frozen image features without the L2 normalisation the others get (DePT).

Axes: ``B`` images, ``C`` classes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..template import check_template
from .baselines import DEFAULT_TEMPLATE, ENSEMBLE_TEMPLATES, SoftPromptLearner, ZeroShotClassifier
from .kgcoop import KgCoOpLearner, kgcoop_loss
from ..losses import StageIILoss
from ..prompts import AnchorOPTPromptLearner

__all__ = [
    "Method",
    "MethodChoice",
    "MethodSettings",
    "register_method",
    "get_method",
    "available_methods",
    "parse_method",
    "cross_entropy_loss",
    "anchoropt_loss",
    "save_learner",
    "load_learner",
]

IMAGE_INPUTS = ("features", "raw_features", "images")
FEATURE_INPUTS = ("features", "raw_features")
"""The ``image_input`` values whose learner takes frozen image features (the runner may cache them)."""


@dataclass
class MethodSettings:
    """Everything a method's builder and loss may read (the runner fills it from its run config).

    Prompt: ``n_soft`` (M), ``soft_init`` (words), ``csc`` (CoOp class-specific context), ``attributes``
    (ATPrompt words), ``n_attr_soft`` (soft tokens per attribute, M when ``None``), ``legacy`` (ATPrompt's
    released one-token slice).  AnchorOPT: ``anchors`` ``(N, D)``, ``tau``, ``preposition``, ``deep_depth``,
    ``pooling`` (``"eot"`` or ``"released"``: EOT - N).  Zero-shot: ``templates``, ``ensemble`` (CLIP's seven
    ImageNet templates).  Loss: ``ce_weight``, ``kd_weight``, ``kd_temperature``, ``kd_normalization``.
    DePT: ``lp_weight`` (its fusion weight ``w``, in [0, 1]) and ``head_lr_scale`` (the head's learning-rate
    multiplier, DePT's ``LR_EXP``, > 0).  MaPLe: ``fp16_prompts`` (released MaPLe's ``.half()`` on the prompts it
    injects, also in fp32; :class:`~anchoropt.methods.MaPLe`).
    """

    n_soft: int = 4
    soft_init: str | None = None
    csc: bool = False
    attributes: tuple[str, ...] = ()
    n_attr_soft: int | None = None
    legacy: bool = False
    anchors: torch.Tensor | None = None
    tau: float = 1.0
    preposition: str = "of"
    deep_depth: int = 0
    pooling: str = "eot"
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    ensemble: bool = False
    ce_weight: float = 1.0
    kd_weight: float = 10.0
    kd_temperature: float = 1.0
    kd_normalization: str = "batchmean"
    lp_weight: float = 0.7
    head_lr_scale: float = 6.5
    fp16_prompts: bool = False
    kg_weight: float = 8.0
    tokenizer: Callable | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        """The JSON-able fields (not the anchors tensor nor the tokenizer)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("anchors", "tokenizer"):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, values: dict, **extra) -> "MethodSettings":
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
        return cls(**{**kwargs, **extra})


@dataclass(frozen=True)
class Method:
    """One registry entry.

    Args:
        name: the spec name (``"coop+anchoropt"``).
        summary: one line for ``anchoropt grid --list-methods`` and the docs.
        build: ``build(model, classnames, settings) -> learner``.
        loss: ``loss(settings) -> fn(outputs, labels)``; ``None`` when nothing is trained (zero-shot).
        seen_head / unseen_head: the ``heads()`` entry scoring classes seen / not seen in training.
        needs_anchors: the runner runs Stage I (or loads anchors) first and passes ``settings.anchors``.
        image_input: ``"features"`` (frozen image tower, L2-normalised features, cacheable), ``"raw_features"``
            (the same, not normalised: DePT's head reads the raw features) or ``"images"``.
        options: :class:`MethodSettings` fields a spec may set (``coop:csc=true``).
        mode_heads: head for an explicit evaluation mode (AnchorOPT: base / novel / anchor).
        text_per_image: the class prompts depend on the image (CoCoOp), so the text tower runs once per image
            rather than once per batch (the grid's run-length estimate, :mod:`anchoropt.runner.schedule`).
    """

    name: str
    summary: str
    build: Callable[[nn.Module, Sequence[str], MethodSettings], nn.Module]
    loss: Callable[[MethodSettings], Callable[[Any, torch.Tensor], torch.Tensor]] | None = None
    seen_head: str = "prompt"
    unseen_head: str = "prompt"
    needs_anchors: bool = False
    image_input: str = "features"
    options: tuple[str, ...] = ()
    mode_heads: dict = field(default_factory=dict)
    text_per_image: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9+_-]*", self.name):
            raise ValueError(f"method names use lowercase letters, digits, '+', '_' and '-': {self.name!r}")
        if self.image_input not in IMAGE_INPUTS:
            raise ValueError(f"image_input must be one of {IMAGE_INPUTS}, got {self.image_input!r}")
        unknown = set(self.options) - {f.name for f in dataclasses.fields(MethodSettings)}
        if unknown:
            raise ValueError(f"method {self.name!r} lists unknown options {sorted(unknown)}")

    @property
    def trains(self) -> bool:
        return self.loss is not None

    def head(self, seen: bool, mode: str = "auto") -> str:
        """The head that scores a class set: ``mode="auto"`` picks by ``seen``; other modes via ``mode_heads``."""
        if mode == "auto":
            return self.seen_head if seen else self.unseen_head
        if mode not in self.mode_heads:
            raise ValueError(f"evaluation mode {mode!r} does not apply to method {self.name!r} "
                             f"(modes: auto{''.join(', ' + m for m in self.mode_heads)})")
        return self.mode_heads[mode]


@dataclass(frozen=True)
class MethodChoice:
    """A parsed method spec: the registry entry, its options and the label used in tables and paths."""

    method: Method
    options: dict
    label: str

    def settings(self, base: MethodSettings) -> MethodSettings:
        """``base`` with this spec's options applied."""
        return dataclasses.replace(base, **self.options)

    @property
    def slug(self) -> str:
        """The label made safe as a directory name."""
        return re.sub(r"[^A-Za-z0-9+._-]+", "-", self.label).strip("-")


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method, replace: bool = False) -> Method:
    """Add ``method`` to the registry (``replace=True`` to override an entry of the same name)."""
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"method {method.name!r} is already registered (pass replace=True to override it)")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    return list(_REGISTRY)


def parse_method(spec: str) -> MethodChoice:
    """``"coop+anchoropt:pooling=released,tau=0.5"`` -> :class:`MethodChoice` (options validated and typed)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a method spec is a non-empty string such as 'coop' or 'coop+anchoropt:pooling=released', "
                         f"got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    method = get_method(name.strip())
    options: dict = {}
    types = {f.name: f for f in dataclasses.fields(MethodSettings)}
    for item in filter(None, (part.strip() for part in re.split(r"[,:]", rest))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"method option {item!r} in {spec!r} must be key=value")
        if key not in method.options:
            raise ValueError(f"method {method.name!r} has no option {key!r}; its options: "
                             f"{', '.join(method.options) or 'none'}")
        if key in options:
            raise ValueError(f"method option {key} is given twice in {spec!r}: give each option once")
        options[key] = _checked_option(key, _typed(key, value.strip(), types[key].default))
    return MethodChoice(method, options, spec.strip())


OPTION_RANGES = {
    "lp_weight": (0.0, 1.0, False), "head_lr_scale": (0.0, math.inf, True),
    "n_soft": (0, math.inf, False), "n_attr_soft": (0, math.inf, False), "deep_depth": (0, math.inf, False),
    "tau": (0.0, math.inf, True), "kd_temperature": (0.0, math.inf, True),
    "ce_weight": (0.0, math.inf, False), "kd_weight": (0.0, math.inf, False), "kg_weight": (0.0, math.inf, False),
}
"""option -> ``(lowest, highest, lowest excluded)``: the numeric method options' valid ranges (the runner checks
its own fields of the same names against these too)."""


def _option_choices() -> dict[str, tuple[str, ...]]:
    """option -> its valid words (read from the modules that own them)."""
    from ..functional import KD_NORMALIZATIONS
    from ..template import POOLINGS

    return {"pooling": POOLINGS, "kd_normalization": KD_NORMALIZATIONS}


def _checked_option(key: str, value):
    """``value`` of method option ``key`` after its range, choice or template check (a clear error naming
    the option otherwise), so a bad spec is refused before any model is built."""
    choices = _option_choices().get(key)
    if choices is not None and value not in choices:
        raise ValueError(f"method option {key} must be one of {', '.join(choices)}, got {value!r}")
    if key == "templates":
        return _checked_templates(value)
    bounds = OPTION_RANGES.get(key)
    if bounds is None or value is None:
        return value
    low, high, strict = bounds
    if not math.isfinite(value) or value < low or value > high or (strict and value == low):
        wanted = (f">= {low:g}" if not strict else f"> {low:g}") if high == math.inf else f"in [{low:g}, {high:g}]"
        kind = "a whole number" if isinstance(value, int) else "a finite number"
        raise ValueError(f"method option {key} must be {kind} {wanted}, got {value!r}")
    return value


def _checked_templates(templates: tuple[str, ...]) -> tuple[str, ...]:
    """Zero-shot templates: at least one, each with exactly one ``{}`` and no other ``{...}`` field."""
    if not templates:
        raise ValueError("method option templates needs at least one template such as 'a photo of a {}.'")
    for template in templates:
        check_template(template, "method option templates")
    return templates


def _typed(key: str, text: str, default):
    """The option's text as its :class:`MethodSettings` field's type (a clear error naming the option)."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"method option {key} takes true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if isinstance(default, tuple):
        return tuple(part.strip() for part in text.split("|") if part.strip())
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"method option {key} takes a number, got {text!r}") from None
    if isinstance(default, int) or key == "n_attr_soft":
        if key == "n_attr_soft" and text.lower() == "none":
            return None
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"method option {key} takes a whole number (int), got {text!r}") from None
    return None if text.lower() == "none" else text


# ---------------------------------------------------------------------- losses
def cross_entropy_loss(settings: MethodSettings) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Plain cross-entropy on the learner's logits (CoOp, ATPrompt)."""
    return lambda logits, labels: F.cross_entropy(logits.float(), labels)


def knowledge_guided_loss(settings: MethodSettings) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """KgCoOp's CE + ``kg_weight`` x the learned prompt's distance to the hand prompt."""
    return kgcoop_loss(settings.kg_weight)


def anchoropt_loss(settings: MethodSettings) -> Callable[[tuple, torch.Tensor], torch.Tensor]:
    """AnchorOPT's Stage II loss on ``(logits_normal, logits_anchor)``."""
    loss = StageIILoss(ce_weight=settings.ce_weight, kd_weight=settings.kd_weight,
                       temperature=settings.kd_temperature, kd_normalization=settings.kd_normalization)
    return lambda outputs, labels: loss(outputs[0], outputs[1], labels)


# ---------------------------------------------------------------------- builders
def _zeroshot(model, classnames, s: MethodSettings) -> nn.Module:
    templates = ENSEMBLE_TEMPLATES if s.ensemble else s.templates
    return ZeroShotClassifier(model, classnames, templates, tokenizer=s.tokenizer)


def _soft(model, classnames, s: MethodSettings, attributes: bool = False) -> nn.Module:
    extra = {}
    if attributes:
        s = _with_attributes(s, "coop+atprompt")
        extra = dict(attributes=s.attributes, n_attr_soft=s.n_attr_soft, legacy_single_token=s.legacy)
    return SoftPromptLearner(model, classnames, n_soft=s.n_soft, soft_init=s.soft_init, class_specific=s.csc,
                             tokenizer=s.tokenizer, **extra)


def _kgcoop(model, classnames, s: MethodSettings) -> nn.Module:
    return KgCoOpLearner(model, classnames, n_soft=s.n_soft, soft_init=s.soft_init, hand_templates=s.templates,
                         tokenizer=s.tokenizer)


def _atprompt(model, classnames, s: MethodSettings) -> nn.Module:
    return _soft(model, classnames, s, attributes=True)


def _anchoropt(model, classnames, s: MethodSettings, attributes: bool = False) -> nn.Module:
    if s.anchors is None:
        raise ValueError("AnchorOPT needs Stage I anchors (settings.anchors)")
    extra = {}
    if attributes:
        s = _with_attributes(s, "coop+atprompt+anchoropt")
        extra = dict(attributes=s.attributes, n_attr_soft=s.n_attr_soft, legacy_single_token=s.legacy)
    deep = {"deep_depth": s.deep_depth} if s.deep_depth else {}
    return AnchorOPTPromptLearner(model, classnames, s.anchors, n_soft=s.n_soft, soft_init=s.soft_init,
                                  preposition=s.preposition, tokenizer=s.tokenizer, tau=s.tau, pooling=s.pooling,
                                  **deep, **extra)


def _with_attributes(s: MethodSettings, name: str) -> MethodSettings:
    if not s.attributes:
        raise ValueError(f"{name} needs attribute words: a dataset preset with ATPrompt attributes "
                         f"(--preset oxford_pets ...), --attributes WORD [WORD ...], or '{name}:attributes=a|b' "
                         f"(from Python, a parsed spec's options reach the builder through "
                         f"choice.settings(MethodSettings(...)); MethodSettings(attributes=(...)) works too)")
    return s


_ANCHOROPT_MODES = {"base": "normal", "novel": "ensemble", "anchor": "anchor"}
_PROMPT = ("n_soft", "soft_init")
_ANCHOR = ("tau", "pooling", "deep_depth", "preposition", "ce_weight", "kd_weight", "kd_temperature",
           "kd_normalization")
_ATTR = ("attributes", "n_attr_soft", "legacy")

register_method(Method("zeroshot", "zero-shot CLIP with hand-written template(s)", _zeroshot,
                       seen_head="zeroshot", unseen_head="zeroshot", options=("templates", "ensemble")))
register_method(Method("coop", "CoOp: M soft tokens before the class name, CE", _soft, cross_entropy_loss,
                       options=(*_PROMPT, "csc")))
register_method(Method("kgcoop", "KgCoOp: CoOp + distance of its class features to the hand prompt's", _kgcoop,
                       knowledge_guided_loss, options=(*_PROMPT, "templates", "kg_weight")))
register_method(Method("coop+atprompt", "ATPrompt: soft blocks + fixed attribute words before CoOp's tokens, CE",
                       _atprompt, cross_entropy_loss, options=(*_PROMPT, *_ATTR)))
register_method(Method("coop+anchoropt", "AnchorOPT: learned anchors + position matrix, CE + KD", _anchoropt,
                       anchoropt_loss, "normal", "ensemble", needs_anchors=True, options=(*_PROMPT, *_ANCHOR),
                       mode_heads=_ANCHOROPT_MODES))
register_method(Method("coop+atprompt+anchoropt", "AnchorOPT's anchors + position matrix on an ATPrompt template",
                       lambda m, c, s: _anchoropt(m, c, s, attributes=True), anchoropt_loss, "normal", "ensemble",
                       needs_anchors=True, options=(*_PROMPT, *_ANCHOR, *_ATTR), mode_heads=_ANCHOROPT_MODES))


# ---------------------------------------------------------------------- save / load any method's learner
LEARNER_CONFIG = "learner.json"
LEARNER_WEIGHTS = "learner.safetensors"


def save_learner(learner: nn.Module, choice: MethodChoice, settings: MethodSettings,
                 directory: str | os.PathLike, run_id: str | None = None) -> Path:
    """Write any registered method's learner: its state (``learner.safetensors``) and method spec + settings
    (``learner.json``), as one complete-or-absent set (:func:`anchoropt._files.commit_files`: a manifest with
    the files' sha256, written last; ``run_id`` recorded in it), so an interrupted save never loads and leaves
    the previous save in place."""
    from safetensors.torch import save as safetensors_bytes

    from .. import _files
    from ..io import state_tensors, tensor_shapes

    tensors = state_tensors(learner)
    config = {"format": "anchoropt", "kind": "method_learner", "method": choice.label,
              "settings": settings.to_json(), "trained_classnames": list(getattr(learner, "classnames", []))}
    files = {LEARNER_WEIGHTS: safetensors_bytes(tensors, metadata={"format": "anchoropt"}),
             LEARNER_CONFIG: _files.json_text(config).encode("utf-8")}
    info = {"kind": "method_learner", "method": choice.label, "tensors": tensor_shapes(tensors), "run_id": run_id}
    return _files.commit_files(directory, files, info)


def load_learner(directory: str | os.PathLike, model: nn.Module, classnames: Sequence[str],
                 tokenizer: Callable | None = None) -> tuple[nn.Module, MethodChoice]:
    """Rebuild a learner written by :func:`save_learner` for ``classnames``; returns it and its method.

    The files are checked against the save's manifest: an interrupted, mixed or edited save raises
    :class:`~anchoropt._files.IncompleteSaveError`.  A directory without a manifest (saved by an older
    anchoropt) is read as it is.
    """
    from safetensors.torch import load as load_safetensors_bytes

    from .. import _files
    from .._jsonfile import parse_json
    from ..io import module_device

    directory = Path(directory)
    files = _learner_files(directory)
    if LEARNER_CONFIG not in files:
        raise FileNotFoundError(f"no {LEARNER_CONFIG} in {directory}: not a saved learner")
    try:
        config = parse_json(files[LEARNER_CONFIG].decode("utf-8-sig"), str(directory / LEARNER_CONFIG))
    except UnicodeDecodeError:
        raise ValueError(f"{directory / LEARNER_CONFIG} is not UTF-8 text") from None
    if not isinstance(config, dict) or config.get("kind") != "method_learner":
        raise ValueError(f"{directory / LEARNER_CONFIG} is not an anchoropt method learner config")
    choice = parse_method(config["method"])
    try:
        tensors = load_safetensors_bytes(files[LEARNER_WEIGHTS]) if LEARNER_WEIGHTS in files else {}
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise _files.IncompleteSaveError(f"{directory / LEARNER_WEIGHTS} is not a readable safetensors file "
                                         f"({err}); save the learner again") from err
    settings = MethodSettings.from_json(config["settings"], anchors=tensors.get("anchors"), tokenizer=tokenizer)
    learner = choice.method.build(model, list(classnames), settings)
    device = module_device(learner)
    learner.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=True)
    return learner, choice


def _learner_files(directory: Path) -> dict[str, bytes]:
    """``{name: bytes}`` of a saved learner: the manifest's checked files, or (no manifest: an older save)
    those present."""
    from .. import _files

    committed = _files.read_committed(directory, names=(LEARNER_CONFIG, LEARNER_WEIGHTS))
    if committed is not None:
        return committed[1]
    return {name: (directory / name).read_bytes() for name in (LEARNER_CONFIG, LEARNER_WEIGHTS)
            if (directory / name).is_file()}
