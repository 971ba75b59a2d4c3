"""Frozen CLIP models for a run: building them (open_clip or tiny test towers), transforms, image features.

Axes: ``B`` images, ``E`` joint-embedding width.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from .config import AUGMENTATIONS


def _tiny(factory: str, **kwargs):
    def build():
        from .. import testing

        return getattr(testing, factory)(image_size=32, **kwargs)

    return build


TINY_MODELS: dict[str, Callable[[], nn.Module]] = {
    # random-weight towers for tests and offline demos (CLIP BPE vocabulary, 32 x 32 images)
    "tiny-test": _tiny("tiny_open_clip"),
    # CustomTextCLIP with a timm image tower, as open_clip's EVA02-B-16 (timm Eva, rope; causal text, EOT
    # pooling) and ViT-B-16-SigLIP (timm ViT, MAP pooling; bidirectional text, last-token pooling) configs
    "tiny-eva-test": _tiny("tiny_timm_clip", kind="eva"),
    "tiny-siglip-test": _tiny("tiny_timm_clip", kind="siglip"),
}


RANDOM = "random"
""":attr:`ModelBundle.weights` of a model without trained weights."""

TOY_MODEL = "toy-clip"
"""The toy world's small pretrained CLIP, shipped with the package (offline, no ``--pretrained`` needed)."""


@dataclass
class ModelBundle:
    """A frozen CLIP with its tokenizer and image transforms."""

    model: nn.Module
    tokenizer: Callable | None
    train_transform: Callable
    test_transform: Callable
    name: str = "custom"
    weights: str | None = None
    """What the weights are, as built: ``"random"``, an open_clip tag, a file, ``"toy-clip (shipped)"``;
    ``None`` for a bundle built by hand (then the run's ``--pretrained`` decides the random-weights flag)."""


def build_model(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    augment: str = "rrc_flip",
) -> ModelBundle:
    """An open_clip model by name (or a ``.json`` model config file, or a ``tiny-*`` test model), frozen.

    Args:
        pretrained: an open_clip tag (``"openai"``, ``"laion2b_s34b_b88k"`` ... needs a network or a filled
            cache), a local checkpoint file, or ``None`` / ``"none"`` for random weights.
        augment: training transform: ``"rrc_flip"`` (random resized crop, scale 0.08-1, + horizontal flip,
            as the CoOp family) or ``"none"`` (the test transform).
    """
    if name == TOY_MODEL:
        return _toy_bundle(pretrained, device, precision, augment)
    pretrained = None if pretrained in (None, "", "none", "None") else str(pretrained)
    if name in TINY_MODELS:
        model = TINY_MODELS[name]()
        if pretrained is not None:
            if not Path(pretrained).is_file():
                raise ValueError(f"{name} is a random-weight test model: --pretrained must be 'none' or a weights "
                                 f"file, got {pretrained!r}")
            _load_state_dict_file(model, pretrained)
        tokenizer = None
    else:
        import open_clip

        if name.endswith(".json"):
            config = Path(name)
            if not config.is_file():
                raise FileNotFoundError(f"model config file not found: {config}")
            open_clip.add_model_config(config)
            name = config.stem
        if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(f"unknown open_clip model {name!r}{_did_you_mean(name, open_clip.list_models())}; "
                             "see open_clip.list_models() (or pass a .json config)")
        if pretrained is not None and not Path(pretrained).is_file():
            tags = open_clip.list_pretrained_tags_by_model(name)
            if pretrained not in tags:
                raise ValueError(f"--pretrained {pretrained!r} is neither a file nor a pretrained tag of {name} "
                                 f"(tags: {', '.join(tags) or 'none'}; or 'none' for random weights)")
            _check_downloadable(name, pretrained)
        try:
            model = open_clip.create_model(name, pretrained=pretrained, precision=precision, device=device)
        except (OSError, RuntimeError) as err:  # a download that failed half-way, a corrupt cached file
            if pretrained is None or Path(pretrained).is_file():
                raise
            raise ValueError(f"could not load the {pretrained!r} weights of {name} ({_first_line(err)}); "
                             f"{_PRETRAINED_CHOICES}") from None
        tokenizer = open_clip.get_tokenizer(name)
    model = model.to(device).eval().requires_grad_(False)
    test_tf = eval_transform(model)
    train_tf = train_transform(model, augment)
    return ModelBundle(model, tokenizer, train_tf, test_tf, name, weights=pretrained or RANDOM)


_PRETRAINED_CHOICES = ("pass --pretrained none (random weights, to try the code), --pretrained FILE (a local "
                       "checkpoint), or a tag where it can be downloaded")
_TRUE = ("1", "true", "yes", "on")


