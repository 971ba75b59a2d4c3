"""Save and load AnchorOPT's learned tensors: safetensors + a small JSON config.

Only learned, class-independent tensors are stored (anchors, soft tokens, position logits); the
class-dependent prompts are rebuilt for whatever class list is given on load, so a learner trained on base
classes evaluates on novel ones.  Loading never unpickles: safetensors for our files, and the authors'
Dassl checkpoints through :mod:`anchoropt.official`.

Layout of a saved prompt learner directory::

    anchoropt_config.json     {"format": "anchoropt", "kind": "prompt_learner", "width": 512, ...}
    anchoropt.safetensors     soft (M, D), anchors (N, D), position.logits (M+N, M+N)
                              [+ deep.prompts (deep_depth, M, D) for the deep variant]

    anchoropt_manifest.json   written last: sizes and sha256 of both files, tensor shapes, format version,
                              the run id (if any); see :mod:`anchoropt._files`

A save is complete or absent: the files are staged and moved in with the manifest last, and a load checks
every file against the manifest, so an interrupted, mixed or edited save is refused instead of loading
(:class:`~anchoropt._files.IncompleteSaveError`), and an interrupted re-save leaves the previous one
loadable.  Directories written before manifests existed still load, with a warning.  Loaded tensors must
be finite; a config with a missing key or a wrong type is refused with the key's name.

Format versions: 1 = shallow learner; 2 = adds ``deep_depth`` / ``deep_length`` and ``deep.prompts``, and
the template options of AnchorOPT on an ATPrompt template / the released pooling (``attributes``,
``n_attr_soft``, ``pooling``, ``legacy_single_token``, tensor ``attribute_soft``).  A plain shallow learner is
still written as version 1 (readable by older anchoropt); files without these keys load as before.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as safetensors_bytes
from torch import nn

from . import _files, _moved
from ._files import IncompleteSaveError
from ._jsonfile import parse_json
from ._version import __version__
from .official import load_official_anchors

if TYPE_CHECKING:  # for annotations only: the learner imports this module, not the other way round
    from .prompts import AnchorOPTPromptLearner

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "save_anchors",
    "load_anchors",
    "save_prompt_learner",
    "read_prompt_learner",
    "read_config",
    "read_manifest",
    "IncompleteSaveError",
]

CONFIG_NAME = "anchoropt_config.json"
WEIGHTS_NAME = "anchoropt.safetensors"
FORMAT_VERSION = 1  # anchors and shallow prompt learners
DEEP_FORMAT_VERSION = 2  # prompt learners with deep prompts; also the newest format this version reads


# Keys of a prompt learner's config and the types a load accepts (a hand-edited file is checked key by key).
_CONFIG_KEYS: dict[str, tuple[type, ...]] = {
    "width": (int,), "n_soft": (int,), "n_anchor": (int,), "preposition": (str, type(None)),
    "tau": (int, float), "arrangement": (str,), "trained_classnames": (list,),
}
_OPTIONAL_KEYS: dict[str, tuple[type, ...]] = {
    "sample_in_eval": (bool,), "deep_depth": (int,), "deep_length": (int,), "format_version": (int,),
    "attributes": (list,), "n_attr_soft": (int,), "pooling": (str,), "legacy_single_token": (bool,),
}


# ---------------------------------------------------------------------- anchors (Stage I output)
def save_anchors(
    anchors: torch.Tensor | nn.Module,
    path: str | os.PathLike,
    classnames: Sequence[str] = (),
    run_id: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write Stage I anchors ``(N, D)`` (or an :class:`~anchoropt.AnchorLearner`'s) to a safetensors file.

    The file is replaced atomically and carries the sha256 of the anchors (checked on load) and, when
    given, the ``run_id`` of the run it belongs to and ``extra`` metadata entries (read back with
    :func:`anchors_metadata`).
    """
    tensor = anchors.anchors if isinstance(anchors, nn.Module) else anchors
    tensor = tensor.detach().float().cpu().contiguous()
    if tensor.dim() != 2:
        raise ValueError(f"anchors must have shape (N, D), got {tuple(tensor.shape)}")
    _check_finite("anchors", tensor, "the anchors to save")
    metadata = {
        "format": "anchoropt",
        "kind": "anchors",
        "format_version": str(FORMAT_VERSION),
        "width": str(tensor.shape[1]),
        "trained_classnames": json.dumps(list(getattr(anchors, "classnames", classnames))),
        "sha256": _tensor_sha256(tensor),
    }
    if run_id is not None:
        metadata["run_id"] = str(run_id)
    metadata.update({str(k): str(v) for k, v in (extra or {}).items()})
    return _files.write_bytes(path, safetensors_bytes({"anchors": tensor}, metadata=metadata))


