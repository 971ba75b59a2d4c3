"""``anchoropt toyworld calibrate --suite DIR``: does the toy benchmark reproduce the field's base-to-novel
pattern?  Runs the established baselines only - zero-shot, CoOp (M = 4 and 16), CoCoOp, MaPLe, DePT (and KgCoOp
as a reference), each at its release's recipe - on the suite's base-to-novel datasets and checks the targets below
on the suite average (real figures, ViT-B/16, 11 datasets: CoOp base +13.4 over zero-shot, novel -11.0; CoCoOp
novel +8.5 over CoOp; MaPLe HM +6.9 over CoOp; the targets ask for the signs with at least half the magnitudes).

The ATPrompt and AnchorOPT rows are never run here: they are the held-out test of the world.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

from ..toyworld.suite import QUICK_DATASETS
from .config import RunConfig

__all__ = ["BASELINES", "QUICK_DATASETS", "calibrate_suite", "calibration_targets", "suite_means"]

BASELINES = {"zeroshot": "zeroshot", "coop_m4": "coop:n_soft=4", "coop": "coop:n_soft=16", "cocoop": "cocoop",
             "maple": "maple", "dept": "dept", "kgcoop": "kgcoop"}
"""Row name -> method spec.  ``coop`` is CoOp at its default context length (M = 16); ``coop_m4`` at M = 4;
``kgcoop`` (KgCoOp, a reference for how much of CoOp's novel-class loss a pull to the hand prompt wins back) is
reported beside them and enters no target but the seed spread."""


def suite_means(records: Sequence[dict], spec_to_row: dict[str, str]) -> dict:
    """``{row: {"datasets": {name: {base, novel, hm}}, "mean": {...}, "seed_hm": [suite-mean HM per seed]}}``
    from the grid's records (mean over seeds per dataset, then over datasets)."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        row = spec_to_row.get(r["method"])
        if row is not None:
            cells.setdefault((row, r["dataset"]), []).append(r)
    out: dict[str, dict] = {}
    for (row, dataset), runs in sorted(cells.items()):
        entry = out.setdefault(row, {"datasets": {}, "by_seed": {}})
        entry["datasets"][dataset] = {k: round(sum(run[k] for run in runs) / len(runs), 2)
                                      for k in ("base", "novel", "hm")}
        for run in runs:
            entry["by_seed"].setdefault(run["seed"], []).append(run["hm"])
    for row, entry in out.items():
        per = entry["datasets"].values()
        entry["mean"] = {k: round(sum(d[k] for d in per) / len(per), 2) for k in ("base", "novel", "hm")}
        seed_hm = [sum(v) / len(v) for v in entry.pop("by_seed").values() if len(v) == len(entry["datasets"])]
        entry["seed_hm"] = [round(v, 2) for v in seed_hm]
        entry["hm_std"] = round(_std(seed_hm), 2) if len(seed_hm) > 1 else None
    return out


def _std(values: Sequence[float]) -> float:
    m = sum(values) / len(values)
    return (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def calibration_targets(rows: dict) -> dict:
    """``{target: {"value": .., "holds": bool | None}}`` (``None``: a row it needs did not run)."""
    def get(row, key):
        return rows.get(row, {}).get("mean", {}).get(key)

    def delta(a, b, key):
        x, y = get(a, key), get(b, key)
        return None if x is None or y is None else round(x - y, 2)

    targets = {}
    d = delta("coop", "zeroshot", "base")
    targets["CoOp base >= zero-shot base + 6.5"] = {"value": d, "holds": None if d is None else d >= 6.5}
    zs, coop = rows.get("zeroshot", {}).get("datasets", {}), rows.get("coop", {}).get("datasets", {})
    common = sorted(set(zs) & set(coop))
    below = [n for n in common if coop[n]["base"] <= zs[n]["base"]]
    targets["CoOp base above zero-shot base on every dataset"] = {
        "value": below or "all", "holds": None if not common else not below}
    d = delta("coop", "zeroshot", "novel")
    targets["CoOp novel <= zero-shot novel - 5.5"] = {"value": d, "holds": None if d is None else d <= -5.5}
    d = delta("cocoop", "coop", "novel")
    targets["CoCoOp novel >= CoOp novel + 4"] = {"value": d, "holds": None if d is None else d >= 4}
    d = delta("maple", "coop", "hm")
    targets["MaPLe HM >= CoOp HM + 3.5"] = {"value": d, "holds": None if d is None else d >= 3.5}
    stds = {row: entry["hm_std"] for row, entry in rows.items() if entry.get("hm_std") is not None}
    worst = max(stds.values()) if stds else None
    targets["HM std over seeds <= 1.0 (suite mean, every row)"] = {
        "value": stds or None, "holds": None if worst is None else worst <= 1.0}
    return targets


def calibrate_suite(suite_root: str | os.PathLike, output: str | os.PathLike, seeds: Sequence[int] = (1, 2, 3),
                    datasets: Sequence[str] | None = None, rows: Sequence[str] | None = None, jobs: int = 1,
                    weights: str | None = None, log: Callable[[str], None] = print, **overrides) -> dict:
    """Run the baselines on the suite (a grid in ``output``; finished runs are skipped) and check the targets.

    ``overrides``: run options for every run (tests: ``epochs=1``).  Returns ``{"rows", "targets", "grid"}``,
    also written to ``output/calibration.json``.
    """
    from ..toyworld.suite import read_suite, suite_scope
    from .grid import collect_records, run_grid

    suite = read_suite(suite_root)
    names, seeds = suite_scope(suite, datasets, seeds)
    chosen = {row: BASELINES[row] for row in (rows or BASELINES)}
    base = RunConfig(model="toy-clip", pretrained=weights, augment="none", cache_image_features=True,
                     output=str(output), **overrides)
    data = [str(Path(suite_root) / n) for n in names]
    result = run_grid(base, list(chosen.values()), data, seeds, output, jobs=jobs, plot=False)
    asked = [r for r in collect_records(output) if r["dataset"] in names and r["seed"] in seeds]  # not others' runs
    rows_ = suite_means(asked, {spec: row for row, spec in chosen.items()})
    figures = {"suite": {"seed": suite["seed"], "suite_version": suite["suite_version"]}, "seeds": seeds,
               "datasets": names, "rows": rows_,
               "targets": calibration_targets(rows_), "ran": len(result["ran"])}
    Path(output, "calibration.json").write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    for row, entry in rows_.items():
        m = entry["mean"]
        log(f"{row:9s} base {m['base']:6.2f}  novel {m['novel']:6.2f}  HM {m['hm']:6.2f}"
            + (f"  (HM std over seeds {entry['hm_std']:.2f})" if entry["hm_std"] is not None else ""))
    for name, t in figures["targets"].items():
        mark = {True: "holds", False: "MISSED", None: "not run"}[t["holds"]]
        log(f"  [{mark}] {name}: {t['value']}")
    return figures
