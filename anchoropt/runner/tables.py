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

from .. import _files
from .evaluation import harmonic_mean

__all__ = ["mean_std", "format_cell", "record_from_results", "base2novel_tables", "transfer_tables",
           "render_tables", "plot_hm", "write_report", "table_rows", "render_csv", "render_tex", "paper_table",
           "paper_numbers"]


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
        try:
            fig.savefig(partial, dpi=110, bbox_inches="tight", pad_inches=0.1)
        finally:
            plt.close(fig)
    return _files.replace_fsynced(partial, path)


def write_report(output: str | os.PathLike, records: Sequence[dict], methods: Sequence[str] = (),
                 datasets: Sequence[str] = (), plot: bool = True, paper: bool = False) -> dict:
    """Write ``results.json``, ``table.md``, ``table.csv``, ``table.tex`` (booktabs) and (matplotlib permitting)
    ``hm.png`` into ``output``; with ``paper`` the CSV and LaTeX tables carry the paper's Table 1 numbers and
    the differences (:func:`table_rows`)."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: (_rank(r["dataset"], datasets), _rank(r["method"], methods), r["seed"]))
    _write_text(out / "results.json", json.dumps(records, indent=2) + "\n")
    rows = table_rows(records, methods, datasets, paper=paper)
    _write_text(out / "table.md", render_tables(records, methods, datasets) + (paper_markdown(rows) if paper else ""))
    seeds = sorted({r["seed"] for r in records})
    _files.write_text(out / "table.csv", render_csv(rows))
    _files.write_text(out / "table.tex", render_tex(rows, seeds, paper_table()["source"] if paper else None))
    written = {"results": str(out / "results.json"), "table": str(out / "table.md"),
               "csv": str(out / "table.csv"), "tex": str(out / "table.tex")}
    if paper:
        written["paper_rows"] = sum(1 for r in rows if r.get("paper_hm") is not None)
    if plot and records:
        png = plot_hm(records, out / "hm.png", methods, datasets)
        if png is not None:
            written["plot"] = str(png)
    return written


def _rank(value: str, order: Sequence[str]) -> tuple[int, str]:
    return (list(order).index(value) if value in order else len(order), value)


def _write_text(path: Path, text: str) -> None:
    _files.write_text(path, text)  # atomic: temp file, fsync, os.replace


# ---------------------------------------------------------------------- table.csv / table.tex, the paper's numbers
PAPER_TABLE = Path(__file__).with_name("paper_table1.json")
_B2N = ("base", "novel", "hm")


def paper_table() -> dict:
    """The paper's Table 1 as shipped (``paper_table1.json``: its ``source``, ``datasets`` and ``rows``)."""
    return json.loads(PAPER_TABLE.read_text(encoding="utf-8"))


def paper_numbers(method: str, dataset: str, datasets: Sequence[str] = (), table: dict | None = None) -> dict | None:
    """The paper's ``{"base", "novel", "hm"}`` for a grid's ``method`` spec (its options after ``:`` ignored) on
    ``dataset`` (a folder name such as ``caltech-101``, read with the presets' spellings); ``None`` when the
    paper has no such row.  ``dataset="average"`` matches the paper's average only when ``datasets`` are the
    paper's 11."""
    from ..methods.presets import canonical_name

    table = table or paper_table()
    spec = method.partition(":")[0].strip()
    row = next((r for r in table["rows"] if r["spec"] == spec), None)
    if row is None:
        return None
    if dataset == "average":
        try:
            names = sorted(canonical_name(d) for d in datasets)
        except KeyError:
            return None
        return row["datasets"]["average"] if names == sorted(table["datasets"][1:]) else None
    try:
        return row["datasets"].get(canonical_name(dataset))
    except KeyError:
        return None