def _did_you_mean(name: str, known: list[str]) -> str:
    """`` (did you mean 'ViT-B-32'?)`` for ``ViT-B/32`` and other near misses; empty when nothing is close."""
    exact = [c for c in known if c.lower() == name.replace("/", "-").lower()]
    candidates = exact or difflib.get_close_matches(name, known, n=3, cutoff=0.75)
    return f" (did you mean {', '.join(repr(c) for c in candidates[:3])}?)" if candidates else ""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _check_downloadable(name: str, tag: str, timeout: float = 3.0) -> None:
    """Fail at once, in one line, when an open_clip tag's weights are not cached and cannot be downloaded.

    Without this, a missing network costs a minute of retries and several chained tracebacks.  Offline
    means ``HF_HUB_OFFLINE`` set, or the download host refusing a connection within ``timeout`` seconds.
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg or "file" in cfg or _cached(cfg):
        return
    hub = cfg.get("hf_hub", "")
    host = "huggingface.co" if hub else urlparse(cfg.get("url", "")).hostname
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        reason = "HF_HUB_OFFLINE is set"
    elif host and not _reachable(host, timeout):
        reason = f"{host} cannot be reached"
    else:
        return
    raise ValueError(f"--pretrained {tag} needs a download of {name}'s weights, which are not cached here and "
                     f"{reason}: {_PRETRAINED_CHOICES}")


def _cached(cfg: dict) -> bool:
    """Whether open_clip would find ``cfg``'s weights without a download (Hugging Face cache or URL cache)."""
    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return False
        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith(".bin"):
            names.insert(0, filename.replace("open_clip_pytorch_model", "open_clip_model").replace(".bin",
                                                                                                    ".safetensors"))
        return any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)
    url = cfg.get("url", "")
    return bool(url) and (Path("~/.cache/clip").expanduser() / os.path.basename(urlparse(url).path)).is_file()


def _reachable(host: str, timeout: float) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _toy_bundle(pretrained: str | None, device, precision: str, augment: str) -> ModelBundle:
    """The toy world's CLIP (:mod:`anchoropt.toyworld`): the shipped weights (no ``pretrained``, or the CLI's
    default tag ``openai``), a checkpoint file, or random weights for ``none``."""
    from ..toyworld import load_model
    from ..toyworld.model import build_model as build_toy_model

    if precision not in ("fp32", "amp", "amp_bf16", "amp_bfloat16"):
        raise ValueError(f"{TOY_MODEL} runs in fp32 (or amp); got precision {precision!r}")
    shipped = pretrained in (None, "", "openai", "none", "None")
    model, _, tokenizer = load_model(None if shipped else str(pretrained), device=device)
    weights = f"{TOY_MODEL} (shipped)" if shipped else str(pretrained)
    if pretrained in ("none", "None"):
        model, weights = build_toy_model(seed=0).to(device).eval().requires_grad_(False), RANDOM
    return ModelBundle(model, tokenizer, train_transform(model, augment), eval_transform(model), TOY_MODEL, weights)


def _load_state_dict_file(model: nn.Module, path: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    model.load_state_dict(state)


def _preprocess_cfg(model: nn.Module):
    from open_clip.transform import PreprocessCfg

    visual = getattr(model, "visual", model)
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    if "size" not in cfg:
        size = getattr(visual, "image_size", None) or getattr(visual, "input_resolution", 224)
        cfg["size"] = size
    known = {f.name for f in dataclasses.fields(PreprocessCfg)}
    return PreprocessCfg(**{k: v for k, v in cfg.items() if k in known})


def eval_transform(model: nn.Module) -> Callable:
    """open_clip's evaluation transform for ``model`` (resize, centre crop, normalise)."""
    from open_clip.transform import image_transform_v2

    return image_transform_v2(_preprocess_cfg(model), is_train=False)


def train_transform(model: nn.Module, augment: str = "rrc_flip") -> Callable:
    """Training transform: the CoOp family's random resized crop (scale 0.08-1, bicubic) + horizontal flip,
    with open_clip's normalisation for ``model``; ``augment="none"`` gives the test transform."""
    if augment == "none":
        return eval_transform(model)
    if augment != "rrc_flip":
        raise ValueError(f"unknown augmentation {augment!r}; choose one of {AUGMENTATIONS}")
    from open_clip.transform import AugmentationCfg, image_transform_v2
    from torchvision import transforms as T

    rrc = image_transform_v2(_preprocess_cfg(model), is_train=True, aug_cfg=AugmentationCfg(scale=(0.08, 1.0)))
    return T.Compose([T.RandomHorizontalFlip(), rrc])


@torch.no_grad()
def encode_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image features ``(B, E)`` (float32) of the frozen image tower."""
    return F.normalize(encode_images_raw(model, images), dim=-1)


@torch.no_grad()
def encode_images_raw(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Image features ``(B, E)`` (float32, not normalised) of the frozen image tower: DePT's head reads these."""
    dtype = next(model.visual.parameters()).dtype if hasattr(model, "visual") else torch.float32
    return model.encode_image(images.to(dtype)).float()


def _text_width(model: nn.Module) -> int:
    from ..towers import TextTower

    return TextTower.from_model(model).width
