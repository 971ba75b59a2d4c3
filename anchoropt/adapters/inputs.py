"""What an adapter shim reads from the peer's prompt learner and from the user, checked before anything changes.

Token ids (:func:`shift_token_ids`), Stage I anchors (:func:`resolve_anchors`), the inference mode
(:func:`check_mode`), the peer's tokenizer (:func:`peer_tokenizer`), required attributes; and the small helpers
the shims share (autocast off, one-time warnings).

Axes: ``C`` classes, ``L`` positions, ``N`` anchors, ``D`` width.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..io import load_anchors

if TYPE_CHECKING:  # annotations only: base.py imports this module
    from .base import AnchorOPTInjection

__all__ = ["MODES", "check_mode", "peer_tokenizer", "resolve_anchors", "shift_token_ids", "warn_once"]

MODES = ("base", "novel")


def shift_token_ids(ids: torch.Tensor, n_soft: int, n_anchor: int, classnames: Sequence[str]) -> torch.Tensor:
    """Token ids ``(C, L)`` with ``n_anchor`` placeholder ids inserted after SOS + ``n_soft`` ctx tokens and as many
    trailing pads dropped; refuses prompts whose EOT would fall off the end."""
    if ids.dim() != 2:
        raise ValueError(f"tokenized_prompts must be (n_cls, context_length), got {tuple(ids.shape)}")
    length = ids.shape[1]
    eot = ids.argmax(dim=-1)
    too_long = (eot + n_anchor >= length).nonzero().flatten().tolist()
    if too_long:
        names = ", ".join(repr(classnames[i]) if i < len(classnames) else f"#{i}" for i in too_long[:5])
        raise ValueError(
            f"class name(s) {names} leave no room for {n_anchor} anchor token(s): with {n_soft} soft token(s) "
            f"their prompt's end-of-text token would fall off the {length}-token context; shorten the name(s) "
            "or use fewer soft tokens"
        )
    if 1 + n_soft >= length or bool((eot <= n_soft).any()):
        raise ValueError(f"tokenized_prompts do not hold SOS + {n_soft} context token(s) before the class name")
    placeholder = ids[:, 1:2].expand(-1, n_anchor)  # any id below EOT; argmax pooling only needs the EOT
    return torch.cat([ids[:, : 1 + n_soft], placeholder, ids[:, 1 + n_soft : length - n_anchor]], dim=1)


def resolve_anchors(anchors: torch.Tensor | str | os.PathLike, width: int) -> torch.Tensor:
    """Stage I anchors as a float32 ``(N, D)`` tensor (loaded when a path is given)."""
    if anchors is None:
        raise ValueError(
            "no anchors given: pass anchors= (a (N, D) tensor or a path to Stage I anchors), "
            "or set TRAINER.ANCHOROPT.ANCHORS"
        )
    if isinstance(anchors, (str, os.PathLike)):
        if not str(anchors):
            raise ValueError("the anchors path is empty: set TRAINER.ANCHOROPT.ANCHORS or pass anchors=")
        anchors = load_anchors(anchors, expected_width=width)
    if not isinstance(anchors, torch.Tensor):
        raise TypeError(f"anchors must be a tensor (N, {width}) or a path, got {type(anchors).__name__}")
    if anchors.dim() == 1:
        anchors = anchors[None]
    if anchors.dim() != 2 or anchors.shape[1] != width or anchors.shape[0] < 1:
        raise ValueError(
            f"anchors of shape {tuple(anchors.shape)} do not fit this prompt learner: expected (N, {width}); "
            "were they learned with a CLIP of another width?"
        )
    if not torch.isfinite(anchors).all():
        raise ValueError("anchors contain NaN or inf")
    return anchors.detach().float().clone()


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose 'base' (normal prompt) or 'novel' (ensemble)")
    return mode


def peer_tokenizer(learner: nn.Module) -> Callable[..., torch.Tensor] | None:
    """``clip.tokenize`` of the module that defines the learner's class (the peers import ``from clip import clip``)."""
    for cls in type(learner).__mro__:
        found = _module_tokenizer(sys.modules.get(cls.__module__))
        if found is not None:
            return found
    return None


def _module_tokenizer(module: Any) -> Callable[..., torch.Tensor] | None:
    clip = getattr(module, "clip", None)
    tokenize = getattr(clip, "tokenize", None)
    return tokenize if callable(tokenize) else None


def _id_targets(learner: nn.Module, owner: nn.Module | None) -> list[torch.Tensor]:
    targets = [learner.tokenized_prompts]
    other = getattr(owner, "tokenized_prompts", None) if owner is not None else None
    if isinstance(other, torch.Tensor) and other is not targets[0]:
        if other.shape != targets[0].shape:
            raise ValueError(
                f"owner.tokenized_prompts {tuple(other.shape)} does not match the prompt learner's "
                f"{tuple(targets[0].shape)}"
            )
        targets.append(other)
    return targets


def _require(learner: nn.Module, names: Sequence[str], injection: "AnchorOPTInjection") -> None:
    missing = [n for n in names if not hasattr(learner, n)]
    if missing:
        raise TypeError(
            f"{type(learner).__name__} does not look like a {injection._peer_name}: missing {', '.join(missing)}"
        )


@contextlib.contextmanager
def _no_autocast(device: torch.device) -> Iterator[None]:
    try:
        ctx = torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def _name(module: Any) -> str:
    return getattr(module, "__name__", type(module).__name__)


def warn_once(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)
