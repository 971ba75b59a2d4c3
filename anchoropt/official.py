"""Read the authors' Stage-I anchor checkpoints (Dassl ``model.pth.tar``) without running pickled code.

Those files pickle the optimizer and scheduler *objects* (``torch.optim.sgd.SGD``,
``torch.optim.lr_scheduler.CosineAnnealingLR``) next to the weights, so a plain
``torch.load(..., weights_only=True)`` refuses them. We use torch's weights-only unpickler and
map exactly those names to inert stand-ins (``_Inert``, a plain-``dict`` factory), so the real
classes are never built and nothing outside torch's tensor allow-list can be called.
Requires torch >= 2.6 (``safe_globals`` with ``(object, "module.Name")`` pairs).
"""

from __future__ import annotations

import os
import pickle
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "read_dassl_state_dict",
    "load_official_anchors",
]

_KNOWN_WIDTHS = "512 = ViT-B/16 or ViT-B/32, 768 = ViT-L/14, 1024 = ViT-H/14"


class CheckpointError(ValueError):
    """The file is not a usable Dassl anchor checkpoint."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The file's pickle asks for objects or calls outside our allow-list; nothing was run."""


class _Inert:
    """Stand-in for pickled optimizer/scheduler objects: takes their state and ignores it."""

    def __setstate__(self, state: object) -> None:
        pass


def _plain_dict(*_args: object) -> dict:
    """Stand-in for ``collections.defaultdict(factory)``: an empty plain dict, factory ignored."""
    return {}


# Globals the authors' files contain beyond torch's default allow-list (see
# torch.serialization.get_unsafe_globals_in_checkpoint), plus the other torch optimizers and
# schedulers Dassl configs use. Each name resolves to an inert object of ours, never to the real one.
_INERT_NAMES = (
    "torch.optim.sgd.SGD",
    "torch.optim.adam.Adam",
    "torch.optim.adamw.AdamW",
    "torch.optim.rmsprop.RMSprop",
    "torch.optim.lr_scheduler.CosineAnnealingLR",
    "torch.optim.lr_scheduler.StepLR",
    "torch.optim.lr_scheduler.MultiStepLR",
)
_STAND_INS: list[tuple[object, str]] = [(_Inert, name) for name in _INERT_NAMES] + [
    (_plain_dict, "collections.defaultdict"),
    (dict, "builtins.dict"),
]
_MAPPED = {name for _, name in _STAND_INS}
# safe_globals edits process-wide state; serialise our own uses of it.
_LOCK = threading.Lock()


def _check_torch() -> None:
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 6) or not hasattr(torch.serialization, "safe_globals"):
        raise RuntimeError(
            f"reading the authors' checkpoints safely needs torch >= 2.6 (found {torch.__version__}): "
            "older weights-only loading cannot map their optimizer objects to inert stand-ins. "
            "Upgrade torch; we do not fall back to weights_only=False."
        )


def read_dassl_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Dassl checkpoint, read without executing pickled code.

    Returns name -> CPU tensor, dtypes as stored (the authors' ``anchor_ctx_1`` is fp16, [1, 512]).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    _check_torch()
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a torch zip checkpoint (torch.save format since torch 1.6); "
            "the file is corrupt, truncated or of another kind"
        )
    with _LOCK:
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception as e:  # noqa: BLE001 - any failure here means an unreadable archive
            raise CheckpointError(f"{path} is not a readable torch checkpoint: {e}") from None
        refused = sorted(unsafe - _MAPPED)
        if refused:
            raise UnsafeCheckpointError(
                f"refusing {path}: its pickle contains code/objects we refuse to run: {refused}. "
                "Nothing from the file was executed."
            )
        try:
            with torch.serialization.safe_globals(_STAND_INS):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsafeCheckpointError(
                f"refusing {path}: its pickle is corrupt or asks for code/objects we refuse to run "
                f"({detail}). Nothing outside the allow-list was executed."
            ) from None
        except (RuntimeError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{path} is a corrupt or truncated torch checkpoint: {e}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a Dassl checkpoint dict")
    if "state_dict" not in obj:
        raise CheckpointError(
            f"{path} has no 'state_dict' entry (top-level keys: {sorted(map(str, obj))}); "
            "expected a Dassl checkpoint"
        )
    sd = obj["state_dict"]
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(sd).__name__}, not a mapping")
    bad = sorted(str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{path}: 'state_dict' entries that are not tensors: {bad}")
    return {str(k): v for k, v in sd.items()}


def load_official_anchors(
    path: str | os.PathLike[str],
    expected_width: int | None = None,
    key: str | None = None,
) -> torch.Tensor:
    """Anchors (N, width) float32 from an authors' checkpoint.

    ``key`` defaults to the single state-dict key starting with ``anchor_ctx`` (its last dotted
    part may, so ``prompt_learner.anchor_ctx_1`` also matches). ``expected_width`` is the CLIP
    text width the anchors will be used with; a mismatch raises ``CheckpointError``.
    """
    sd = read_dassl_state_dict(path)
    if key is None:
        found = [k for k in sd if k.rsplit(".", 1)[-1].startswith("anchor_ctx")]
        if len(found) != 1:
            what = "no key" if not found else f"{len(found)} keys ({found})"
            raise CheckpointError(
                f"{path}: {what} matching 'anchor_ctx*'; pass key= to choose. Keys found: {sorted(sd)}"
            )
        key = found[0]
    elif key not in sd:
        raise CheckpointError(f"{path}: key {key!r} not in the state_dict. Keys found: {sorted(sd)}")
    t = sd[key]
    if t.ndim != 2 or t.shape[0] < 1:
        raise CheckpointError(
            f"{path}: {key!r} has shape {tuple(t.shape)}; expected anchors of shape (N, width), N >= 1"
        )
    width = int(t.shape[1])
    if expected_width is not None and width != int(expected_width):
        raise CheckpointError(
            f"{path}: anchors have width {width} but the model's text width is {expected_width}; "
            f"the checkpoint was made for another CLIP text width ({_KNOWN_WIDTHS})"
        )
    out = t.detach().to(dtype=torch.float32, copy=True)
    if not torch.isfinite(out).all():
        raise CheckpointError(f"{path}: {key!r} contains NaN or Inf values")
    return out