def load_anchors(path: str | os.PathLike, expected_width: int | None = None) -> torch.Tensor:
    """Anchors ``(N, D)`` float32 from our safetensors file or an authors' Dassl ``model.pth.tar``.

    Args:
        expected_width: the text tower's width ``D``; a file made for another width is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"anchor file not found: {path}")
    if path.suffix != ".safetensors":
        return load_official_anchors(path, expected_width=expected_width)
    tensors, metadata = _read_safetensors(path.read_bytes(), path)
    if "anchors" not in tensors:
        raise ValueError(f"{path} holds no 'anchors' tensor (found: {sorted(tensors)})")
    anchors = tensors["anchors"]
    if anchors.dim() != 2:
        raise ValueError(f"{path}: anchors must have shape (N, D), got {tuple(anchors.shape)}")
    if "sha256" in metadata and metadata["sha256"] != _tensor_sha256(anchors.float().contiguous()):
        raise IncompleteSaveError(f"{path}: the anchors do not match the file's sha256 (the file was edited or damaged)")
    _check_finite("anchors", anchors, path)
    _check_width(anchors.shape[1], expected_width, path)
    return anchors.float()


def anchors_run_id(path: str | os.PathLike) -> str | None:
    """The ``run_id`` recorded in an anchors safetensors file (``None`` when it has none)."""
    return anchors_metadata(path).get("run_id")


def anchors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of an anchors safetensors file (format, width, sha256, run id, ``extra`` entries)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for a damaged or truncated file
        raise ValueError(f"{path} is not a readable safetensors file ({err}): it was cut short or damaged; "
                         "remove it (or the run) and run Stage I again") from err


# ---------------------------------------------------------------------- Stage II prompt learner
def save_prompt_learner(
    learner: "AnchorOPTPromptLearner",
    directory: str | os.PathLike,
    run_id: str | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write ``learner``'s learned tensors and configuration to ``directory`` (created if needed).

    Complete or absent (see the module docstring).  ``run_id`` is recorded in the manifest;
    ``extra_files`` (name -> bytes, e.g. a training checkpoint's optimizer state) join the same set.
    """
    directory = Path(directory)
    position = learner.position
    deep = getattr(learner, "deep", None)
    config = {
        "format": "anchoropt",
        "kind": "prompt_learner",
        "format_version": DEEP_FORMAT_VERSION if deep is not None else FORMAT_VERSION,
        "anchoropt_version": __version__,
        "width": learner.tower.width,
        "n_soft": learner.n_soft,
        "n_anchor": learner.n_anchor,
        "preposition": learner.preposition,
        "tau": position.tau,
        "arrangement": position.arrangement,
        "sample_in_eval": position.sample_in_eval,
        "trained_classnames": learner.classnames,
    }
    if deep is not None:
        config["deep_depth"], config["deep_length"] = deep.depth, deep.length
    layout = getattr(learner, "layout_options", {})
    if layout.get("attributes") or layout.get("pooling", "eot") != "eot":
        config["format_version"] = DEEP_FORMAT_VERSION
        config.update(attributes=list(layout["attributes"]), n_attr_soft=learner.template.n_attr_soft,
                      pooling=layout["pooling"], legacy_single_token=layout["legacy_single_token"])
    tensors = state_tensors(learner)
    for name, tensor in tensors.items():
        _check_finite(name, tensor, "the prompt learner to save")
    files = {
        WEIGHTS_NAME: safetensors_bytes(tensors, metadata={"format": "anchoropt"}),
        CONFIG_NAME: _files.json_text(config).encode("utf-8"),
        **dict(extra_files or {}),
    }
    info = {
        "kind": "prompt_learner",
        "format_version": config["format_version"],
        "tensors": tensor_shapes(tensors),
        "run_id": run_id,
    }
    return _files.commit_files(directory, files, info)


