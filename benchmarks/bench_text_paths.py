"""Text pass forward+backward: the naive 77-token path vs each of the bridge's exact shortcuts.

One Stage II text pass (``normal_features()`` of all C classes, backward to soft tokens and position logits)
on a random ViT-B/16 text tower, fp32, M = 4, N = 1, with the same parameters and Gumbel noise on every path:

* naive        - all 77 tokens through open_clip's blocks (what the peers and the authors' code do);
* truncated    - up to the batch's last EOT;
* bucketed     - each group of equal EOT position at its own length (model's own blocks);
* prefix       - shared prefix ([SOS] + slots) run once, suffixes at the longest length;
* prefix+bucket- shared prefix, suffixes grouped by length (the default path).

Also: achieved FLOP/s of the default path as a fraction of this machine's fp32 matmul peak (measured in the
same run), and peak memory of the text pass (``--memory``: each path in a fresh subprocess; resident memory
sampled every millisecond during one forward+backward, minus the resident memory before it).

    python benchmarks/bench_text_paths.py [--classes 100] [--repeats 3] [--memory]
"""

from __future__ import annotations

import gc
import subprocess
import sys
import time

import torch

import common
from anchoropt import AnchorOPTPromptLearner, TextTower, functional

PATHS = {
    "naive": dict(truncate=False, share_prefix=False, bucket_min_prompts=10**9),
    "truncated": dict(truncate=True, share_prefix=False, bucket_min_prompts=10**9),
    "bucketed": dict(truncate=True, share_prefix=False, bucket_min_prompts=1),
    "prefix": dict(truncate=True, share_prefix=True, bucket=False),
    "prefix+bucket": dict(truncate=True, share_prefix=True),
}


class _NoBucketTower(TextTower):
    """The shared-prefix path with all suffixes at the longest length (to show what bucketing adds)."""

    def encode_shared(self, prefix, suffix, pool_index, token_ids=None):
        from anchoropt import shared_prefix

        if self.can_share_prefix(prefix.shape[1], pool_index):
            return shared_prefix.encode_with_shared_prefix(self, prefix, suffix, pool_index, bucket=False)
        return super().encode_shared(prefix, suffix, pool_index, token_ids)


def make_learner(model, names, options: dict, seed: int) -> AnchorOPTPromptLearner:
    options = dict(options)
    tower_cls = _NoBucketTower if options.pop("bucket", True) is False else TextTower
    torch.manual_seed(seed)
    tower = tower_cls(model, **options)
    anchors = torch.randn(1, tower.width, device=tower.device) * 0.02
    return AnchorOPTPromptLearner(tower, names, anchors, n_soft=4).train()


def text_step(learner, noise, weights) -> torch.Tensor:
    learner.zero_grad(set_to_none=True)
    matrix = functional.gumbel_softmax_st(learner.position.logits, noise, learner.position.tau)
    features = learner.normal_features(matrix)
    (features * weights).sum().backward()
    return features.detach()


class ChunkedLearners:
    """One learner per chunk of classes, all holding the same tensors: the naive pass in pieces.

    At 1000 classes a single 77-token pass needs more memory than this 24 GB machine has; its cost is linear
    in the number of classes, so summing the chunks' forward+backward times measures the same work.
    """

    def __init__(self, model, names, options: dict, seed: int, chunk: int):
        self.parts = [make_learner(model, names[i : i + chunk], options, seed) for i in range(0, len(names), chunk)]
        self.position, self.tower = self.parts[0].position, self.parts[0].tower

    def load_state_dict(self, state) -> None:
        for part in self.parts:
            part.load_state_dict(state)

    def step(self, noise, weights) -> torch.Tensor:
        outputs, start = [], 0
        for part in self.parts:
            n = len(part.classnames)
            outputs.append(text_step(part, noise, weights[start : start + n]))
            start += n
        return torch.cat(outputs)


