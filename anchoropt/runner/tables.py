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
import re
from pathlib import Path
from typing import Iterable, Sequence

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
    """The flat record of one run's ``results.json``."""
    r = results["results"]
    record = {"method": method or results.get("method", "coop+anchoropt"), "dataset": results["dataset"],
              "seed": results["seed"], "protocol": results["protocol"], "run_dir": str(run_dir)}
    if results["protocol"] == "base2novel":
        record.update(base=r["base"]["accuracy"], novel=r["novel"]["accuracy"], hm=r["hm"])
    else:
        record.update(source=r["source"]["accuracy"],
                      targets={name: v["accuracy"] for name, v in r["targets"].items()},
                      target_mean=r["target_mean"])
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
            datasets: Sequence[str] = (), title: str | None = None) -> Path | None:
    """Bar chart of HM (base-to-novel) or the target average (transfer) per method, error bars = std over
    seeds; one group per dataset and the average.  Needs matplotlib (returns ``None`` and says so if absent)."""
    try:
        import matplotlib  # noqa: F401
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
    if title is None:
        title = _plot_title(records, Path(path).parent)
    stats = {m: [mean_std(v) if v else (float("nan"), 0.0) for v in values[m]] for m in methods}
    return draw_bars(groups, stats, path, ylabel=ylabel, title=title)


def _plot_title(records: Sequence[dict], grid_dir: Path) -> str:
    """"model, K shots, protocol, seeds ..." - the model and shots from a run's ``run_config.json`` of the grid."""
    parts = []
    config = next(iter(sorted(grid_dir.glob("runs/*/*/*/run_config.json"))), None)
    try:
        cfg = json.loads(config.read_text(encoding="utf-8")) if config is not None else {}
    except (OSError, ValueError):
        cfg = {}
    if cfg.get("model"):
        weights = cfg.get("pretrained")
        parts.append(f"{cfg['model']} ({weights})" if weights and cfg["model"] != "toy-clip"
                     and not str(cfg["model"]).startswith("tiny") else str(cfg["model"]))
    if cfg.get("shots"):
        parts.append(f"{cfg['shots']} shots")
    protocols = _ordered(r["protocol"] for r in records)
    parts.extend(_PROTOCOL_TITLES.get(p, p) for p in protocols)
    seeds = sorted({r["seed"] for r in records})
    parts.append(f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
    return ", ".join(parts)


_PROTOCOL_TITLES = {"base2novel": "base-to-novel", "cross-dataset": "cross-dataset",
                    "domain-generalization": "domain generalisation"}
_VARIANT_HATCHES = ("", "//", "..", "xx", "\\\\", "oo", "--", "++")


def _styles(methods: Sequence[str]) -> dict[str, tuple]:
    """(colour, hatch) per method: one distinct colour each up to 10 methods; beyond, one colour per base
    method (the spec before ``+`` / ``:``) and one hatch per variant (``+atprompt``, ``+anchoropt``, options)."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    if len(methods) <= len(palette):
        return {m: (palette[i], "") for i, m in enumerate(methods)}
    bases = _ordered(re.split(r"[+:]", m, maxsplit=1)[0] for m in methods)
    variants = _ordered(m[len(re.split(r"[+:]", m, maxsplit=1)[0]):] for m in methods)
    styles: dict[str, tuple] = {}
    for m in methods:
        base = re.split(r"[+:]", m, maxsplit=1)[0]
        b, v = bases.index(base), variants.index(m[len(base):])
        h = v + b // len(palette)  # beyond 10 base methods the colours repeat with other hatches
        while (palette[b % len(palette)], _hatch(h)) in styles.values():  # never two methods alike
            h += 1
        styles[m] = (palette[b % len(palette)], _hatch(h))
    return styles


def _hatch(i: int) -> str:
    """The ``i``-th hatch: the plain ones, then denser repeats of them."""
    return _VARIANT_HATCHES[i % len(_VARIANT_HATCHES)] * (1 + i // len(_VARIANT_HATCHES))


def draw_bars(groups: Sequence[str], stats: dict[str, Sequence[tuple[float, float]]], path: str | os.PathLike,
              ylabel: str = "HM, %", title: str = "") -> Path:
    """The HM chart from ``{method: [(mean, std) per group]}``: one bar per method in each group, error bars
    = std (clipped to 0 .. 100 %), a y axis from 0, a legend below the axes; drawn to be read at ~700 px."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(stats)
    styles = _styles(methods)
    width = 0.8 / max(len(methods), 1)
    bars = len(groups) * max(1, len(methods))
    # 8 in at 110 dpi is ~880 px: shown at a docs page's ~700 px, 13 pt text stays ~15 px; many bars widen it
    with plt.rc_context({"font.size": 13, "axes.titlesize": 13, "legend.fontsize": 12, "hatch.linewidth": 0.8}):
        fig_width = min(16.0, max(8.0, 0.12 * bars + 3.0))
        # as many legend columns as the width holds (12 pt text: ~7.2 pt a character, ~45 pt of handle)
        ncol = max(1, min(len(methods), int(fig_width * 72 // (7.2 * max(map(len, methods), default=1) + 45))))
        rows = math.ceil(len(methods) / ncol)
        fig, ax = plt.subplots(figsize=(fig_width, 3.6 + 0.27 * rows), layout="constrained")
        top = 0.0
        for i, m in enumerate(methods):
            means = [s[0] for s in stats[m]]
            lower = [min(s[1], s[0]) if math.isfinite(s[0]) else 0.0 for s in stats[m]]  # no bar below 0 %
            upper = [min(s[1], 100.0 - s[0]) if math.isfinite(s[0]) else 0.0 for s in stats[m]]
            xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
            colour, hatch = styles[m]
            ax.bar(xs, means, width, yerr=[lower, upper], capsize=2, label=m, color=colour, hatch=hatch,
                   edgecolor="white" if hatch else colour, linewidth=0.5, error_kw={"elinewidth": 1.0})
            top = max([top, *(mu + up for mu, up in zip(means, upper) if math.isfinite(mu))])
        ax.set_ylim(0.0, min(100.0, 10 * math.ceil(top / 10 + 0.05)) if top > 0 else 1.0)  # the axis starts at 0
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        fig.legend(loc="outside lower center", ncol=ncol, frameon=False)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.png")
        fig.savefig(partial, dpi=110, bbox_inches="tight", pad_inches=0.1)
        plt.close(fig)
    os.replace(partial, path)
    return path


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
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
