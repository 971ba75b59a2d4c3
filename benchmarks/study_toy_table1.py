"""What AnchorOPT learned in a Table 1 grid: where the position matrix puts the anchor, how large the soft tokens
grow, and which head scores the novel classes - read from the runs' saved learners, no training.

For every ``+anchoropt`` run (CoOp, CoCoOp, MaPLe or DePT; any spec options) of the grid: P(anchor) per slot (the position matrix's
softmax at tau, the anchor's column), whether the deterministic arrangement places the anchor, the mean L2 norm
of the soft tokens, the chance that a Gumbel-max sample of the matrix (sampled evaluation) gives the same
arrangement as the deterministic one (the product over slots of each row's largest probability), and the novel
accuracy of the normal, anchor and ensemble heads.  Beside them: the soft-token
norms of the grid's ``coop`` runs and the toy CLIP's mean word-embedding norm.  Prints a markdown table and
writes ``GRID/anchoropt_study.json``.

    python benchmarks/study_toy_table1.py GRID          # GRID: an `anchoropt toyworld table1` / grid output
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch


def _learner_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted((run_dir / "prompt_learner").glob("*.safetensors")) or sorted((run_dir / "learner").glob(
        "*.safetensors"))  # AnchorOPT's learner / every other method's
    return load_file(str(files[0])) if files else {}


def _tensor(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """``name`` in a learner's state: top-level (CoOp+AnchorOPT's) or inside a method module
    (``text.learner.position.logits`` in CoCoOp / MaPLe / DePT + AnchorOPT)."""
    if name in tensors:
        return tensors[name]
    matches = [key for key in tensors if key.endswith("." + name)]
    if len(matches) != 1:
        raise KeyError(f"the learner holds {len(matches)} tensors named {name!r}: {sorted(tensors)}")
    return tensors[matches[0]]


def _anchor_run(run_dir: Path, results: dict) -> dict:
    """P(anchor) per slot, placement, soft-token norm and novel accuracies of one ``+anchoropt`` run."""
    tensors = _learner_tensors(run_dir)
    tau = results["method_settings"]["tau"]
    soft = _tensor(tensors, "soft")
    n_soft = soft.shape[0]
    probs = torch.softmax(_tensor(tensors, "position.logits").float() / tau, dim=-1)  # (slots, tokens): soft..., anchor...
    novel = results["results"]["novel"]
    return {
        "dataset": results["dataset"], "method": results["method"], "seed": results["seed"],
        "p_anchor": [round(float(p), 3) for p in probs[:, n_soft:].sum(dim=-1)],
        "anchors_placed": results.get("anchors_placed"),
        "p_sample_is_deterministic": round(float(probs.max(dim=-1).values.prod()), 3),
        "soft_norm": round(float(soft.float().norm(dim=-1).mean()), 3),
        "novel": {head: novel.get(f"accuracy_{head}") for head in ("normal", "anchor", "ensemble")},
        "hm": results["results"]["hm"],
    }


def study(grid: Path) -> dict:
    anchored, coop_norms = [], []
    for results_file in sorted((grid / "runs").glob("*/*/seed*/results.json")):
        results = json.loads(results_file.read_text(encoding="utf-8"))
        method = results["method"]
        if method.split(":")[0].endswith("+anchoropt"):
            anchored.append(_anchor_run(results_file.parent, results))
        elif method.split(":")[0] == "coop":
            soft = _learner_tensors(results_file.parent).get("soft")
            if soft is not None:
                coop_norms.append(float(soft.float().norm(dim=-1).mean()))
    from anchoropt.toyworld import load_model

    words = load_model()[0].token_embedding.weight
    return {"anchoropt_runs": anchored, "coop_soft_norm_mean": round(statistics.mean(coop_norms), 3)
            if coop_norms else None, "word_embedding_norm_mean": round(float(words.norm(dim=-1).mean()), 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("grid", type=Path, help="the grid folder (runs/<dataset>/<method>/seed<N>/)")
    args = p.parse_args(argv)
    out = study(args.grid)
    print("| dataset | method | seed | P(anchor) per slot | anchor placed | P(sample = deterministic) | "
          "soft-token norm | novel: normal / anchor / ensemble | HM |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in out["anchoropt_runs"]:
        n = r["novel"]
        print(f"| {r['dataset']} | {r['method']} | {r['seed']} | {' '.join(f'{p:.2f}' for p in r['p_anchor'])} | "
              f"{r['anchors_placed']} | {r['p_sample_is_deterministic']:.3f} | {r['soft_norm']:.2f} | "
              f"{n['normal']:.1f} / {n['anchor']:.1f} / {n['ensemble']:.1f} | {r['hm']:.2f} |")
    print(f"\nCoOp soft-token norm (mean over runs): {out['coop_soft_norm_mean']}; toy CLIP word embeddings: "
          f"{out['word_embedding_norm_mean']}")
    (args.grid / "anchoropt_study.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
