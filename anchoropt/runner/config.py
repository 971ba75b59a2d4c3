"""The run configuration: :class:`RunConfig`, its choices, and reading it back from a run directory."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._jsonfile import read_json
from ..functional import KD_NORMALIZATIONS
from ..methods.presets import preset as get_preset
from ..methods.recipes import DEFAULT_RECIPE, RUN_KEYS, check_recipe, recipe_values
from ..methods.registry import OPTION_RANGES

PROTOCOLS = ("base2novel", "cross-dataset", "domain-generalization")
EVAL_MODES = ("auto", "base", "novel", "anchor")
AUGMENTATIONS = ("rrc_flip", "none")
SHOTS_FROM = ("sample", "dassl")
"""Where the K shots come from: drawn here with the seed, or Dassl's ``split_fewshot/shot_K-seed_S.pkl``."""
PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16", "amp", "amp_bf16", "amp_bfloat16")
"""The ``precision`` values open_clip's ``create_model`` knows (the toy CLIP takes fp32 and the amp ones)."""
PAE_METHODS = ("coop+anchoropt",)
"""The methods whose learner PAE regularises: the deep AnchorOPT prompt learner's per-layer prompts."""
RUN_CONFIG = "run_config.json"
RESULTS = "results.json"


@dataclass
class RunConfig:
    """Everything a run needs; written to ``run_config.json`` so ``eval`` can rebuild it.

    ``None`` fields are filled by :meth:`resolve` from the preset (``preset=``), then the method's recipe
    (``recipe=``, :mod:`anchoropt.methods.recipes`: ``"released"``, each method's released recipe for a generic
    dataset; ``"paper-text"``, the same with the paper text's loss, CE 1 + KD 10 per sample; ``"legacy"``, the
    defaults before, CE 1 + KD 10 per sample, M 4, 100 epochs for every method).
    """

    protocol: str = "base2novel"
    data: str | None = None
    split_json: str | None = None
    image_root: str | None = None
    classnames_file: str | None = None
    shots_from: str = "sample"
    targets: list[str] = field(default_factory=list)
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    precision: str = "fp32"
    preset: str | None = None
    recipe: str = DEFAULT_RECIPE
    descriptions: str | None = None
    anchors: str | None = None
    output: str = "runs/anchoropt"
    seed: int = 1
    shots: int | None = None
    n_soft: int | None = None
    n_anchor: int | None = None
    preposition: str = "of"
    deep_depth: int = 0
    method: str = "coop+anchoropt"
    attributes: list[str] = field(default_factory=list)
    n_attr_soft: int | None = None
    pooling: str = "eot"
    templates: list[str] = field(default_factory=list)
    stage1_schedule: str = "cosine"
    description_selection: str = "usable"
    pae: bool = False
    pae_alpha: float = 0.5
    pae_beta: float = 0.2
    pae_dim: int = 256
    pae_mode: str = "global"
    pae_reading: str = "released"
    pae_energy: str = "shared"
    pae_decay: bool = False
    tau: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    warmup_epochs: int | None = None
    warmup_lr: float | None = None
    ce_weight: float | None = None
    kd_weight: float | None = None
    kd_temperature: float | None = None
    kd_normalization: str | None = None
    stage1_steps: int | None = None
    stage1_mse_weight: float | None = None
    stage1_lr: float | None = None
    max_descriptions: int | None = None
    augment: str = "rrc_flip"
    drop_last: bool | None = None
    cache_image_features: bool = False
    cache_views: int = 0
    eval_mode: str = "auto"
    eval_batch_size: int = 100
    p_train: float = 0.5
    p_val: float = 0.2
    split_seed: int = 1
    device: str | None = None
    workers: int = 0
    progress: bool = True
    plots: bool = True
    save_every: int = 0
    tensorboard: bool = False

    _DEFAULTS = RUN_KEYS  # the fields resolve() fills

    def resolve(self) -> "RunConfig":
        """A copy with every ``None`` hyperparameter filled (explicit > preset > the method's recipe), validated."""
        values = dataclasses.asdict(self)
        check_recipe(self.recipe)
        self.method_choice()  # an unknown method: its clear error before the recipe is looked up
        chosen = _preset_values(self.method, self.preset) if self.preset else {}
        defaults = recipe_values(self.recipe, self.method)
        for key in RUN_KEYS:
            if values[key] is None:
                values[key] = chosen.get(key, defaults[key])
        cfg = RunConfig(**values)
        cfg._fill_method_defaults()
        cfg.validate()
        return cfg

    def _fill_method_defaults(self) -> None:
        """ATPrompt attributes and the zero-shot template from the dataset preset, when not given."""
        from ..methods.presets import DATASETS, atprompt_attributes, canonical_name, zeroshot_template

        try:
            dataset = canonical_name(self.preset) if self.preset else None
        except KeyError:
            dataset = None
        if dataset in DATASETS:
            if not self.attributes:
                self.attributes = list(atprompt_attributes(dataset))
            if not self.templates:
                self.templates = [zeroshot_template(dataset)]

    def method_choice(self):
        """The parsed ``method`` spec (:class:`anchoropt.methods.registry.MethodChoice`)."""
        from ..methods.registry import parse_method

        return parse_method(self.method)

    def validate(self) -> None:
        check_recipe(self.recipe)
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {PROTOCOLS}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.augment!r}; choose one of {AUGMENTATIONS}")
        if self.shots_from not in SHOTS_FROM:
            raise ValueError(f"unknown --shots-from {self.shots_from!r}; choose one of {SHOTS_FROM}")
        if self.eval_mode not in EVAL_MODES:
            raise ValueError(f"unknown eval mode {self.eval_mode!r}; choose one of {EVAL_MODES}")
        if self.cache_image_features and self.augment != "none" and self.cache_views < 1:
            raise ValueError(
                "caching image features needs fixed images: pass --augment none with --cache-image-features, "
                "or --cache-views K to draw K augmented views per image once (the paper's default is a fresh "
                "random crop + flip every step)"
            )
        if self.cache_views and (not self.cache_image_features or self.augment == "none"):
            raise ValueError("--cache-views K goes with --cache-image-features and an augmentation (not --augment none)")
        if self.protocol == "base2novel" and self.targets:
            raise ValueError("--target datasets belong to --protocol cross-dataset or domain-generalization; "
                             "base-to-novel evaluates the novel half of --data")
        if self.protocol != "base2novel" and not self.targets:
            raise ValueError(f"the {self.protocol} protocol needs at least one target dataset (--target DIR)")
        self._validate_pae()
        self._check_types()
        self._validate_method()
        for names, low, strict in _RANGES:
            for name in names:
                value = getattr(self, name)
                if value is None:
                    continue
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"{_flag(name)} must be a finite number, got {value}")
                if value < low or (strict and value == low):
                    raise ValueError(f"{_flag(name)} must be {'>' if strict else '>='} {low}, got {value}")
        if self.kd_normalization is not None and self.kd_normalization not in KD_NORMALIZATIONS:
            raise ValueError(f"unknown --kd-normalization {self.kd_normalization!r}; choose one of {KD_NORMALIZATIONS}")
        if not (0 < self.p_train < 1 and 0 <= self.p_val < 1 and self.p_train + self.p_val < 1):
            raise ValueError(f"need 0 < --p-train < 1, 0 <= --p-val < 1 and --p-train + --p-val < 1, got "
                             f"{self.p_train}, {self.p_val}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"unknown --device {self.device!r}; use cpu, cuda or cuda:N") from None

    def _check_types(self) -> None:
        """Each field's type (a hand-edited run_config.json may hold "3" for 3, or 1.5 for an int)."""
        for f in dataclasses.fields(self):
            value, kinds = getattr(self, f.name), _TYPES.get(f.name)
            if kinds is None:  # a field added without a type entry: its default's type
                kinds = (type(f.default),) if f.default is not None and f.default is not dataclasses.MISSING else None
            if kinds is None or (value is None and type(None) in kinds):
                continue
            if f.name == "targets":
                ok = isinstance(value, list) and all(isinstance(t, str) for t in value)
            else:  # an int where a float is expected is fine (1 for 1.0); a bool is never a number
                ok = (isinstance(value, kinds) or (float in kinds and isinstance(value, int))) and \
                    not (isinstance(value, bool) and bool not in kinds)
            if not ok:
                wanted = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
                raise ValueError(f"{f.name} must be {wanted}, got {value!r} ({type(value).__name__})")

    def _validate_method(self) -> None:
        from ..anchors import STAGE1_SCHEDULES
        from ..descriptions import SELECTIONS
        from ..template import POOLINGS

        choice = self.method_choice()  # unknown method / option: a clear error
        if self.eval_mode != "auto":
            choice.method.head(True, self.eval_mode)
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {POOLINGS}")
        if self.stage1_schedule not in STAGE1_SCHEDULES:
            raise ValueError(f"unknown Stage I schedule {self.stage1_schedule!r}; choose one of {STAGE1_SCHEDULES}")
        if self.description_selection not in SELECTIONS:
            raise ValueError(f"unknown description selection {self.description_selection!r}; choose one of {SELECTIONS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown --precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.pae and choice.method.name not in PAE_METHODS:
            raise ValueError(f"--pae regularises the deep AnchorOPT prompt learner's per-layer prompts "
                             f"(--method {' or '.join(PAE_METHODS)} with --deep-depth >= 2); method "
                             f"{choice.label!r} has none: drop --pae or change --method")
        self._validate_method_values(choice)

    def _effective(self, choice, name: str):
        """A method setting as the learner will get it: the method spec's option, else the run's field."""
        return choice.options.get(name, getattr(self, name))

    def _validate_method_values(self, choice) -> None:
        """The learner's settings that can be checked without a model (refused here, not after Stage I):
        the templates, CoOp's class-specific context under base-to-novel, deep prompts on ATPrompt."""
        from ..template import check_template

        for template in self.templates:
            check_template(template, "--template")
        if choice.options.get("csc") and self.protocol == "base2novel":
            raise ValueError(f"{choice.label!r}: a class-specific context (csc=true) has one context per trained "
                             "class and cannot score the novel classes of --protocol base2novel; drop csc=true or "
                             "use --protocol cross-dataset / domain-generalization with targets of the same classes")
        if choice.method.name == "coop+atprompt+anchoropt" and self._effective(choice, "deep_depth") and \
                self._effective(choice, "attributes"):
            raise ValueError(f"{choice.label!r}: deep prompts (deep_depth > 0) on an ATPrompt template (attributes) "
                             "are not supported; drop --deep-depth / deep_depth or use a method without +atprompt")

    def _validate_pae(self) -> None:
        if not self.pae:
            return
        from ..functional import PAE_READINGS
        from ..methods.pae import ENERGIES, MODES

        if self.deep_depth < 2:
            raise ValueError(f"--pae regularises the deep variant's per-layer prompts: it needs --deep-depth >= 2 "
                             f"(at least one pair of layers), got --deep-depth {self.deep_depth}")
        if self.pae_alpha < 0 or self.pae_beta < 0:
            raise ValueError(f"--pae-alpha and --pae-beta must be >= 0, got {self.pae_alpha} and {self.pae_beta}")
        if self.pae_dim < 1:
            raise ValueError(f"--pae-dim must be >= 1, got {self.pae_dim}")
        if self.pae_mode not in MODES:
            raise ValueError(f"unknown --pae-mode {self.pae_mode!r}; choose one of {MODES}")
        if self.pae_energy not in ENERGIES:
            raise ValueError(f"unknown --pae-energy {self.pae_energy!r}; choose one of {ENERGIES}")
        if self.pae_reading not in PAE_READINGS:
            raise ValueError(f"unknown --pae-reading {self.pae_reading!r}; choose one of {PAE_READINGS}")

    def stage1_step_count(self, n_classes: int) -> int:
        """Explicit ``stage1_steps``, else the released schedule for ``n_classes`` (preset epochs x batches)."""
        if self.stage1_steps is not None:
            return self.stage1_steps
        base = get_preset(self.preset) if self.preset else get_preset("default")
        return base.stage1_steps(n_classes, self.shots)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> "RunConfig":
        """A config from ``run_config.json``'s values (extra bookkeeping keys such as ``run_id`` ignored),
        type-checked field by field."""
        if not isinstance(values, dict):
            raise ValueError(f"a run config must be a JSON object, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - _BOOKKEEPING)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; known keys: {sorted(known)}")
        # written before --drop-last: those runs kept the last batch; before --recipe: the legacy defaults
        values = {"drop_last": False, "recipe": "legacy", **values}
        cfg = cls(**{k: v for k, v in values.items() if k in known})
        cfg._check_types()
        return cfg


def load_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """The :class:`RunConfig` a run directory was trained with (``run_config.json``), checked."""
    path = Path(run_dir) / RUN_CONFIG
    values = read_json(path, f"{path} not found: is {run_dir} a run directory written by `anchoropt train`?")
    try:
        return RunConfig.from_json(values)
    except ValueError as err:
        raise ValueError(f"{path}: {err} (was the file edited by hand?)") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_OPT_INT, _OPT_FLOAT, _OPT_STR = (int, type(None)), (float, type(None)), (str, type(None))
_TYPES: dict[str, tuple[type, ...]] = {
    "protocol": (str,), "data": _OPT_STR, "split_json": _OPT_STR, "image_root": _OPT_STR,
    "classnames_file": _OPT_STR, "targets": (list,), "model": (str,), "pretrained": _OPT_STR, "precision": (str,),
    "preset": _OPT_STR, "recipe": (str,), "descriptions": _OPT_STR, "anchors": _OPT_STR, "output": (str,), "seed": (int,),
    "shots": _OPT_INT, "n_soft": _OPT_INT, "n_anchor": _OPT_INT, "preposition": _OPT_STR, "deep_depth": (int,),
    "tau": _OPT_FLOAT, "epochs": _OPT_INT, "batch_size": _OPT_INT, "lr": _OPT_FLOAT, "momentum": _OPT_FLOAT,
    "weight_decay": _OPT_FLOAT, "warmup_epochs": _OPT_INT, "warmup_lr": _OPT_FLOAT, "ce_weight": _OPT_FLOAT,
    "kd_weight": _OPT_FLOAT, "kd_temperature": _OPT_FLOAT, "kd_normalization": _OPT_STR, "stage1_steps": _OPT_INT,
    "stage1_mse_weight": _OPT_FLOAT, "stage1_lr": _OPT_FLOAT, "max_descriptions": _OPT_INT, "augment": (str,),
    "drop_last": (bool, type(None)),
    "cache_image_features": (bool,), "cache_views": (int,), "eval_mode": (str,), "eval_batch_size": (int,),
    "p_train": (float,), "p_val": (float,), "split_seed": (int,), "device": _OPT_STR, "workers": (int,),
    "progress": (bool,), "plots": (bool,), "save_every": (int,), "tensorboard": (bool,),
    "pae": (bool,), "pae_alpha": (float,), "pae_beta": (float,), "pae_dim": (int,), "pae_mode": (str,),
    "pae_reading": (str,), "pae_decay": (bool,), "pae_energy": (str,),
}
# (fields, lower bound, bound excluded): every count and every number of a run
_METHOD_OPTIONS_CHECKED = ("n_soft", "deep_depth", "tau", "kd_temperature", "ce_weight", "kd_weight")
"""Run fields that are also method options: checked against the method options' ranges (one table)."""
_RANGES = (
    (("epochs", "batch_size", "n_anchor", "shots", "eval_batch_size", "max_descriptions", "stage1_steps"), 1, False),
    (("warmup_epochs", "workers", "cache_views", "save_every", "seed", "split_seed"), 0, False),
    (("lr", "stage1_lr", "stage1_mse_weight"), 0.0, True),
    (("momentum", "weight_decay", "warmup_lr", "pae_alpha", "pae_beta"), 0.0, False),
    *(((name,), OPTION_RANGES[name][0], OPTION_RANGES[name][2]) for name in _METHOD_OPTIONS_CHECKED),
)
_BOOKKEEPING = {"run_id", "anchoropt_version"}  # written into run_config.json next to the fields


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    def absolute(path):  # no symlink resolution: messages and run_config.json show the paths as given
        return os.path.abspath(Path(path).expanduser()) if path else path

    model = absolute(cfg.model) if cfg.model.endswith(".json") else cfg.model
    pretrained = absolute(cfg.pretrained) if cfg.pretrained and Path(cfg.pretrained).is_file() else cfg.pretrained
    return dataclasses.replace(
        cfg, data=absolute(cfg.data), split_json=absolute(cfg.split_json), image_root=absolute(cfg.image_root),
        classnames_file=absolute(cfg.classnames_file), targets=[absolute(t) for t in cfg.targets],
        descriptions=absolute(cfg.descriptions), anchors=absolute(cfg.anchors), model=model, pretrained=pretrained,
    )


def _preset_values(method: str, name: str) -> dict:
    """The released settings ``--preset name`` stands for under ``method``: the method modules' own tables for
    CoCoOp / MaPLe / DePT (:func:`anchoropt.methods.entries.released_settings`), else the CoOp+AnchorOPT table."""
    from ..methods.entries import PRESET_METHOD, released_settings

    values = get_preset(name).to_dict()
    base = (method or "").partition(":")[0].strip()
    if base in PRESET_METHOD:
        values.update(released_settings(base, name))
    return values
