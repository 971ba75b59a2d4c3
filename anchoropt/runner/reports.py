"""A finished run's report: the one-line summary and the PNG plots."""

from __future__ import annotations

import sys
from pathlib import Path

from .models import RANDOM, ModelBundle


RANDOM_FLAG = "RANDOM WEIGHTS"
NO_ANCHOR_FLAG = "NO ANCHOR PLACED"  # the learned evaluation arrangement maps no slot to an anchor


def random_weights(pretrained: str | None, bundle: ModelBundle | None = None) -> bool:
    """Whether a run's model has no trained weights: as :func:`build_model` recorded it in ``bundle.weights``
    (toy-clip without ``--pretrained`` has its shipped weights), else from ``pretrained`` (``none``; a test
    tower without a file)."""
    if bundle is not None and bundle.weights is not None:
        return bundle.weights == RANDOM
    return pretrained in (None, "", "none", "None")


def weights_record(pretrained: str | None, bundle: ModelBundle | None) -> dict:
    """``{"pretrained": the weights the model has (the bundle's record, else the option), "random_weights": bool}``
    for ``results.json`` / ``stage1.json``."""
    known = bundle.weights if bundle is not None and bundle.weights is not None else pretrained
    return {"pretrained": known, "random_weights": random_weights(pretrained, bundle)}


def summary_line(results: dict) -> str:
    """One line for logs: ``base2novel cifar10_mini coop+anchoropt seed 1 | base 81.2 | novel 70.3 | HM 75.4``
    (the method when ``results`` names it), ending in
    ``| RANDOM WEIGHTS`` when the model had no trained weights and ``| NO ANCHOR PLACED ...`` when AnchorOPT's
    learned evaluation arrangement places none of its anchors (``results["anchors_placed"] == 0``), and
    ``| sampled positions`` after an evaluation that drew the position matrix (``anchoropt eval --sampled-positions``)."""
    method = f" {results['method']}" if results.get("method") else ""  # a grid prints one line per method
    head = f"{results['protocol']} {results['dataset']}{method} seed {results['seed']}"
    flag = f" | {RANDOM_FLAG}" if results.get("random_weights") else ""
    if results.get("anchors_placed") == 0:
        flag += f" | {NO_ANCHOR_FLAG} (the test-time prompt holds soft tokens only)"
    if results.get("positions", "").startswith("sampled"):
        flag += " | sampled positions"
    r = results["results"]
    if results["protocol"] == "base2novel":
        return (f"{head} | base {r['base']['accuracy']:.2f} | novel {r['novel']['accuracy']:.2f} | "
                f"HM {r['hm']:.2f}{flag}")
    parts = [f"source {r['source']['accuracy']:.2f}"]
    parts += [f"{name} {v['accuracy']:.2f}" for name, v in r["targets"].items()]
    if r.get("target_mean") is not None:
        parts.append(f"target mean {r['target_mean']:.2f}")
    return f"{head} | " + " | ".join(parts) + flag


def _plots(learner, bundle: ModelBundle, out: Path, note: str | None = None) -> dict | None:
    from .. import viz

    try:
        return viz.save_run_plots(learner, bundle.model, out / "plots", tokenizer=bundle.tokenizer, note=note)
    except ImportError as err:  # one line; nothing written
        print(f"plots skipped: {err}", file=sys.stderr)
        return None
