"""Stage I anchors shared by the runs of a grid that would learn the same ones.

Stage I (:class:`~anchoropt.AnchorLearner`) is full-batch gradient descent from the anchors' random start: it
draws no random numbers after that start, so its result is a function of the start and of its inputs.  Every
AnchorOPT row of a grid (CoOp / CoCoOp / MaPLe / DePT + AnchorOPT, a ``kd_weight=0`` ablation ...) on one
dataset and seed learns the same anchors; :class:`Stage1Cache` lets the first run learn them and the others
read them (Table 1: once per dataset and seed instead of once per row).

The key is the sha256 of everything the result depends on, so a hit gives the very bits a fresh Stage I gives:

* the anchors' initial values ``(N, D)`` (whatever random state drew them is part of the key),
* the description features ``(S, E)`` and their class index ``(S,)``,
* the anchor prompt's token ids and positions, and the text tower's weights (every tensor it reads),
* the optimisation settings (steps, lr, MSE weight, schedule, steps per epoch, warm-up lr),
* what changes floating-point bits: the torch and anchoropt versions, the device (a GPU by its model), dtype,
  torch threads.  (CPUs are told apart only as ``cpu``: grid shards on machines with other vector units that
  share one ``OUT`` may read anchors that differ from their own Stage I's in the last bits.)

Files: ``<dir>/<key>.safetensors`` (the learned anchors, their first / last loss in the metadata), each
written atomically, so two processes that learn the same anchors at once both write the same complete file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["Stage1Cache", "CachedAnchors"]


@dataclass(frozen=True)
class CachedAnchors:
    """A cache hit: the learned anchors ``(N, D)`` float32 and the losses of the run that learned them."""

    anchors: torch.Tensor
    loss_first: float
    loss_last: float


class Stage1Cache:
    """Learned Stage I anchors in ``directory``, keyed by :meth:`key` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def key(self, learner, targets, fit_options: Mapping[str, Any]) -> str:
        """The sha256 key of ``learner`` (an :class:`~anchoropt.AnchorLearner` before ``fit``) learning from
        ``targets`` (:class:`~anchoropt.anchors.DescriptionTargets`) with ``fit``'s ``fit_options``."""
        from .. import __version__

        tower, layout = learner.tower, learner.template.anchor
        digest = hashlib.sha256()
        settings = {"fit": dict(fit_options), "torch": torch.__version__, "anchoropt": __version__,
                    "device": _device_name(tower.device), "dtype": str(tower.dtype), "threads": torch.get_num_threads(),
                    "slots": list(layout.slot_positions), "tower": [tower.layout, tower.pool_type, tower.eos_id,
                                                                    tower.causal, tower.pad_mask_id]}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
        tensors = {"init": learner.anchors, "targets": targets.features, "class_index": targets.class_index,
                   "token_ids": learner.template.anchor_token_ids,
                   "pool_index": learner.template.anchor_pool_index, **_tower_tensors(tower)}
        for name in sorted(tensors):
            _update(digest, name, tensors[name])
        return digest.hexdigest()

    def load(self, key: str) -> CachedAnchors | None:
        """The anchors stored under ``key``, or ``None`` (no file, or one that cannot be read: learn again)."""
        from ..io import anchors_metadata, load_anchors

        path = self._path(key)
        if not path.is_file():
            return None
        try:
            losses = anchors_metadata(path)
            return CachedAnchors(load_anchors(path), float(losses["loss_first"]), float(losses["loss_last"]))
        except (ValueError, KeyError, OSError):  # a damaged or foreign file is ignored, then replaced
            return None

    def store(self, key: str, anchors: torch.Tensor, loss_first: float, loss_last: float) -> Path:
        """Write ``anchors`` ``(N, D)`` and their losses under ``key`` (:func:`~anchoropt.io.save_anchors`: atomic,
        with the anchors' sha256)."""
        from ..io import save_anchors

        return save_anchors(anchors, self._path(key), extra={"stage1_key": key, "loss_first": repr(float(loss_first)),
                                                             "loss_last": repr(float(loss_last))})

    def _path(self, key: str) -> Path:
        if len(key) != 64 or any(ch not in "0123456789abcdef" for ch in key):
            raise ValueError(f"not a Stage I cache key: {key!r}")
        return self.directory / f"{key}.safetensors"


def _tower_tensors(tower) -> dict[str, torch.Tensor]:
    """Every tensor the text tower reads: token and positional embeddings, transformer, final norm, projection."""
    out = {"tower.token_embedding": tower.token_embedding.weight,
           "tower.positional_embedding": tower.positional_embedding}
    for prefix, module in (("tower.transformer.", tower.transformer), ("tower.ln_final.", tower.ln_final)):
        out.update({prefix + k: v for k, v in module.state_dict().items()})
    proj = tower.text_projection
    if isinstance(proj, torch.nn.Module):
        out.update({"tower.text_projection." + k: v for k, v in proj.state_dict().items()})
    elif proj is not None:
        out["tower.text_projection"] = proj
    return out


def _device_name(device: torch.device) -> str:
    """``"cpu"``, or the GPU's model (two GPU models may round differently)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _update(digest, name: str, tensor: torch.Tensor) -> None:
    """Feed ``name``, dtype, shape and the exact values of ``tensor`` to ``digest``."""
    t = tensor.detach().cpu().contiguous()
    digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
