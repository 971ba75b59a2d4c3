"""Old import paths of modules that moved (the package layout of ``docs/architecture.md``), kept for one release.

``import anchoropt.registry`` (or ``from anchoropt import registry``) still works: it gives the module at its new
path, :mod:`anchoropt.methods.registry`, and warns once with a :class:`DeprecationWarning` that names the new path.
The same holds for names that moved between modules (``anchoropt.io.load_prompt_learner``), through the old
module's ``__getattr__`` (:func:`moved_names`).  New paths are strings here, imported on first use, so this
module adds no arrow between the package's layers.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any, Callable

__all__ = ["MOVED_MODULES", "REMOVED_IN", "install", "moved_names"]

REMOVED_IN = "0.3"

MOVED_MODULES: dict[str, str] = {
    "anchoropt.baselines": "anchoropt.methods.baselines",
    "anchoropt.registry": "anchoropt.methods.registry",
    "anchoropt.presets": "anchoropt.methods.presets",
    "anchoropt.pae": "anchoropt.methods.pae",
    "anchoropt.mpa": "anchoropt.methods.mpa",
    "anchoropt.one_stage": "anchoropt.methods.one_stage",
    "anchoropt.data": "anchoropt.datasets.folders",
    "anchoropt.demo": "anchoropt.runner.demo",
    "anchoropt.distributed": "anchoropt.runner.distributed",
    "anchoropt.cli": "anchoropt.runner.cli",
}
"""Old module path -> new module path."""


def _warn(old: str, new: str) -> None:
    """One DeprecationWarning, attributed to the first caller outside this module and the import machinery."""
    frame, level = sys._getframe(1), 2
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.startswith("<frozen importlib")):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"{old} moved to {new}: import it from there ({old} goes in anchoropt {REMOVED_IN})",
                  DeprecationWarning, stacklevel=level)


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module at its new path (the same module object, not a copy)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec) -> ModuleType:
        _warn(spec.name, MOVED_MODULES[spec.name])
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new path is already imported."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once; :mod:`anchoropt` calls this on import)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


def package_getattr(package: str) -> Callable[[str], ModuleType]:
    """``__getattr__`` for ``package``: ``anchoropt.registry`` as an attribute (no import statement) still works."""

    def __getattr__(name: str) -> ModuleType:
        if f"{package}.{name}" in MOVED_MODULES:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def moved_names(module: str, names: dict[str, str]) -> Callable[[str], Any]:
    """``__getattr__`` for ``module`` whose ``names`` (name -> new module) moved elsewhere."""

    def __getattr__(name: str) -> Any:
        if name in names:
            _warn(f"{module}.{name}", f"{names[name]}.{name}")
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
