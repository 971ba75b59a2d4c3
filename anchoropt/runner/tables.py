"""A grid's report: one record per run, mean ± std over seeds, tables laid out like the paper's, an HM plot.

Records (``OUT/results.json``) are flat dicts: ``method``, ``dataset``, ``seed``, ``protocol``, ``run_dir`` and

* base-to-novel: ``base``, ``novel``, ``hm`` (headline accuracies in %, the run's own HM);
* cross-dataset / domain generalisation: ``source``, ``targets`` (``{name: accuracy}``), ``target_mean``.

Aggregation: a cell is the mean ± the sample standard deviation (n - 1) over the seeds a method has for
that dataset (``81.23 ± 0.45``; a single seed shows the mean alone).  The base-to-novel average block
follows the paper: per seed, base and novel are averaged over the datasets and HM is taken of those
averages; the cell is then mean ± std over the seeds every dataset has.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

from .. import _files
from .evaluation import harmonic_mean

__all__ = ["mean_std", "format_cell", "record_from_results", "base2novel_tables", "transfer_tables",
           "render_tables", "plot_hm", "write_report"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std of no values")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def format_cell(values: Sequence[float]) -> str:
    """``"81.23 ± 0.45"`` (mean ± std over seeds), ``"81.23"`` for one seed, ``"–"`` for none."""
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {std:.2f}"


def record_from_results(results: dict, run_dir: str, method: str | None = None) -> dict:
    """The flat record of one run's ``results.json`` (a file missing an entry is refused, naming the entry)."""
    try:
        r = results["results"]
        record = {"method": method or results.get("method", "coop+anchoropt"), "dataset": results["dataset"],
                  "seed": results["seed"], "protocol": results["protocol"], "run_dir": str(run_dir)}
        if results["protocol"] == "base2novel":
            record.update(base=r["base"]["accuracy"], novel=r["novel"]["accuracy"], hm=r["hm"])
        else:
            record.update(source=r["source"]["accuracy"],
                          targets={name: v["accuracy"] for name, v in r["targets"].items()},
                          target_mean=r["target_mean"])
    except (KeyError, TypeError, AttributeError) as err:
        where = Path(run_dir) / "results.json"
        missing = f"no entry {err}" if isinstance(err, KeyError) else f"an entry of the wrong type ({err})"
        raise ValueError(f"{where} has {missing} (expected results.base / results.novel / results.hm or "
                         "results.source / results.targets): the file is damaged or was edited; run that cell "
                         "again or remove the run") from None
    return record


def _ordered(values: Iterable[str], order: Sequence[str] = ()) -> list[str]:
    seen = list(dict.fromkeys(order))
    return seen + [v for v in dict.fromkeys(values) if v not in seen]


def _by(records, *keys):
    out: dict = {}
    for r in records:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def base2novel_tables(records: Sequence[dict], methods: Sequence[str] = (), datasets: Sequence[str] = ()) -> str:
    """Markdown: an HM summary (methods x datasets + average), then the paper's Table 1 blocks
    ("Average over N datasets", then one per dataset) with Base / Novel / HM."""
    records = [r for r in records if r["protocol"] == "base2novel"]
    if not records:
        return ""
    methods = _ordered((r["method"] for r in records), methods)
    datasets = _ordered((r["dataset"] for r in records), datasets)
    cells = _by(records, "method", "dataset")
    averages = {m: _average_block(cells, m, datasets) for m in methods}
    lines = ["### HM per dataset", "", "| Method | " + " | ".join(datasets) + " | Average |",
             "|---|" + "---:|" * (len(datasets) + 1)]
    for m in methods:
        row = [format_cell([r["hm"] for r in cells.get((m, d), [])]) for d in datasets]
        lines.append(f"| {m} | " + " | ".join(row) + f" | {format_cell(averages[m]['hm'])} |")
    blocks = [(f"Average over {len(datasets)} dataset{'s' if len(datasets) > 1 else ''}", None), *[(d, d) for d in datasets]]
    for title, dataset in blocks:
        lines += ["", f"### {title}", "", "| Method | Base | Novel | HM |", "|---|---:|---:|---:|"]
        for m in methods:
            if dataset is None:
                values = averages[m]
            else:
                runs = cells.get((m, dataset), [])
                values = {k: [r[k] for r in runs] for k in ("base", "novel", "hm")}
            lines.append(f"| {m} | {format_cell(values['base'])} | {format_cell(values['novel'])} | "
                         f"{format_cell(values['hm'])} |")
    return "\n".join(lines) + "\n"


def _average_block(cells: dict, method: str, datasets: Sequence[str]) -> dict[str, list[float]]:
    """Per seed present for every dataset: base and novel averaged over datasets, HM of those averages."""
    per_dataset = [{r["seed"]: r for r in cells.get((method, d), [])} for d in datasets]
    seeds = sorted(set.intersection(*(set(p) for p in per_dataset))) if per_dataset else []
    out: dict[str, list[float]] = {"base": [], "novel": [], "hm": []}
    for seed in seeds:
        base = sum(p[seed]["base"] for p in per_dataset) / len(per_dataset)
        novel = sum(p[seed]["novel"] for p in per_dataset) / len(per_dataset)
        out["base"].append(base)
        out["novel"].append(novel)
        out["hm"].append(harmonic_mean(base, novel))
    return out


