"""``anchoropt toyworld table1 --suite DIR``: the paper's Table 1 on the toy suite - zero-shot and the four base
methods alone, + ATPrompt and + AnchorOPT, base / novel / HM per dataset and averaged, every method at its
release's recipe (``--recipe released``, the default).  ``--quick``: one seed, zero-shot / CoOp / CoOp+ATPrompt /
CoOp+AnchorOPT on three datasets (a first look).

Held-out rows: the world is calibrated on the baselines only (:mod:`anchoropt.runner.toy_calibration`); the
ATPrompt and AnchorOPT rows are what it tests.  ATPrompt's attribute words are fixed for the whole suite before
any run (:data:`TOY_ATTRIBUTES`, the pair ATPrompt's release uses for ImageNet, the suite's source).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence

from .config import RunConfig

__all__ = ["TABLE1_METHODS", "QUICK_METHODS", "TOY_ATTRIBUTES", "run_table1"]

TABLE1_METHODS = ("zeroshot",) + tuple(f"{base}{suffix}" for base in ("coop", "cocoop", "maple", "dept")
                                       for suffix in ("", "+atprompt", "+anchoropt"))
QUICK_METHODS = ("zeroshot", "coop", "coop+atprompt", "coop+anchoropt")
TOY_ATTRIBUTES = ("color", "shape")
"""ATPrompt's attribute words on every toy dataset (its released pick for ImageNet); chosen before any run."""


def run_table1(suite_root: str | os.PathLike, output: str | os.PathLike, quick: bool = False,
               seeds: Sequence[int] = (1, 2, 3), datasets: Sequence[str] | None = None,
               methods: Sequence[str] | None = None, jobs: int = 1, weights: str | None = None,
               log: Callable[[str], None] = print, **overrides) -> dict:
    """Run the Table 1 grid on the suite's base-to-novel datasets into ``output`` (finished runs are skipped) and
    write its report; returns ``{"report", "seconds", "runs"}``.  ``overrides``: run options (tests)."""
    from ..toyworld.suite import read_suite, suite_scope
    from .grid import run_grid

    names, seeds = suite_scope(read_suite(suite_root), datasets, seeds, quick)
    chosen = list(methods or (QUICK_METHODS if quick else TABLE1_METHODS))
    base = RunConfig(model="toy-clip", pretrained=weights, augment="none", cache_image_features=True,
                     descriptions=str(Path(suite_root) / "descriptions"), attributes=list(TOY_ATTRIBUTES),
                     output=str(output), **overrides)
    start = time.perf_counter()
    result = run_grid(base, chosen, [str(Path(suite_root) / n) for n in names], seeds, output, jobs=jobs)
    seconds = time.perf_counter() - start
    log(f"table 1 on the toy suite: {len(result['ran'])} runs in {seconds:.0f} s ({len(result['skipped'])} "
        f"finished before); report in {output}/table.md (toy-world figures)")
    return {"report": result["report"], "seconds": round(seconds, 1), "runs": len(result["ran"])}
