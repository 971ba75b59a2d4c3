"""The documentation site: it builds offline in strict mode, and what it shows matches the code."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from anchoropt.runner import cli
from anchoropt.methods.presets import preset

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _needs_mkdocs():
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
               if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        pytest.skip(f"docs toolchain not installed ({', '.join(missing)}): pip install -e '.[docs]'")


def test_site_builds_offline_in_strict_mode(tmp_path):
    _needs_mkdocs()
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    site = tmp_path / "site"
    for page in ("index.html", "quickstart.html", "concepts.html", "runner.html",
                 "howto/own-dataset.html", "howto/backbones.html", "howto/multi-gpu.html",
                 "howto/reproduce.html", "howto/pictures.html", "api/core.html"):
        assert (site / page).is_file(), page
    api = (site / "api" / "core.html").read_text(encoding="utf-8")
    assert "AnchorOPTPromptLearner" in api and "set_classnames" in api  # rendered from the docstrings
    assert "run_training" in (site / "api" / "runner.html").read_text(encoding="utf-8")
    assert (site / "assets" / "position_matrix_example.png").is_file()
    for optional in ("deep.md",):  # written with its code; listed when present
        if (DOCS / optional).is_file():
            assert (site / optional.replace(".md", ".html")).is_file()
    for page in sorted((DOCS / "integrations").glob("*.md")):
        assert (site / "integrations" / f"{page.stem}.html").is_file(), page.name
    examples = (site / "examples.html").read_text(encoding="utf-8")
    assert "# AnchorOPT (2/3): CE + KD" in examples  # the scripts themselves, included at build time
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "stylesheets/extra.css" in index
    # links name the page file, so the site also works opened from disk (file://), not only served
    assert 'href="quickstart.html"' in index and 'href="quickstart/"' not in index


def _commands(text: str) -> list[list[str]]:
    """``anchoropt ...`` command lines in the docs' bash blocks (continuations joined, torchrun prefix cut)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" | ")[0].strip()
            line = re.sub(r"^torchrun .*? -m anchoropt ", "anchoropt ", line)
            line = re.sub(r"^python -m anchoropt ", "anchoropt ", line)
            if line.startswith("anchoropt "):
                commands.append(shlex.split(line.replace("$seed", "1"), comments=True)[1:])
    return commands


def test_every_documented_command_parses():
    parser = cli.build_parser()
    seen = 0
    for page in sorted([ROOT / "README.md", *DOCS.rglob("*.md")]):
        for argv in _commands(page.read_text(encoding="utf-8")):
            try:
                parser.parse_args(argv)
            except SystemExit as err:  # argparse exits on a bad option
                pytest.fail(f"{page.relative_to(ROOT)}: `anchoropt {' '.join(argv)}` does not parse ({err})")
            seen += 1
    assert seen >= 10


def test_reproduce_page_table_matches_the_presets():
    text = (DOCS / "howto" / "reproduce.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \| (.+) \|$", text, flags=re.M)
    assert len(rows) == 11
    for name, cells in rows:
        values = [float(v) for v in cells.split(" | ")]
        p = preset(name)
        assert values == [p.n_soft, p.epochs, p.ce_weight, p.kd_weight, p.kd_temperature, p.stage1_epochs,
                          p.stage1_mse_weight, p.max_descriptions], name


def test_nav_hook_drops_missing_pages_and_lists_integrations(tmp_path):
    spec = importlib.util.spec_from_file_location("optional_pages", DOCS / "_hooks" / "optional_pages.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    docs = tmp_path / "docs"
    (docs / "integrations").mkdir(parents=True)
    (docs / "index.md").write_text("# Home\n")
    (docs / "integrations" / "maple.md").write_text("# MaPLe + AnchorOPT\n")
    (docs / "integrations" / "coop.md").write_text("# CoOp + AnchorOPT\n")
    nav = [{"Home": "index.md"}, {"Deep variant": "deep.md"}, {"Integrations": []},
           {"API": [{"Gone": "api/gone.md"}]}]
    config = hook.on_config({"nav": nav, "docs_dir": str(docs)})
    assert config["nav"] == [{"Home": "index.md"},
                             {"Integrations": [{"CoOp + AnchorOPT": "integrations/coop.md"},
                                               {"MaPLe + AnchorOPT": "integrations/maple.md"}]}]
    page = "::: anchoropt.viz\n\n::: anchoropt.no_such_module\n"
    out = hook.on_page_markdown(page, page=None)
    assert "::: anchoropt.viz" in out and "`anchoropt.no_such_module` is not part of this version" in out


def test_mkdocs_config_is_strict_and_wraps_code():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert re.search(r"^strict: true\b", config, flags=re.M)
    assert re.search(r"^use_directory_urls: false\b", config, flags=re.M)  # file:// navigation
    assert "stylesheets/extra.css" in config
    assert "white-space: pre-wrap" in (DOCS / "stylesheets" / "extra.css").read_text(encoding="utf-8")


def test_readme_and_docs_link_every_example():
    scripts = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    page = (DOCS / "examples.md").read_text(encoding="utf-8")
    for name in scripts:
        assert f"](examples/{name})" in readme, name
        assert f"`examples/{name}`" in page, name
    assert len(re.findall(r'^    --8<-- "examples/(\w+\.py)"$', page, flags=re.M)) == len(scripts) - 1  # all but the demo


def test_no_install_hint_names_the_unpublished_package():
    """`pip install "anchoropt[viz]"` cannot work while the package is not on the index."""
    pattern = re.compile(r"pip install [\"']?anchoropt")
    files = [ROOT / "README.md", *DOCS.rglob("*.md"), *(ROOT / "anchoropt").rglob("*.py"),
             *(ROOT / "examples").glob("*.py")]
    offenders = [str(f.relative_to(ROOT)) for f in files if pattern.search(f.read_text(encoding="utf-8"))]
    assert offenders == []


def test_speed_figures_are_the_benchmarks():
    """Every "Nx faster" of the README and the docs (except one quoted from a paper) is a figure of
    benchmarks/README.md."""
    measured = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    claims = []
    for page in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        text = page.read_text(encoding="utf-8")
        for m in re.finditer(r"(\d+(?:\.\d+)?)x faster", text):
            if "paper" not in text[max(0, m.start() - 60):m.start()]:  # a figure quoted from a paper is its own
                claims.append((page.name, m.group(1)))
    assert claims
    for page, figure in claims:
        assert re.search(rf"\b{re.escape(figure)}(\.\d)?x", measured), f"{page}: {figure}x is not in benchmarks/README.md"