def transfer_tables(records: Sequence[dict], protocol: str, methods: Sequence[str] = ()) -> str:
    """Markdown for cross-dataset / domain generalisation: per source, methods x (source, targets, average)."""
    records = [r for r in records if r["protocol"] == protocol]
    if not records:
        return ""
    methods = _ordered((r["method"] for r in records), methods)
    lines: list[str] = []
    for source in _ordered(r["dataset"] for r in records):
        mine = [r for r in records if r["dataset"] == source]
        targets = _ordered(name for r in mine for name in r["targets"])
        cells = _by(mine, "method")
        title = "Cross-dataset" if protocol == "cross-dataset" else "Domain generalisation"
        lines += [f"### {title}: source {source}", "",
                  "| Method | Source | " + " | ".join(targets) + " | Target average |",
                  "|---|---:|" + "---:|" * (len(targets) + 1)]
        for m in methods:
            runs = cells.get((m,), [])
            row = [format_cell([r["source"] for r in runs])]
            row += [format_cell([r["targets"][t] for r in runs if t in r["targets"]]) for t in targets]
            row.append(format_cell([r["target_mean"] for r in runs if r["target_mean"] is not None]))
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def render_tables(records: Sequence[dict], methods: Sequence[str] = (), datasets: Sequence[str] = ()) -> str:
    """Every table the records allow (base-to-novel, cross-dataset, domain generalisation), in markdown."""
    parts = [base2novel_tables(records, methods, datasets), transfer_tables(records, "cross-dataset", methods),
             transfer_tables(records, "domain-generalization", methods)]
    seeds = sorted({r["seed"] for r in records})
    head = (f"Mean ± sample std over seeds {', '.join(map(str, seeds))} ({len(records)} runs); accuracies in %.\n"
            if records else "No finished runs yet.\n")
    return head + "\n" + "\n".join(p for p in parts if p)


def plot_hm(records: Sequence[dict], path: str | os.PathLike, methods: Sequence[str] = (),
            datasets: Sequence[str] = ()) -> Path | None:
    """Bar chart of HM (base-to-novel) or the target average (transfer) per method, error bars = std over
    seeds; one group per dataset and the average.  Needs matplotlib (returns ``None`` and says so if absent)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{path} not written: the HM plot needs matplotlib (pip install matplotlib); the tables are complete",
              flush=True)
        return None
    b2n = [r for r in records if r["protocol"] == "base2novel"]
    methods = _ordered((r["method"] for r in records), methods)
    if b2n:
        datasets = _ordered((r["dataset"] for r in b2n), datasets)
        cells = _by(b2n, "method", "dataset")
        groups = [*datasets, "Average"]
        values = {m: [[r["hm"] for r in cells.get((m, d), [])] for d in datasets]
                  + [_average_block(cells, m, datasets)["hm"]] for m in methods}
        ylabel = "HM (base / novel), %"
    else:
        sources = _ordered(r["dataset"] for r in records)
        cells = _by(records, "method", "dataset")
        groups = [f"{s} → targets" for s in sources]
        values = {m: [[r["target_mean"] for r in cells.get((m, s), []) if r["target_mean"] is not None]
                      for s in sources] for m in methods}
        ylabel = "target accuracy (mean over targets), %"
    width = 0.8 / max(len(methods), 1)
    bars = len(groups) * max(1, len(methods))
    fig, ax = plt.subplots(figsize=(min(14.0, max(5.0, 0.35 * bars)) + 2.5, 3.6))
    colours = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20").colors  # one colour per method
    for i, m in enumerate(methods):
        stats = [mean_std(v) if v else (float("nan"), 0.0) for v in values[m]]
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=2, label=m,
               color=colours[i % len(colours)])
    finite = [mean_std(v)[0] - mean_std(v)[1] for m in methods for v in values[m] if v]
    if finite:  # start the axis below the lowest bar, so differences of a few points stay visible
        ax.set_ylim(bottom=max(0.0, 5 * math.floor((min(finite) - 5) / 5)))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.png")
    try:
        fig.savefig(partial, dpi=120)
    finally:
        plt.close(fig)
    return _files.replace_fsynced(partial, path)


def write_report(output: str | os.PathLike, records: Sequence[dict], methods: Sequence[str] = (),
                 datasets: Sequence[str] = (), plot: bool = True) -> dict:
    """Write ``results.json``, ``table.md`` and (matplotlib permitting) ``hm.png`` into ``output``."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: (_rank(r["dataset"], datasets), _rank(r["method"], methods), r["seed"]))
    _write_text(out / "results.json", json.dumps(records, indent=2) + "\n")
    _write_text(out / "table.md", render_tables(records, methods, datasets))
    written = {"results": str(out / "results.json"), "table": str(out / "table.md")}
    if plot and records:
        png = plot_hm(records, out / "hm.png", methods, datasets)
        if png is not None:
            written["plot"] = str(png)
    return written


def _rank(value: str, order: Sequence[str]) -> tuple[int, str]:
    return (list(order).index(value) if value in order else len(order), value)


def _write_text(path: Path, text: str) -> None:
    _files.write_text(path, text)  # atomic: temp file, fsync, os.replace