def table_rows(records: Sequence[dict], methods: Sequence[str] = (), datasets: Sequence[str] = (),
               paper: bool = False) -> list[dict]:
    """One flat row per method and dataset (base-to-novel: the datasets, then ``average``; transfer: the source
    and each target, then ``target_average``) with the mean, std and seed count of each number; with ``paper``
    the paper's base / novel / HM (``paper_*``) and ours minus the paper's (``diff_*``) where it has the row."""
    rows: list[dict] = []
    b2n = [r for r in records if r["protocol"] == "base2novel"]
    if b2n:
        methods_ = _ordered((r["method"] for r in b2n), methods)
        names = _ordered((r["dataset"] for r in b2n), datasets)
        cells = _by(b2n, "method", "dataset")
        table = paper_table() if paper else None
        for d in [*names, "average"]:
            for m in methods_:
                values = (_average_block(cells, m, names) if d == "average"
                          else {k: [r[k] for r in cells.get((m, d), [])] for k in _B2N})
                if not values["hm"]:
                    continue
                row = {"protocol": "base2novel", "method": m, "dataset": d, "seeds": len(values["hm"])}
                for k in _B2N:
                    row[f"{k}_mean"], row[f"{k}_std"] = (round(x, 4) for x in mean_std(values[k]))
                if table is not None:
                    _add_paper(row, paper_numbers(m, d, names, table))
                rows.append(row)
    for protocol in ("cross-dataset", "domain-generalization"):
        mine = [r for r in records if r["protocol"] == protocol]
        for source in _ordered(r["dataset"] for r in mine):
            runs = [r for r in mine if r["dataset"] == source]
            targets = _ordered(name for r in runs for name in r["targets"])
            for m in _ordered((r["method"] for r in runs), methods):
                own = [r for r in runs if r["method"] == m]
                columns = [("source", [r["source"] for r in own])]
                columns += [(t, [r["targets"][t] for r in own if t in r["targets"]]) for t in targets]
                columns += [("target_average", [r["target_mean"] for r in own if r["target_mean"] is not None])]
                for target, values in columns:
                    if values:
                        mean, std = mean_std(values)
                        rows.append({"protocol": protocol, "method": m, "dataset": source, "target": target,
                                     "seeds": len(values), "accuracy_mean": round(mean, 4),
                                     "accuracy_std": round(std, 4)})
    return rows


def _add_paper(row: dict, numbers: dict | None) -> None:
    for k in _B2N:
        row[f"paper_{k}"] = numbers[k] if numbers else None
        row[f"diff_{k}"] = round(row[f"{k}_mean"] - numbers[k], 2) if numbers else None


def paper_markdown(rows: Sequence[dict]) -> str:
    """``table.md``'s block beside the paper: each row the paper has, ours (mean ± std), the paper's, the
    differences."""
    source = paper_table()["source"]
    matched = [r for r in rows if r.get("paper_hm") is not None]
    lines = ["", "### Beside the paper", "", f"Paper: {source}. Δ: ours minus the paper's.", ""]
    if not matched:
        return "\n".join(lines + ["None of the grid's methods and datasets is in the paper's Table 1.", ""])
    lines += ["| Method | Dataset | Base | Novel | HM | Paper base | Paper novel | Paper HM | Δ base | Δ novel | Δ HM |",
              "|---|---|" + "---:|" * 9]
    for r in matched:
        ours = [f"{r[f'{k}_mean']:.2f}" + (f" ± {r[f'{k}_std']:.2f}" if r["seeds"] > 1 else "") for k in _B2N]
        lines.append(f"| {r['method']} | {r['dataset']} | " + " | ".join(ours) + " | "
                     + " | ".join(f"{r[f'paper_{k}']:.2f}" for k in _B2N) + " | "
                     + " | ".join(f"{r[f'diff_{k}']:+.2f}" for k in _B2N) + " |")
    return "\n".join(lines) + "\n"


def render_csv(rows: Sequence[dict]) -> str:
    """``table.csv``: :func:`table_rows` with a header (the union of the rows' columns, empty where absent)."""
    return _files.csv_text(rows, empty_header=("protocol", "method", "dataset"))


