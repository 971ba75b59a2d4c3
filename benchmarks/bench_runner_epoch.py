"""The runner's Stage II epoch on a random-weight ViT-B/16: where a step's time goes, and what caching buys.

A real ``anchoropt.runner.train_stage2`` epoch (JPEG/PNG decoding, transforms, frozen image tower, prompt
learner, loss, backward, SGD) on a synthetic ImageFolder at the model's 224 px, timed per section:

* ``data``            - waiting for the next batch (decode + transform, in the main process with 0 workers);
* ``image_encoding``  - the frozen image tower on the batch;
* ``text_encoding``   - the prompt learner's forward (normal-prompt text pass, logits);
* ``loss_backward``   - loss, backward (through the text tower) and the optimiser step.

Three configurations, side by side in one run:

1. ``rrc_flip``          - the paper's per-step augmentation (random resized crop + flip), no cache;
2. ``none``              - no augmentation, no cache;
3. ``none + cache``      - no augmentation, image features computed once before the first epoch
   (``--cache-image-features``); the one-time cost is reported separately and amortised over the epochs.

    python benchmarks/bench_runner_epoch.py                 # ~4 min on 2 idle CPU cores
    python benchmarks/bench_runner_epoch.py --device cuda --classes 100 --shots 16 --batch-size 32

Prints one line per figure and writes ``benchmarks/results/bench_runner_epoch.json``.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import classnames, machine, parser, write_results  # noqa: E402

from anchoropt import AnchorOPTPromptLearner, runner  # noqa: E402
from anchoropt.datasets import folders as D  # noqa: E402
from anchoropt.runner.models import _preprocess_cfg, _text_width  # noqa: E402

SECTIONS = ("data", "image_encoding", "text_encoding", "loss_backward")


def _learner(bundle, trained, cfg):
    anchors = torch.randn(1, _text_width(bundle.model), generator=torch.Generator().manual_seed(0)) * 0.02
    torch.manual_seed(cfg.seed)
    return AnchorOPTPromptLearner(bundle.model, trained, anchors, n_soft=cfg.n_soft, tokenizer=bundle.tokenizer)


def warm_up(bundle, records, trained, cfg) -> None:
    """One step of the configuration, untimed (allocator, thread pools, first calls)."""
    runner.train_stage2(_learner(bundle, trained, cfg), bundle, records[: cfg.batch_size],
                        dataclasses.replace(cfg, epochs=1))


def timed_run(bundle, records, trained, cfg, device) -> dict:
    """One training run of ``cfg.epochs`` epochs with the runner's section timer."""
    timer = runner.StepTimer(device)
    start = time.perf_counter()
    summary = runner.train_stage2(_learner(bundle, trained, cfg), bundle, records, cfg, timer=timer)
    total = time.perf_counter() - start
    cache = summary.get("cache_seconds", 0.0)
    return {"times": timer.times, "cache_seconds": cache, "epoch_seconds": (total - cache) / summary["epochs"],
            "steps": summary["epochs"] * summary["steps_per_epoch"]}


def aggregate(runs: list[dict]) -> dict:
    """Per-section medians over every step of every round; epoch and cache times: medians over rounds."""
    per_step = {name: statistics.median([t for r in runs for t in r["times"].get(name, [])])
                if any(name in r["times"] for r in runs) else 0.0 for name in SECTIONS}
    step_total = sum(per_step.values())
    return {
        "rounds": len(runs),
        "steps_per_round": runs[0]["steps"],
        "step_seconds": round(step_total, 4),
        "per_step_median": {name: round(v, 4) for name, v in per_step.items()},
        "share": {name: round(v / step_total, 4) if step_total else 0.0 for name, v in per_step.items()},
        "epoch_seconds": round(statistics.median(r["epoch_seconds"] for r in runs), 3),
        "epoch_seconds_all": [round(r["epoch_seconds"], 3) for r in runs],
        "cache_seconds": round(statistics.median(r["cache_seconds"] for r in runs), 3),
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(classes=20, repeats=2)
    p.add_argument("--shots", type=int, default=4, help="training images per class (default 4)")
    p.add_argument("--batch-size", type=int, default=16, help="Stage II batch size (default 16)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per configuration (default 1)")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model, random weights (default ViT-B-16)")
    args = p.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(args.seed)
    bundle = runner.build_model(args.model, None, device)
    plain = runner.eval_transform(bundle.model)
    size = _preprocess_cfg(bundle.model).size
    size = size if isinstance(size, int) else size[0]
    names = classnames(args.classes)
    results: dict = {"model": args.model, "image_size": size, "classes": args.classes, "shots": args.shots,
                     "batch_size": args.batch_size, "epochs": args.epochs}
    with tempfile.TemporaryDirectory() as tmp:
        folder = D.make_synthetic_image_folder(Path(tmp) / "data", names, per_class=args.shots, size=size,
                                               seed=args.seed)
        records, trained = D.read_image_folder(folder)
        base = runner.RunConfig(data=str(folder), model=args.model, pretrained=None, seed=args.seed, shots=args.shots,
                                epochs=args.epochs, batch_size=args.batch_size, warmup_epochs=0, progress=False,
                                plots=False, device=args.device).resolve()
        configs = {
            "rrc_flip": (dataclasses.replace(base, augment="rrc_flip"), bundle),
            "none": (dataclasses.replace(base, augment="none"), dataclasses.replace(bundle, train_transform=plain)),
            "none+cache": (dataclasses.replace(base, augment="none", cache_image_features=True),
                           dataclasses.replace(bundle, train_transform=plain)),
        }
        for cfg, b in configs.values():
            warm_up(b, records, trained, cfg)
        runs: dict[str, list[dict]] = {name: [] for name in configs}
        for _ in range(args.repeats):  # rounds interleave the configurations: a shared machine's drift hits all
            for name, (cfg, b) in configs.items():
                runs[name].append(timed_run(b, records, trained, cfg, device))
    for name in configs:
        results[name] = r = aggregate(runs[name])
        shares = " | ".join(f"{k} {r['share'][k]:.0%}" for k in SECTIONS)
        print(f"{name:>11}: {r['step_seconds']:.3f} s/step ({shares}); epoch {r['epoch_seconds']:.2f} s"
              + (f"; one-time cache {r['cache_seconds']:.2f} s" if r["cache_seconds"] else ""), flush=True)
    b, c = results["none"], results["none+cache"]
    results["speedup_step_cache"] = round(b["step_seconds"] / c["step_seconds"], 2)
    results["speedup_epoch_cache"] = round(b["epoch_seconds"] / c["epoch_seconds"], 2)
    # the paper's schedules: the cache is built once, then every epoch is cheap
    for epochs in (10, 100):
        with_cache = c["cache_seconds"] + epochs * c["epoch_seconds"]
        results[f"speedup_{epochs}_epochs_cache"] = round(epochs * b["epoch_seconds"] / with_cache, 2)
    results["augmentation_cost"] = round(results["rrc_flip"]["step_seconds"] / b["step_seconds"], 3)
    print(f"cache: {results['speedup_step_cache']}x per step, {results['speedup_epoch_cache']}x per epoch; "
          f"with the one-time cost amortised: {results['speedup_10_epochs_cache']}x over 10 epochs, "
          f"{results['speedup_100_epochs_cache']}x over 100 epochs")
    print(f"rrc_flip step / plain step: {results['augmentation_cost']}x")
    path = write_results("bench_runner_epoch", args, results)
    print(f"wrote {path} ({machine()['torch']}, {args.device})")


if __name__ == "__main__":
    main()
