"""Class-level patching for the adapter shims: ``module.PromptLearner`` replaced by a subclass that attaches AnchorOPT.

:func:`patch_class` is what every shim's ``patch()`` calls; :class:`ClassPatch` is the handle it returns
(``remove()`` restores the original class).  The injection class is passed in, so this module does not import it.
"""

from __future__ import annotations

import inspect
import weakref
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from .inputs import _module_tokenizer, _name

if TYPE_CHECKING:  # annotations only: base.py imports this module
    from .base import AnchorOPTInjection

__all__ = ["ClassPatch", "patch_class"]


class ClassPatch:
    """Handle of a class-level patch: ``module.<attr>`` replaced by a subclass that attaches AnchorOPT.

    ``remove()`` puts the original class back (models built meanwhile keep their injections; remove those
    with :attr:`injections`).  Usable as a context manager.
    """

    def __init__(self, module: Any, attr: str, original: type, patched: type):
        self.module, self.attr, self.original, self.patched = module, attr, original, patched
        self._injections: list[weakref.ref] = []
        self._removed = False

    @property
    def injections(self) -> "list[AnchorOPTInjection]":
        """The live injections of the learners built through the patched class."""
        return [ref() for ref in self._injections if ref() is not None and not ref().removed]

    def remove(self) -> None:
        if self._removed:
            return
        current = getattr(self.module, self.attr, None)
        if current is not self.patched:
            raise RuntimeError(
                f"{_name(self.module)}.{self.attr} was replaced again after the AnchorOPT patch; not restoring it"
            )
        setattr(self.module, self.attr, self.original)
        self._removed = True

    def __enter__(self) -> "ClassPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "active"
        return f"ClassPatch({_name(self.module)}.{self.attr}, {state}, {len(self.injections)} injection(s))"


def patch_class(
    module: Any,
    attr: str,
    injection_cls: "type[AnchorOPTInjection]",
    options: dict,
    resolve_options: Callable[[Any, dict], dict],
) -> ClassPatch:
    """Replace ``module.<attr>`` by a subclass whose ``__init__`` attaches ``injection_cls`` after the peer's own."""
    original = getattr(module, attr, None)
    if not isinstance(original, type) or not issubclass(original, nn.Module):
        raise AttributeError(f"{_name(module)} has no prompt-learner class {attr!r} to patch")
    if getattr(original, "_anchoropt_patched", False):
        raise RuntimeError(f"{_name(module)}.{attr} is already patched with AnchorOPT")
    signature = inspect.signature(original.__init__)
    tokenizer = options.pop("tokenizer", None) or _module_tokenizer(module)
    handle: ClassPatch | None = None

    def __init__(self, *args, **kwargs):
        original.__init__(self, *args, **kwargs)
        cfg, classnames, clip_model = _constructor_args(signature, self, args, kwargs)
        resolved = resolve_options(cfg, dict(options))
        injection = injection_cls(self, clip_model=clip_model, classnames=classnames, tokenizer=tokenizer, **resolved)
        handle._injections.append(weakref.ref(injection))

    namespace = {
        "__init__": __init__,
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
        "__doc__": original.__doc__,
        "_anchoropt_patched": True,
    }
    patched = type(original.__name__, (original,), namespace)
    handle = ClassPatch(module, attr, original, patched)
    setattr(module, attr, patched)
    return handle


def _constructor_args(signature: inspect.Signature, obj, args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    """``(cfg, classnames, clip_model)`` of a CoOp-family constructor call."""
    try:
        bound = signature.bind(obj, *args, **kwargs).arguments
    except TypeError:
        bound = {}
    if all(k in bound for k in ("cfg", "classnames", "clip_model")):
        return bound["cfg"], bound["classnames"], bound["clip_model"]
    if len(args) >= 3:
        return args[0], args[1], args[2]
    raise TypeError("the patched prompt learner must be built as PromptLearner(cfg, classnames, clip_model)")
