"""Each dataset's own recipe in a grid: its preset and its descriptions file, picked from the recognised dataset.

A grid over the paper's datasets (``anchoropt grid --data DATA/caltech-101 DATA/oxford_pets ...``) trains each
with the released settings of that dataset.  :func:`dataset_recipe` fills one run's config:

* ``preset``: not given -> the preset of the dataset the folder holds (:func:`anchoropt.datasets.layouts.recognise`:
  the split file's or the layout's Dassl name, else the folder's name; ``xd`` for ImageNet under the
  cross-dataset / domain-generalisation protocols, the released cross-dataset script's settings); given -> kept,
  with a warning when it is another dataset's preset (``--preset eurosat`` on Oxford Pets);
* ``descriptions``: a folder of CuPL files -> ``<preset>.json`` in it (else ``<folder name>.json``), so datasets
  that share a class name ('lotus', 'pizza', 'sunflower') each read their own sentences.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from ..datasets import layouts
from .config import RunConfig

__all__ = ["recognised_dataset", "recognised_preset", "dataset_recipe"]

_NEUTRAL = ("default", "xd", "cross_dataset")


def recognised_dataset(data: str) -> str | None:
    """The released tables' key of the dataset in folder ``data`` (``"oxford_pets"``, ``"imagenet"``, ...): from
    the split file's or the layout's Dassl name, else the folder's name; ``None`` when neither names one."""
    from ..methods.presets import canonical_name

    for name in (layouts.recognise(data), Path(data).name):
        if name:
            try:
                key = canonical_name(name)
            except KeyError:
                continue
            if key not in _NEUTRAL:
                return key
    return None


def recognised_preset(data: str, protocol: str = "base2novel") -> str | None:
    """The preset for folder ``data`` under ``protocol``: its dataset's, and ``xd`` for ImageNet (the source of the
    cross-dataset and domain-generalisation protocols, the released cross-dataset script's settings)."""
    key = recognised_dataset(data)
    return "xd" if key == "imagenet" and protocol != "base2novel" else key


def dataset_recipe(cfg: RunConfig) -> RunConfig:
    """``cfg`` (one run of a grid, ``cfg.data`` its dataset) with its dataset's preset and descriptions file."""
    from ..methods.presets import canonical_name

    if not cfg.data:
        return cfg
    dataset = recognised_dataset(cfg.data)
    if cfg.preset is None and dataset:
        cfg = dataclasses.replace(cfg, preset=recognised_preset(cfg.data, cfg.protocol))
    elif cfg.preset and dataset:
        try:
            given = canonical_name(cfg.preset)
        except KeyError:
            given = None
        if given not in _NEUTRAL and given != dataset:
            warnings.warn(f"--preset {cfg.preset} is another dataset's preset: {cfg.data} holds {dataset} "
                          "(leave --preset out to use each dataset's own)", stacklevel=2)
    if cfg.descriptions and Path(cfg.descriptions).is_dir():
        folder = Path(cfg.descriptions)
        stems = list(dict.fromkeys(s for s in (dataset, Path(cfg.data).name) if s))
        found = next((folder / f"{s}.json" for s in stems if (folder / f"{s}.json").is_file()), None)
        if found is None:
            raise FileNotFoundError(f"--descriptions {folder}: no descriptions file for {cfg.data} (looked for "
                                    f"{', '.join(f'{s}.json' for s in stems)})")
        cfg = dataclasses.replace(cfg, descriptions=str(found))
    return cfg
