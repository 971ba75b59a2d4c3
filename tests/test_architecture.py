"""The package's layers (docs/architecture.md): imports point one way and never close a circle.

An ast walk over ``anchoropt/`` reads every import between the package's modules - at module level and inside
functions alike (a lazy import is still an arrow) - except those under ``if TYPE_CHECKING:``, which never run.

Layers, bottom to top:

* ``core``: the top-level modules (the method's building blocks: towers, template, position, anchors,
  prompts, deep, losses, io, ...): they import only each other;
* ``datasets``, ``methods``, ``adapters``: each imports the core and itself;
* ``toyworld``: the core and ``datasets``; the public facade (``anchoropt/__init__``): the core and ``methods``;
* ``runner`` (and ``__main__``): anything below.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import anchoropt
from anchoropt import _moved

PACKAGE_DIR = Path(anchoropt.__file__).parent

ALLOWED = {
    "core": {"core"},
    "datasets": {"core", "datasets"},
    "methods": {"core", "methods"},
    "adapters": {"core", "adapters"},
    "toyworld": {"core", "datasets", "toyworld"},
    "facade": {"core", "methods"},
    "runner": {"core", "datasets", "methods", "adapters", "toyworld", "facade", "runner"},
}


# ---------------------------------------------------------------------- the import graph
def package_modules(package_dir: Path = PACKAGE_DIR) -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is_package)}`` of every module under ``package_dir``."""
    modules = {}
    for path in package_dir.rglob("*.py"):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _runtime_imports(node: ast.AST):
    """Import nodes under ``node``, skipping the bodies of ``if TYPE_CHECKING:`` blocks."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
        for statement in node.orelse:
            yield from _runtime_imports(statement)
    else:
        for child in ast.iter_child_nodes(node):
            yield from _runtime_imports(child)


def _targets(module: str, is_package: bool, node: ast.AST, modules: dict) -> set[str]:
    """The package modules ``node`` imports (``from . import x`` names the module ``x`` when it is one)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".")[: None if is_package else -1]
            base = base[: len(base) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names]
    found = set()
    for name in names:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in modules and name != module:
            found.add(name)
    return found


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the package's own modules."""
    modules = package_modules(package_dir)
    graph = {}
    for module, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[module] = set().union(*[_targets(module, is_package, n, modules) for n in _runtime_imports(tree)])
    return graph


