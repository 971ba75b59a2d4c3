"""Packaging: the sdist carries everything needed to test, try and document the package; the wheel is the
package alone; the extras keep the docs toolchain out of ``[test]``."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_PARTS = {"__pycache__", ".pytest_cache"}


def _build(kind: str, out: Path, source: Path = ROOT) -> Path:
    """``setuptools.build_meta.build_<kind>`` of ``source`` in a subprocess (no network, no isolation)."""
    code = f"from setuptools import build_meta as b; print(b.build_{kind}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out / done.stdout.strip().splitlines()[-1]


def _git_ignored(paths: set[str]) -> set[str]:
    """The paths git ignores in a checkout (local results, caches); none outside one (an unpacked sdist)."""
    if not (ROOT / ".git").exists() or not paths:
        return set()
    try:
        done = subprocess.run(["git", "check-ignore", "--stdin"], cwd=ROOT, input="\n".join(sorted(paths)),
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(done.stdout.split())


def _source_files(*folders: str) -> set[str]:
    files = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*"):
            rel = path.relative_to(ROOT)
            if path.is_file() and not SKIP_PARTS & set(rel.parts) and path.suffix != ".pyc":
                files.add(rel.as_posix())
    return files - _git_ignored(files)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    return _build("sdist", tmp_path_factory.mktemp("sdist"))


@pytest.fixture(scope="module")
def sdist_names(sdist) -> set[str]:
    with tarfile.open(sdist) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    top = names[0].split("/")[0]
    return {name.removeprefix(top + "/") for name in names}


def test_sdist_holds_tests_examples_docs_and_benchmarks(sdist_names):
    wanted = _source_files("anchoropt", "tests", "examples", "docs", "benchmarks")
    wanted |= {"README.md", "LICENSE", "pyproject.toml", "MANIFEST.in", "mkdocs.yml"}
    missing = sorted(wanted - sdist_names)
    assert not missing, f"missing from the sdist: {missing}"
    for needed in ("tests/conftest.py", "tests/peer_fakes.py", "examples/quickstart.py", "docs/index.md",
                   "anchoropt/runner/demo.py"):
        assert needed in sdist_names
    assert not {n for n in sdist_names if SKIP_PARTS & set(n.split("/")) or n.startswith((".venv/", "build/"))}


def test_wheel_is_the_package_with_its_demo(sdist, tmp_path):
    """The wheel built from the unpacked sdist (as pip does; no stale build/ of the checkout can leak in)."""
    with tarfile.open(sdist) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4 / 3.12
        tar.extractall(tmp_path / "src", **safe)
    (source,) = (tmp_path / "src").iterdir()
    with zipfile.ZipFile(_build("wheel", tmp_path / "dist", source)) as wheel:
        names = set(wheel.namelist())
        entry_points = next(wheel.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        metadata = next(wheel.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    packaged = {n for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packaged == _source_files("anchoropt") - {n for n in _source_files("anchoropt") if n.endswith(".pyc")}
    assert "anchoropt/runner/demo.py" in packaged and "anchoropt/py.typed" in packaged
    assert "anchoropt = anchoropt.runner.cli:main" in entry_points
    # [test] is pytest + matplotlib; the docs toolchain lives in [docs]
    test_extra = [line for line in metadata.splitlines() if line.startswith("Requires-Dist") and "extra == \"test\"" in line]
    docs_extra = [line for line in metadata.splitlines() if line.startswith("Requires-Dist") and "extra == \"docs\"" in line]
    assert any("pytest" in line for line in test_extra)
    assert not any("mkdocs" in line for line in test_extra)
    assert any("mkdocs-material" in line for line in docs_extra)
