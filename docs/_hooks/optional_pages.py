"""mkdocs hook: the site builds whichever optional pages and modules exist.

* nav entries pointing at a missing page are dropped (``deep.md`` and ``integrations/*.md`` are written
  with the code they document and may not exist yet);
* the ``Integrations`` section lists every ``docs/integrations/*.md`` (titled by its first heading);
* a ``::: anchoropt.x`` API directive for a module that is not in the package becomes a note instead of
  a build error.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_DIRECTIVE = re.compile(r"^::: (anchoropt(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*$", re.MULTILINE)


def _title(page: Path) -> str:
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return page.stem.replace("_", " ").replace("-", " ").title()


def _prune(items, docs: Path):
    kept = []
    for item in items:
        if isinstance(item, dict):
            (title, value), = item.items()
            if title == "Integrations":
                pages = sorted((docs / "integrations").glob("*.md"))
                index = [p for p in pages if p.stem in ("index", "README")]
                value = [{_title(p): f"integrations/{p.name}"} for p in index + [p for p in pages if p not in index]]
            elif isinstance(value, list):
                value = _prune(value, docs)
            elif isinstance(value, str) and not value.startswith(("http://", "https://")) and not (docs / value).is_file():
                continue
            if value == []:
                continue
            kept.append({title: value})
        elif isinstance(item, str) and not (docs / item).is_file():
            continue
        else:
            kept.append(item)
    return kept


def on_config(config, **kwargs):
    config["nav"] = _prune(config["nav"] or [], Path(config["docs_dir"]))
    return config


def _module_exists(dotted: str) -> bool:
    """Whether ``anchoropt.x[.y ...]`` names a module (or a member of one) present in the source tree."""
    parts = dotted.split(".")
    for n in range(len(parts), 1 if len(parts) > 1 else 0, -1):
        base = ROOT.joinpath(*parts[:n])
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return True
    return False


def on_page_markdown(markdown, page, **kwargs):
    def replace(match):
        if _module_exists(match.group(1)):
            return match.group(0)
        return f"!!! note\n    `{match.group(1)}` is not part of this version of anchoropt.\n"

    return _DIRECTIVE.sub(replace, markdown)