def _tex(text: str) -> str:
    """``text`` with LaTeX's special characters escaped."""
    out = str(text).replace("\\", "\x00")
    for char, escaped in (("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"), ("_", r"\_"), ("{", r"\{"),
                          ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\textasciicircum{}")):
        out = out.replace(char, escaped)
    return out.replace("\x00", r"\textbackslash{}")


def _tex_cell(mean: float, std: float, seeds: int) -> str:
    return f"${mean:.2f}$" if seeds < 2 else f"${mean:.2f} \\pm {std:.2f}$"


def _tex_number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "--"
    return f"${value:+.2f}$" if signed else f"${value:.2f}$"


def render_tex(rows: Sequence[dict], seeds: Sequence[int] = (), source: str | None = None) -> str:
    """``table.tex``: booktabs tables (``\\usepackage{booktabs}``), mean $\\pm$ std over seeds; base-to-novel in
    the paper's blocks (one per dataset, then the average), with the paper's numbers and the differences when
    the rows carry them (``source`` names the paper's table)."""
    note = f"% mean $\\pm$ sample std over seeds {', '.join(map(str, seeds))}; accuracies in \\%\n" if seeds else ""
    parts = ["% anchoropt grid report; needs \\usepackage{booktabs}\n" + note]
    b2n = [r for r in rows if r["protocol"] == "base2novel"]
    if b2n:
        parts.append(_tex_base2novel(b2n, source))
    for protocol, title in (("cross-dataset", "Cross-dataset"), ("domain-generalization", "Domain generalisation")):
        mine = [r for r in rows if r["protocol"] == protocol]
        if mine:
            parts.append(_tex_transfer(mine, title))
    return "\n".join(parts)


def _tex_base2novel(rows: Sequence[dict], source: str | None) -> str:
    paper = any("paper_hm" in r for r in rows)
    head = ["Method", "Base", "Novel", "HM"] + (["Paper B", "Paper N", "Paper HM", "$\\Delta$B", "$\\Delta$N",
                                                  "$\\Delta$HM"] if paper else [])
    lines = ["\\begin{table}[t]", "\\centering", "\\small", "\\begin{tabular}{l" + "c" * (len(head) - 1) + "}",
             "\\toprule", " & ".join(head) + " \\\\"]
    for dataset in _ordered(r["dataset"] for r in rows):
        title = "Average" if dataset == "average" else _tex(dataset)
        lines += ["\\midrule", f"\\multicolumn{{{len(head)}}}{{l}}{{\\textit{{{title}}}}} \\\\"]
        for r in (r for r in rows if r["dataset"] == dataset):
            cells = [_tex(r["method"])] + [_tex_cell(r[f"{k}_mean"], r[f"{k}_std"], r["seeds"]) for k in _B2N]
            if paper:
                cells += [_tex_number(r.get(f"paper_{k}")) for k in _B2N]
                cells += [_tex_number(r.get(f"diff_{k}"), signed=True) for k in _B2N]
            lines.append(" & ".join(cells) + " \\\\")
    caption = "Base-to-novel generalisation: base / novel accuracy and HM (\\%), mean $\\pm$ std over seeds."
    if paper and source:
        caption += f" Paper: {_tex(source)}; $\\Delta$: ours minus the paper's."
    lines += ["\\bottomrule", "\\end{tabular}", f"\\caption{{{caption}}}", "\\end{table}", ""]
    return "\n".join(lines)


def _tex_transfer(rows: Sequence[dict], title: str) -> str:
    lines = []
    for source in _ordered(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == source]
        columns = _ordered(r["target"] for r in mine)
        head = ["Method"] + ["Source" if c == "source" else "Target average" if c == "target_average" else _tex(c)
                             for c in columns]
        lines += ["\\begin{table}[t]", "\\centering", "\\small", "\\begin{tabular}{l" + "c" * len(columns) + "}",
                  "\\toprule", " & ".join(head) + " \\\\", "\\midrule"]
        for m in _ordered(r["method"] for r in mine):
            cell = {r["target"]: r for r in mine if r["method"] == m}
            lines.append(" & ".join([_tex(m)] + [
                _tex_cell(cell[c]["accuracy_mean"], cell[c]["accuracy_std"], cell[c]["seeds"]) if c in cell else "--"
                for c in columns]) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}",
                  f"\\caption{{{title}: source {_tex(source)}; accuracy (\\%), mean $\\pm$ std over seeds.}}",
                  "\\end{table}", ""]
    return "\n".join(lines)