def matmul_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """fp32 matmul FLOP/s of this machine (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def text_pass_flops(learner: AnchorOPTPromptLearner) -> float:
    """Matmul FLOPs of the forward+backward text pass run by the default path.

    The tower is frozen, so backward computes gradients of the activations only (no weight gradients): about
    one more forward's worth of matmuls, 2x forward in all.
    """
    width = learner.tower.width
    layers = len(learner.tower.blocks)
    pool = learner.template.normal.pool_index
    n_prefix = learner.template.normal.slot_start + learner.template.normal.n_slots
    suffix_tokens = int((pool + 1 - n_prefix).sum())
    tokens = n_prefix + suffix_tokens
    per_token = 2 * 12 * width * width  # qkv (3), out (1), mlp (8) D x D matmuls
    attention = sum(4 * width * (int(p) + 1) * (int(p) + 1 - n_prefix) for p in pool)  # scores + weighted sum
    return 2 * layers * (tokens * per_token + attention)


def peak_memory_child(path: str, classes: int, seed: int, naive_chunk: int) -> None:
    names = common.classnames(classes)
    model = common.text_model("cpu", seed)
    if path == "naive":
        learner = ChunkedLearners(model, names, PATHS[path], seed, naive_chunk or len(names))
    else:
        learner = make_learner(model, names, PATHS[path], seed)
    k = learner.position.size
    noise = torch.zeros(k, k)
    weights = torch.ones(len(names), learner.tower.output_dim)
    gc.collect()
    before, peak = common.peak_rss_mb(lambda: _step(learner, noise, weights))
    print(f"{before} {peak}")


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--memory", action="store_true", help="also measure peak RSS of each path (subprocesses)")
    p.add_argument("--memory-child", default=None, help=common.hidden_help())
    p.add_argument("--naive-chunk", type=int, default=0,
                   help="run the naive path over chunks of this many classes (time summed; bounded memory)")
    args = p.parse_args()
    if args.memory_child:
        peak_memory_child(args.memory_child, args.classes, args.seed, args.naive_chunk)
        return
    names = common.classnames(args.classes)
    model = common.text_model(args.device, args.seed)
    learners = {name: make_learner(model, names, PATHS[name], args.seed) for name in args.paths if name != "naive"}
    if "naive" in args.paths:
        chunk = args.naive_chunk or len(names)
        learners = {"naive": ChunkedLearners(model, names, PATHS["naive"], args.seed, chunk), **learners}
    reference = learners["naive"].parts[0] if "naive" in learners else next(iter(learners.values()))
    for learner in learners.values():
        learner.load_state_dict(reference.state_dict())
    generator = torch.Generator().manual_seed(args.seed)
    k = reference.position.size
    noise = -torch.empty(k, k).exponential_(generator=generator).log().to(args.device)
    weights = torch.randn(len(names), reference.tower.output_dim, generator=generator).to(args.device)

    times = common.time_interleaved(
        {name: (lambda l=l: _step(l, noise, weights)) for name, l in learners.items()}, args.repeats, args.device
    )
    medians = {name: common.median(t) for name, t in times.items()}
    base_feats = _step(learners[args.paths[0]], noise, weights)
    result = {"n_classes": len(names), "median_seconds": medians, "seconds": times, "ratio_vs_first": {}, "max_rel_diff": {}}
    for name in args.paths:
        feats = _step(learners[name], noise, weights)
        diff = float((feats - base_feats).abs().max() / base_feats.abs().max())
        ratio = medians[args.paths[0]] / medians[name]
        result["ratio_vs_first"][name], result["max_rel_diff"][name] = ratio, diff
        print(
            f"text fwd+bwd C={len(names)} {name:>13}: {medians[name]:.3f} s | {ratio:6.2f}x vs {args.paths[0]} | "
            f"max rel diff {diff:.1e}"
        )
    if "prefix+bucket" in learners:
        peak = matmul_peak_flops()
        achieved = text_pass_flops(learners["prefix+bucket"]) / medians["prefix+bucket"]
        result["matmul_peak_flops"], result["achieved_flops"] = peak, achieved
        print(f"prefix+bucket achieves {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.0%} of this machine's "
              f"fp32 matmul peak ({peak / 1e9:.1f} GFLOP/s, 1024^3 matmul)")
    if args.memory:
        result["peak_rss_mb"] = {}
        for name in args.paths:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", name, "--classes", str(args.classes),
                 "--naive-chunk", str(args.naive_chunk)],
                capture_output=True, text=True, check=True,
            ).stdout.split()
            before, peak = float(out[-2]), float(out[-1])
            result["peak_rss_mb"][name] = {"before_pass": before, "peak": peak, "text_pass": peak - before}
            chunked = f" (in chunks of {args.naive_chunk} classes)" if name == "naive" and args.naive_chunk else ""
            print(f"peak memory of the text pass C={len(names)} {name:>13}: +{peak - before:.0f} MB over the "
                  f"{before:.0f} MB of the loaded model{chunked}")
    path = common.write_results(f"bench_text_paths_c{len(names)}", args, result)
    print(f"wrote {path.relative_to(path.parents[2])}")


def _step(learner, noise, weights) -> torch.Tensor:
    return learner.step(noise, weights) if isinstance(learner, ChunkedLearners) else text_step(learner, noise, weights)


if __name__ == "__main__":
    main()
