"""Redraw the docs' HM charts (docs/assets/grid_toyworld_*_hm.png) from the tables the pages print.

The grids behind them (docs/results.md, docs/methods.md: the commands are on those pages) take 10 to 30
minutes of one CPU thread; their per-run results are not kept in the repository, but the pages' "HM per
dataset" tables hold each cell's mean ± std over the seeds, which is all the chart shows. This script reads
those tables and draws them with the grid's own plotting code (``anchoropt.runner.tables.draw_bars``), so a
change of the plot's style reaches the docs without re-running the grids::

    python benchmarks/render_doc_figures.py            # rewrites the two PNGs in docs/assets/

A grid re-run writes the same chart itself (``OUT/hm.png``).  The script also redraws the illustration of
docs/howto/pictures.md (docs/assets/position_matrix_example.png: 4 soft tokens + 1 anchor, the arrangement
its caption spells out, each training pick's chance 0.97) with ``anchoropt.viz``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import math  # noqa: E402

import torch  # noqa: E402

from anchoropt import viz  # noqa: E402
from anchoropt.runner.tables import draw_bars  # noqa: E402

# (page, which "HM per dataset" table of it (0: the first), the figure, its title)
FIGURES = [
    ("docs/results.md", 0, "docs/assets/grid_toyworld_b2n_hm.png",
     "toy-clip, 16 shots, base-to-novel, seeds 1, 2, 3"),
    ("docs/methods.md", 0, "docs/assets/grid_toyworld_methods_hm.png",
     "toy-clip, 16 shots, base-to-novel (photo domain), seeds 1, 2, 3"),
]


def hm_table(page: Path, index: int) -> tuple[list[str], dict[str, list[tuple[float, float]]]]:
    """The ``index``-th "HM per dataset" table of ``page``: its dataset columns and {method: [(mean, std)]}."""
    text = page.read_text(encoding="utf-8")
    starts = [m.end() for m in re.finditer(r"^#+ HM per dataset\s*$", text, flags=re.M)]
    rows = re.findall(r"^\|.*\|$", text[starts[index]:].split("\n\n#", 1)[0], flags=re.M)
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    stats = {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        stats[cells[0]] = [tuple(float(x) for x in c.split("±")) for c in cells[1:]]
    return header[1:], stats


def main() -> int:
    for page, index, figure, title in FIGURES:
        groups, stats = hm_table(ROOT / page, index)
        draw_bars(groups, stats, ROOT / figure, ylabel="HM (base / novel), %", title=title)
        print(f"{figure}: {len(stats)} methods x {len(groups)} groups from {page}")
    # slots 1..5 take soft2, anchor1, soft2, soft4, soft1; logit gap ln(0.97 / 0.0075): softmax 0.97 / 0.01
    logits = torch.zeros(5, 5)
    logits[range(5), [1, 4, 1, 3, 0]] = math.log(0.97 * 4 / 0.03)
    path = viz.save_position_matrix((logits, 4), ROOT / "docs/assets/position_matrix_example.png",
                                    title="example: 4 soft tokens + 1 anchor", dpi=100)
    print(f"{path.relative_to(ROOT)}: the illustration of docs/howto/pictures.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