def unresolved_imports(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """``module: target`` for every import of a package module that does not exist (a path left by a move)."""
    modules = package_modules(package_dir)
    found = []
    for module, (path, is_package) in modules.items():
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = module.split(".")[: None if is_package else -1]
                source = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                names = [source]
            else:
                names = [alias.name for alias in node.names]
            found += [f"{module}: {name}" for name in names
                      if name.startswith("anchoropt") and name not in modules and name not in _moved.MOVED_MODULES]
    return sorted(found)


def layer(module: str) -> str:
    parts = module.split(".")
    if module == "anchoropt":
        return "facade"
    if parts[1] == "__main__":
        return "runner"
    if parts[1] in ("datasets", "methods", "adapters", "toyworld", "runner"):
        return parts[1]
    return "core"


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def arrows_against_layers(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({layer(a)}) -> {b} ({layer(b)})" for a, targets in graph.items() for b in targets
                  if layer(b) not in ALLOWED[layer(a)])


# ---------------------------------------------------------------------- the package
def test_no_import_circle_in_the_package():
    assert circles(import_graph()) == []


def test_every_import_names_a_module_that_exists():
    assert unresolved_imports() == []


def test_every_arrow_points_down_the_layers():
    assert arrows_against_layers(import_graph()) == []


def test_docs_architecture_gives_every_module_a_line():
    """Each module of the package is named in a row of docs/architecture.md's tables: ``sub/name.py``, or
    ``name.py`` in a row that names its subpackage (``runner/run.py``, ``rundir.py`` ...)."""
    page = PACKAGE_DIR.parent / "docs" / "architecture.md"
    if not page.is_file():
        pytest.skip("docs/ is not beside the package (an installed wheel)")
    rows = [line for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("| `")]
    missing = []
    for path, _ in package_modules().values():
        rel = path.relative_to(PACKAGE_DIR).as_posix()
        if path.name in ("__init__.py", "__main__.py"):
            continue
        sub = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
        if not any(f"`{rel}`" in row or (f"`{path.name}`" in row and (not sub or f"`{sub}" in row))
                   for row in rows):
            missing.append(rel)
    assert missing == []


def test_the_walk_sees_lazy_imports_and_skips_type_checking_blocks():
    graph = import_graph()
    assert "anchoropt.prompts" in graph["anchoropt.methods.registry"]  # module level
    assert "anchoropt.io" in graph["anchoropt.methods.registry"]  # inside functions only
    assert "anchoropt.prompts" not in graph["anchoropt.io"]  # under TYPE_CHECKING: annotations only


def test_the_checks_catch_a_circle_and_an_upward_arrow(tmp_path):
    pkg = tmp_path / "anchoropt"
    for sub in ("", "methods", "runner"):
        (pkg / sub).mkdir(exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "io.py").write_text("from .prompts import Learner\n")
    (pkg / "prompts.py").write_text("def save():\n    from .io import write\n")
    (pkg / "template.py").write_text("from .methods import registry\n")
    (pkg / "methods" / "registry.py").write_text("from ..runner import cli\nfrom .baselines import X\n")
    graph = import_graph(pkg)
    assert unresolved_imports(pkg) == ["anchoropt.methods.registry: anchoropt.methods.baselines"]
    assert circles(graph) == [["anchoropt.io", "anchoropt.prompts"]]
    assert arrows_against_layers(graph) == [
        "anchoropt.methods.registry (methods) -> anchoropt.runner (runner)",
        "anchoropt.template (core) -> anchoropt.methods.registry (methods)",
    ]


# ---------------------------------------------------------------------- old paths, for one release
def test_every_old_module_path_gives_the_new_module_with_a_warning():
    """Each old path in a fresh interpreter (a module once imported warns no more): one line per path."""
    code = (
        "import importlib, warnings, sys\n"
        "from anchoropt._moved import MOVED_MODULES\n"
        "for old, new in sorted(MOVED_MODULES.items()):\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        module = importlib.import_module(old)\n"
        "    said = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]\n"
        "    print(old, module is importlib.import_module(new), said)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(_moved.MOVED_MODULES)
    for line, (old, new) in zip(lines, sorted(_moved.MOVED_MODULES.items())):
        assert line.startswith(f"{old} True "), line
        assert f"{old} moved to {new}" in line, line


def test_from_package_import_and_attribute_access_of_a_moved_module():
    for old in ("registry", "presets"):  # as if never imported by the old path in this process
        sys.modules.pop(f"anchoropt.{old}", None)
        vars(anchoropt).pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from anchoropt import registry  # noqa: F401
        presets = anchoropt.presets
    assert registry is importlib.import_module("anchoropt.methods.registry")
    assert presets is importlib.import_module("anchoropt.methods.presets")
    assert any(issubclass(w.category, DeprecationWarning) and "anchoropt.methods.registry" in str(w.message)
               for w in caught)
    with pytest.raises(AttributeError, match="no attribute 'no_such_module'"):
        anchoropt.no_such_module  # noqa: B018


def test_a_moved_name_warns_and_is_the_same_object():
    from anchoropt import io
    from anchoropt.prompts import load_prompt_learner

    with pytest.warns(DeprecationWarning, match="anchoropt.prompts.load_prompt_learner"):
        old = io.load_prompt_learner
    assert old is load_prompt_learner
    with pytest.raises(AttributeError):
        io.no_such_name  # noqa: B018


def test_the_public_api_is_unchanged():
    assert sorted(anchoropt.__all__) == sorted([
        "__version__", "AnchorLearner", "AnchorOPTPromptLearner", "AnchorPromptTemplate", "ARRANGEMENTS",
        "DeepAnchorHooks", "DeepPrompts", "DescriptionTargets", "DescriptionsError", "KoopmanLyapunov",
        "OneStageTrainer", "PositionMatrix", "PromptTemplate", "SoftPromptLearner", "StageIILoss",
        "StageIILossConfig", "TextTower", "UnsupportedTowerError", "ZeroShotClassifier", "attach_deep",
        "default_tokenizer", "load_anchors", "load_descriptions", "load_official_anchors", "load_prompt_learner",
        "save_anchors", "save_prompt_learner",
    ])
    for name in anchoropt.__all__:
        assert getattr(anchoropt, name) is not None
