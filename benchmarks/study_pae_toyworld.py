"""Deep AnchorOPT with and without PAE on one dataset: convergence speed and final base / novel / HM.

For each seed: Stage I anchors once (shared by both contenders), then Stage II of the deep variant twice -
without and with ``--pae`` - on the same frozen image features (cached, ``--augment none``), the same
initial prompts and the same Gumbel noise.  After every epoch the base-class test accuracy of the normal
prompt is measured; "steps to 95 %" is the first step count at which it reaches 95 % of that run's final
base accuracy.  Prints one line per run and a summary (mean +- std over seeds, and the ratio of the
steps-to-95 % means: PAE's claim is 1.41x on visual prompts), writes ``benchmarks/results/pae_toyworld.json``.

    python benchmarks/study_pae_toyworld.py --data DIR [--model toy-clip] [--seeds 1 2 3] [--epochs 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anchoropt import AnchorOPTPromptLearner, runner  # noqa: E402
from anchoropt.functional import clip_logits  # noqa: E402
from anchoropt.runner import protocols  # noqa: E402
from anchoropt.runner.models import encode_images  # noqa: E402
from anchoropt.runner.training import _feature_table  # noqa: E402


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset directory (e.g. from `anchoropt toyworld make`)")
    p.add_argument("--descriptions", default=None, help="descriptions JSON (default: DATA/descriptions.json)")
    p.add_argument("--model", default="toy-clip")
    p.add_argument("--pretrained", default=None, help="weights (default: the model's own default)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--deep-depth", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--stage1-steps", type=int, default=300)
    p.add_argument("--pae-alpha", type=float, default=0.5)
    p.add_argument("--pae-beta", type=float, default=0.2)
    p.add_argument("--pae-dim", type=int, default=256)
    p.add_argument("--pae-reading", choices=("released", "paper"), default="released")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "pae_toyworld.json"))
    return p.parse_args(argv)


def _bundle(args):
    kwargs = {} if args.pretrained is None else {"pretrained": args.pretrained}
    return runner.build_model(args.model, device="cpu", augment="none", **kwargs)


def _steps_to(curve: list[tuple[int, float]], fraction: float = 0.95) -> int:
    target = fraction * curve[-1][1]
    return next(step for step, acc in curve if acc >= target)


def _run(bundle, cfg, anchors, train_view, novel_view, base_test) -> dict:
    """One Stage II run with a base-accuracy curve (per epoch); final base / novel / HM."""
    runner.seed_everything(cfg.seed)
    learner = AnchorOPTPromptLearner(bundle.model, train_view.classnames, anchors, n_soft=cfg.n_soft,
                                     tokenizer=bundle.tokenizer, tau=cfg.tau, deep_depth=cfg.deep_depth)
    features, labels = base_test
    curve: list[tuple[int, float]] = []
    steps_per_epoch = -(-len(train_view.train) // cfg.batch_size)

    def base_accuracy(epoch: int, loss: float) -> None:
        learner.eval()
        with torch.no_grad():
            logits = clip_logits(features, learner.normal_features(), learner.logit_scale())
        curve.append(((epoch + 1) * steps_per_epoch, round(100.0 * float((logits.argmax(-1) == labels).float().mean()), 4)))
        learner.train()

    start = time.perf_counter()
    stage2 = runner.train_stage2(learner, bundle, train_view.train, cfg, on_epoch_end=base_accuracy)
    seconds = time.perf_counter() - start
    base = runner.evaluate(learner, bundle, train_view.test, train_view.classnames, cfg, headline="base")
    novel = runner.evaluate(learner, bundle, novel_view.test, novel_view.classnames, cfg, headline="novel")
    learner.deep_hooks.remove()  # the next run on this tower takes the same (shared-prefix) path
    out = {"curve": curve, "steps_to_95": _steps_to(curve), "base": base["accuracy"], "novel": novel["accuracy"],
           "hm": round(runner.harmonic_mean(base["accuracy"], novel["accuracy"]), 4), "train_seconds": round(seconds, 2)}
    if "pae" in stage2:
        out["pae"] = {k: stage2["pae"][k] for k in ("epoch_koopman", "epoch_lyapunov", "spectral_radius")}
    return out


def _mean_std(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> int:
    args = _args(argv)
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    bundle = _bundle(args)
    descriptions = args.descriptions or str(Path(args.data) / "descriptions.json")
    runs: dict[str, list[dict]] = {"deep": [], "deep+pae": []}
    for seed in args.seeds:
        cfg = runner.RunConfig(data=args.data, model=args.model, descriptions=descriptions, seed=seed,
                               shots=args.shots, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                               deep_depth=args.deep_depth, augment="none", cache_image_features=True,
                               stage1_steps=args.stage1_steps, progress=False, plots=False,
                               pae_alpha=args.pae_alpha, pae_beta=args.pae_beta, pae_dim=args.pae_dim,
                               pae_reading=args.pae_reading).resolve()
        source = protocols._source_dataset(cfg)
        train_view, novel_view = protocols._training_view(source, cfg)
        runner.seed_everything(seed)
        anchors, _ = runner.learn_anchors(bundle, train_view.classnames, descriptions, cfg)
        base_features = _feature_table(bundle, train_view.test, bundle.test_transform, cfg, torch.device("cpu"),
                                       encode_images)
        base_labels = torch.tensor([r.label for r in train_view.test])
        for name, pae in (("deep", False), ("deep+pae", True)):
            result = _run(bundle, dataclasses.replace(cfg, pae=pae), anchors, train_view, novel_view,
                          (base_features, base_labels))
            result["seed"] = seed
            runs[name].append(result)
            print(f"seed {seed} {name:9s} | steps to 95 % of final base {result['steps_to_95']:4d} | base "
                  f"{result['base']:.2f} | novel {result['novel']:.2f} | HM {result['hm']:.2f} | "
                  f"{result['train_seconds']:.1f} s", flush=True)
    summary = {}
    for name, rs in runs.items():
        summary[name] = {key: _mean_std([r[key] for r in rs]) for key in ("steps_to_95", "base", "novel", "hm")}
        s = summary[name]
        print(f"{name:9s} | steps to 95 % {s['steps_to_95'][0]:.1f} +- {s['steps_to_95'][1]:.1f} | base "
              f"{s['base'][0]:.2f} +- {s['base'][1]:.2f} | novel {s['novel'][0]:.2f} +- {s['novel'][1]:.2f} | "
              f"HM {s['hm'][0]:.2f} +- {s['hm'][1]:.2f}")
    speedup = summary["deep"]["steps_to_95"][0] / summary["deep+pae"]["steps_to_95"][0]
    print(f"convergence speed-up (mean steps to 95 %, deep / deep+pae): {speedup:.2f}x (PAE's claim: 1.41x)")
    record = {"args": vars(args), "runs": runs, "summary": summary, "speedup": round(speedup, 4),
              "seconds": round(time.perf_counter() - wall, 1), "torch": torch.__version__}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
