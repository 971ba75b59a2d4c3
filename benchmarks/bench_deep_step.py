"""One deep-variant Stage II AnchorOPT training step vs one shallow step on the same tower.

Both steps: random ViT-B/16 text tower (``anchoropt.testing.vit_b16_text_clip()``), fp32, C classes (100
CIFAR-100 names by default), M = 4 soft tokens + N = 1 anchor, precomputed random image features (batch
32), ``normal_features()`` + cached anchor-prompt features + ``anchoropt_loss`` (CE + KD) + backward + SGD.
The deep learner adds per-layer prompts on text blocks 1..8 (MaPLe's PROMPT_DEPTH 9 -> 8 deep layers).

* headline: deep vs shallow, each on the bridge's default path (the shared ``[SOS] + slots`` prefix
  computed once; the deep replacement happens inside that prefix);
* hook path: deep with the tower's own blocks and the context-gated hooks (what runs under gradient
  checkpointing or for non-CLIP blocks) vs shallow on the same full (truncated) path.

Deep hooks on a model's blocks make ``TextTower`` refuse the shared prefix for *other* users of those
blocks, so the two learners get two model instances built from the same seed (identical weights).

    python benchmarks/bench_deep_step.py [--repeats 3] [--classes 100] [--depth 8] [--device cpu]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import common
from anchoropt import AnchorOPTPromptLearner, TextTower, functional

BATCH = 32


def sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=0.002, momentum=0.9, weight_decay=5e-4)


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=8, help="deep layers (blocks 1..depth; MaPLe: PROMPT_DEPTH - 1)")
    p.add_argument("--kd-weight", type=float, default=1.0, help="KD weight of the loss")
    args = p.parse_args()
    names = common.classnames(args.classes)
    towers = {kind: TextTower(common.text_model(args.device, args.seed)) for kind in ("shallow", "deep")}
    scale = towers["shallow"].model.logit_scale.detach().exp()

    torch.manual_seed(args.seed)
    image_features = F.normalize(torch.randn(BATCH, towers["shallow"].output_dim, device=args.device), dim=-1)
    labels = torch.randint(0, len(names), (BATCH,), device=args.device)
    anchors = torch.randn(1, towers["shallow"].width, device=args.device) * 0.02

    learners, optimizers = {}, {}
    for kind, depth in (("shallow", 0), ("deep", args.depth)):
        torch.manual_seed(args.seed + 1)
        learners[kind] = AnchorOPTPromptLearner(towers[kind], names, anchors, n_soft=4, deep_depth=depth).train()
        optimizers[kind] = sgd(learners[kind].parameters())

    def step(kind: str, share: bool) -> None:
        learner, optimizer = learners[kind], optimizers[kind]
        learner.tower.share_prefix = share
        logits_normal, logits_anchor = learner(image_features, scale)
        loss = functional.anchoropt_loss(logits_normal, logits_anchor, labels, 1.0, args.kd_weight, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    pool = learners["deep"].template.normal.pool_index
    slots_end = learners["deep"].template.normal.slot_start + learners["deep"].template.normal.n_slots
    assert towers["shallow"].can_share_prefix(slots_end, pool), "the shallow learner should share its prefix"
    assert learners["deep"].deep_hooks.can_share_prefix(towers["deep"], slots_end, pool), "so should the deep one"

    times = common.time_interleaved(
        {
            "shallow_shared_prefix": lambda: step("shallow", True),
            "deep_shared_prefix": lambda: step("deep", True),
            "shallow_full_path": lambda: step("shallow", False),
            "deep_hooks": lambda: step("deep", False),
        },
        args.repeats,
        args.device,
    )
    med = {name: common.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}  # least disturbed by other load on a shared machine
    ratio = med["deep_shared_prefix"] / med["shallow_shared_prefix"]
    ratio_hooks = med["deep_hooks"] / med["shallow_full_path"]
    ratio_best = best["deep_shared_prefix"] / best["shallow_shared_prefix"]

    print(
        f"Stage II step, C={len(names)}, batch {BATCH}, ViT-B/16 text tower, {args.device} fp32, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}: deep (depth {args.depth}) "
        f"{med['deep_shared_prefix']:.3f} s | shallow {med['shallow_shared_prefix']:.3f} s | "
        f"ratio deep/shallow {ratio:.3f}x (goal <= 1.1x; of the fastest runs {ratio_best:.3f}x) | hook path: "
        f"deep {med['deep_hooks']:.3f} s vs shallow {med['shallow_full_path']:.3f} s, {ratio_hooks:.3f}x"
    )
    path = common.write_results(
        "bench_deep_step",
        args,
        {
            "n_classes": len(names),
            "batch": BATCH,
            "n_soft": 4,
            "n_anchor": 1,
            "depth": args.depth,
            "run_length": towers["shallow"].run_length(pool),
            "seconds": times,
            "median_seconds": med,
            "min_seconds": best,
            "ratio_deep_over_shallow": ratio,
            "ratio_deep_over_shallow_min": ratio_best,
            "ratio_deep_hooks_over_shallow_full_path": ratio_hooks,
        },
    )
    print(f"wrote {path.relative_to(path.parents[2])}")


if __name__ == "__main__":
    main()
