"""Text pass at full context length (77) vs truncated to the batch's last EOT (the default bridge).

One Stage II text pass: ``AnchorOPTPromptLearner.normal_features()`` for all C classes, then backward to the
soft tokens and the position logits.  Both learners hold the same soft tokens, anchors, position logits and
Gumbel noise, so the difference of their features (and gradients) measures the exactness of truncation.

    python benchmarks/bench_text_truncation.py [--repeats 3] [--classes 100] [--device cpu]
"""

from __future__ import annotations

import torch

import common
from anchoropt import AnchorOPTPromptLearner, TextTower, functional


def make_learner(model, names, truncate: bool, seed: int) -> AnchorOPTPromptLearner:
    """A Stage II learner (M = 4 soft tokens, N = 1 random anchor) on a full or truncating bridge."""
    torch.manual_seed(seed)
    tower = TextTower(model, truncate=truncate, share_prefix=False)  # isolate truncation (see bench_text_paths.py)
    anchors = torch.randn(1, tower.width, device=tower.device) * 0.02
    return AnchorOPTPromptLearner(tower, names, anchors, n_soft=4).train()


def text_step(learner: AnchorOPTPromptLearner, noise: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Forward + backward of the normal prompt's features (fixed Gumbel noise); returns the features."""
    learner.zero_grad(set_to_none=True)
    matrix = functional.gumbel_softmax_st(learner.position.logits, noise, learner.position.tau)
    features = learner.normal_features(matrix)
    (features * weights).sum().backward()
    return features.detach()


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` (features are unit vectors, so this is also the max absolute error)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    names = common.classnames(args.classes)
    model = common.text_model(args.device, args.seed)
    full = make_learner(model, names, truncate=False, seed=args.seed)
    truncated = make_learner(model, names, truncate=True, seed=args.seed)
    truncated.load_state_dict(full.state_dict())  # identical soft tokens, anchors and position logits

    generator = torch.Generator().manual_seed(args.seed)
    k = full.position.size
    noise = -torch.empty(k, k).exponential_(generator=generator).log().to(args.device)  # Gumbel(0, 1)
    weights = torch.randn(len(names), full.tower.output_dim, generator=generator).to(args.device)

    times = common.time_interleaved(
        {"full": lambda: text_step(full, noise, weights), "truncated": lambda: text_step(truncated, noise, weights)},
        args.repeats,
        args.device,
    )
    feats_full, feats_trunc = text_step(full, noise, weights), text_step(truncated, noise, weights)
    feature_diff = max_relative_difference(feats_trunc, feats_full)
    grad_diff = max(
        max_relative_difference(truncated.soft.grad, full.soft.grad),
        max_relative_difference(truncated.position.logits.grad, full.position.logits.grad),
    )
    lengths = {
        "full": full.template.normal.token_ids.shape[1],
        "truncated": truncated.tower.run_length(truncated.template.normal.pool_index),
    }
    t_full, t_trunc = common.median(times["full"]), common.median(times["truncated"])
    ratio = t_full / t_trunc

    print(
        f"text fwd+bwd, C={len(names)}, ViT-B/16 text tower, M=4 N=1, {args.device} fp32, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}: "
        f"full L={lengths['full']} {t_full:.3f} s | truncated L={lengths['truncated']} {t_trunc:.3f} s | "
        f"ratio full/truncated {ratio:.2f}x"
    )
    print(f"exactness: max relative difference of features {feature_diff:.2e}, of gradients {grad_diff:.2e}")
    path = common.write_results(
        "bench_text_truncation",
        args,
        {
            "n_classes": len(names),
            "sequence_length": lengths,
            "seconds": times,
            "median_seconds": {"full": t_full, "truncated": t_trunc},
            "ratio_full_over_truncated": ratio,
            "max_rel_diff_features": feature_diff,
            "max_rel_diff_gradients": grad_diff,
        },
    )
    print(f"wrote {path.relative_to(path.parents[2])}")


if __name__ == "__main__":
    main()