def state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` made ready for safetensors: detached, on the CPU, contiguous, each tensor its
    own copy (safetensors refuses tensors sharing storage, and a CPU tensor's ``.cpu()`` is not a copy)."""
    return {name: t.detach().cpu().clone().contiguous() for name, t in module.state_dict().items()}


def tensor_shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """``{name: {"shape": [...], "dtype": "float32"}}``: what a manifest records of a set's tensors."""
    return {name: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for name, t in tensors.items()}


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (the CPU for a module with neither)."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if first is None else first.device


def read_prompt_learner(directory: str | os.PathLike, width: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """The checked config and tensors of a saved prompt learner, for a text tower of embedding ``width``.

    Everything a load can check before building the learner is checked here: the manifest, the config's keys
    and types, the embedding width, every tensor's presence, shape and finiteness.
    :func:`anchoropt.prompts.load_prompt_learner` builds the learner from what this returns.
    """
    directory = Path(directory)
    config, files, mismatch = _read_saved_set(directory, "prompt_learner", with_weights=True)
    _check_width(config["width"], width, directory)
    weights_path = directory / WEIGHTS_NAME
    tensors, _ = _read_safetensors(files[WEIGHTS_NAME], weights_path)
    expected = {
        "soft": (config["n_soft"], config["width"]),
        "anchors": (config["n_anchor"], config["width"]),
        "position.logits": (config["n_soft"] + config["n_anchor"],) * 2,
    }
    deep_depth = int(config.get("deep_depth", 0))
    if deep_depth:
        if int(config.get("deep_length", config["n_soft"])) != config["n_soft"]:
            raise ValueError(
                f"{directory / CONFIG_NAME}: deep_length {config['deep_length']} must equal n_soft {config['n_soft']}"
            )
        expected["deep.prompts"] = (deep_depth, config["n_soft"], config["width"])
    attributes = list(config.get("attributes", []))
    n_attr_soft = int(config.get("n_attr_soft", config["n_soft"]))
    if attributes and n_attr_soft:
        expected["attribute_soft"] = (len(attributes) * n_attr_soft, config["width"])
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{weights_path} is missing the tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{weights_path}: {name!r} has shape {tuple(tensors[name].shape)}, but the config says {shape}"
            )
    for name, tensor in tensors.items():
        _check_finite(name, tensor, weights_path)
    if mismatch is not None:
        raise mismatch
    return config, tensors


def read_config(directory: str | os.PathLike, kind: str) -> dict:
    """The validated JSON config of a saved ``kind`` in ``directory`` (checked against its manifest)."""
    config, _, mismatch = _read_saved_set(Path(directory), kind, with_weights=False)
    if mismatch is not None:
        raise mismatch
    return config


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of a saved directory (file sizes / sha256, tensor shapes, ``run_id``); ``None`` for a
    directory saved before manifests existed.  Raises :class:`IncompleteSaveError` for an incomplete save."""
    committed = _files.read_committed(directory, names=())
    return None if committed is None else committed[0]


def _read_saved_set(directory: Path, kind: str, with_weights: bool) -> tuple[dict, dict[str, bytes], Exception | None]:
    """``(validated config, {file name: bytes}, mismatch)`` of a saved directory.

    ``mismatch`` is the :class:`IncompleteSaveError` of files that differ from the manifest (interrupted, mixed
    or edited); the files are then read as they are, so that a specific problem (a missing key, a NaN tensor)
    is reported by name first; the caller raises ``mismatch`` when nothing more specific was found.
    """
    names = (CONFIG_NAME, WEIGHTS_NAME) if with_weights else (CONFIG_NAME,)
    config_path = directory / CONFIG_NAME
    mismatch: Exception | None = None
    try:
        committed = _files.read_committed(directory, names=names)
    except IncompleteSaveError as err:
        committed, mismatch = None, err
    if committed is not None:
        files = committed[1]
        missing = [n for n in names if n not in files]
        if missing:
            raise IncompleteSaveError(f"{directory}: its manifest lists no {missing[0]}: not a saved anchoropt {kind}")
    else:
        if not config_path.is_file():
            if mismatch is not None:
                raise mismatch
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a saved anchoropt {kind.replace('_', ' ')}")
        if mismatch is None:
            warnings.warn(
                f"{directory} has no {_files.MANIFEST_NAME} (saved by an anchoropt before 0.2, or copied without "
                "it): its files cannot be checked for completeness; save it again to add one",
                stacklevel=3,
            )
        files = {CONFIG_NAME: config_path.read_bytes()}
        if with_weights:
            if not (directory / WEIGHTS_NAME).is_file():
                raise mismatch or FileNotFoundError(f"weights file not found: {directory / WEIGHTS_NAME}")
            files[WEIGHTS_NAME] = (directory / WEIGHTS_NAME).read_bytes()
    try:
        text = files[CONFIG_NAME].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{config_path} is not UTF-8 text") from None
    return _validated_config(parse_json(text, str(config_path)), config_path, kind), files, mismatch


def _validated_config(config: Any, path: Path, kind: str) -> dict:
    if not isinstance(config, dict) or config.get("format") != "anchoropt" or config.get("kind") != kind:
        raise ValueError(f"{path} is not an anchoropt {kind} config")
    version = config.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"{path}: format_version must be an integer, got {version!r}")
    if version > DEEP_FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer anchoropt (format {version}); upgrade anchoropt")
    if kind != "prompt_learner":
        return config
    for key, types in {**_CONFIG_KEYS, **_OPTIONAL_KEYS}.items():
        if key not in config:
            if key in _CONFIG_KEYS:
                raise ValueError(f"{path} has no {key!r} entry: the config is incomplete (save the learner again)")
            continue
        value = config[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ValueError(f"{path}: {key!r} must be {wanted}, got {value!r}")
    for key in ("width", "n_anchor"):
        if config[key] < 1:
            raise ValueError(f"{path}: {key!r} must be >= 1, got {config[key]}")
    for key in ("n_soft", "deep_depth"):
        if config.get(key, 0) < 0:
            raise ValueError(f"{path}: {key!r} must be >= 0, got {config[key]}")
    if not (math.isfinite(config["tau"]) and config["tau"] > 0):
        raise ValueError(f"{path}: 'tau' must be > 0, got {config['tau']!r} (a finite number)")
    if not all(isinstance(name, str) for name in config["trained_classnames"]):
        raise ValueError(f"{path}: 'trained_classnames' must be a list of strings")
    return config


def _read_safetensors(data: bytes, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of safetensors ``data`` read from ``path`` (named in errors)."""
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    return tensors, _safetensors_metadata(data)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return dict(header.get("__metadata__") or {})


def _tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of the tensor's dtype, shape and values (its safetensors serialisation without metadata)."""
    return hashlib.sha256(safetensors_bytes({"t": tensor.contiguous()})).hexdigest()


def _check_finite(name: str, tensor: torch.Tensor, where: Any) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{where}: tensor {name!r} holds {bad} NaN / inf value(s); it cannot be used")


def _check_width(found: int, expected: int | None, where: Path) -> None:
    if expected is not None and int(found) != int(expected):
        raise ValueError(
            f"{where} was made for a text tower of width {found}, but this tower has width {expected}: "
            "it belongs to another CLIP model"
        )


# load_prompt_learner builds the learner, so it lives beside it now (anchoropt.prompts); the old path warns.
__getattr__ = _moved.moved_names(__name__, {"load_prompt_learner": "anchoropt.prompts"})
