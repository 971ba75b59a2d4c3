"""The run configuration: :class:`RunConfig`, its choices, and reading it back from a run directory."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from .._jsonfile import read_json
from ..presets import preset as get_preset

PROTOCOLS = ("base2novel", "cross-dataset", "domain-generalization")
EVAL_MODES = ("auto", "base", "novel", "anchor")
AUGMENTATIONS = ("rrc_flip", "none")
RUN_CONFIG = "run_config.json"
RESULTS = "results.json"


@dataclass
class RunConfig:
    """Everything a run needs; written to ``run_config.json`` so ``eval`` can rebuild it.

    ``None`` fields are filled by :meth:`resolve` from the preset (``preset=``), then the defaults below
    (the paper's loss: CE 1 + KD 10 per sample, T 1; the released script's 100 epochs and 4 soft tokens).
    """

    protocol: str = "base2novel"
    data: str | None = None
    split_json: str | None = None
    image_root: str | None = None
    classnames_file: str | None = None
    targets: list[str] = field(default_factory=list)
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    precision: str = "fp32"
    preset: str | None = None
    descriptions: str | None = None
    anchors: str | None = None
    output: str = "runs/anchoropt"
    seed: int = 1
    shots: int | None = None
    n_soft: int | None = None
    n_anchor: int | None = None
    preposition: str = "of"
    deep_depth: int = 0
    pae: bool = False
    pae_alpha: float = 0.5
    pae_beta: float = 0.2
    pae_dim: int = 256
    pae_mode: str = "global"
    pae_reading: str = "released"
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

    _DEFAULTS = dict(
        shots=16, n_soft=4, n_anchor=1, tau=1.0, epochs=100, batch_size=32, lr=0.002, momentum=0.9,
        weight_decay=5e-4, warmup_epochs=1, warmup_lr=1e-5, ce_weight=1.0, kd_weight=10.0, kd_temperature=1.0,
        kd_normalization="batchmean", stage1_mse_weight=1000.0, stage1_lr=0.002, max_descriptions=10,
    )

    def resolve(self) -> "RunConfig":
        """A copy with every ``None`` hyperparameter filled (explicit > preset > defaults), validated."""
        values = dataclasses.asdict(self)
        chosen = get_preset(self.preset).to_dict() if self.preset else {}
        for key, default in self._DEFAULTS.items():
            if values[key] is None:
                values[key] = chosen.get(key, default)
        cfg = RunConfig(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {PROTOCOLS}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.augment!r}; choose one of {AUGMENTATIONS}")
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
        for name in ("epochs", "batch_size", "n_anchor"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def _validate_pae(self) -> None:
        if not self.pae:
            return
        from ..functional import PAE_READINGS
        from ..pae import MODES

        if self.deep_depth < 2:
            raise ValueError(f"--pae regularises the deep variant's per-layer prompts: it needs --deep-depth >= 2 "
                             f"(at least one pair of layers), got --deep-depth {self.deep_depth}")
        if self.pae_alpha < 0 or self.pae_beta < 0:
            raise ValueError(f"--pae-alpha and --pae-beta must be >= 0, got {self.pae_alpha} and {self.pae_beta}")
        if self.pae_dim < 1:
            raise ValueError(f"--pae-dim must be >= 1, got {self.pae_dim}")
        if self.pae_mode not in MODES:
            raise ValueError(f"unknown --pae-mode {self.pae_mode!r}; choose one of {MODES}")
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
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def load_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """The :class:`RunConfig` a run directory was trained with (``run_config.json``)."""
    path = Path(run_dir) / RUN_CONFIG
    return RunConfig.from_json(
        read_json(path, f"{path} not found: is {run_dir} a run directory written by `anchoropt train`?")
    )


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
