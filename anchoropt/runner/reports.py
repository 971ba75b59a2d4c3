"""A finished run's report: the one-line summary and the PNG plots."""

from __future__ import annotations

import sys
from pathlib import Path

from .models import ModelBundle


def summary_line(results: dict) -> str:
    """One line for logs: ``base2novel cifar10_mini seed 1 | base 81.2 | novel 70.3 | HM 75.4``."""
    head = f"{results['protocol']} {results['dataset']} seed {results['seed']}"
    r = results["results"]
    if results["protocol"] == "base2novel":
        return (f"{head} | base {r['base']['accuracy']:.2f} | novel {r['novel']['accuracy']:.2f} | "
                f"HM {r['hm']:.2f}")
    parts = [f"source {r['source']['accuracy']:.2f}"]
    parts += [f"{name} {v['accuracy']:.2f}" for name, v in r["targets"].items()]
    if r.get("target_mean") is not None:
        parts.append(f"target mean {r['target_mean']:.2f}")
    return f"{head} | " + " | ".join(parts)


def _plots(learner, bundle: ModelBundle, out: Path) -> dict | None:
    try:
        from .. import viz

        return viz.save_run_plots(learner, bundle.model, out / "plots", tokenizer=bundle.tokenizer)
    except ImportError as err:
        print(f"plots skipped ({err}); install the extra: pip install 'anchoropt[viz]'", file=sys.stderr)
        return None
