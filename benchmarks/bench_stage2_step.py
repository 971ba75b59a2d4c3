"""One Stage II AnchorOPT training step vs one plain CoOp step on the same text-tower bridge.

Both steps use the same frozen random ViT-B/16 text tower, the default (truncating) ``TextTower`` and the
same precomputed random image features (batch 32), so the figure isolates the prompt side:

* AnchorOPT: ``normal_features()`` (M = 4 soft tokens + N = 1 frozen anchor through the Gumbel position
  matrix) + cached anchor-prompt features + ``anchoropt_loss`` (CE + KD) + backward + SGD step;
* CoOp (M = 4): prompt ``[SOS] X X X X {class} . [EOT]``, soft tokens only, no anchor, no position matrix,
  plain CE + backward + SGD step.  Built from ``AnchorPromptTemplate``'s normal layout, whose K slots are
  exactly CoOp's K context tokens, and ``encode_slots`` (the same bridge path as AnchorOPT's);
* CoOp (M = 5): the same with 5 context tokens, i.e. a prompt exactly as long as AnchorOPT's (M + N = 5
  slots), to separate the cost of the extra token from the cost of the method.

    python benchmarks/bench_stage2_step.py [--repeats 3] [--classes 100] [--device cpu]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import common
from anchoropt import AnchorOPTPromptLearner, AnchorPromptTemplate, TextTower, functional

BATCH = 32


class CoOpPrompt(nn.Module):
    """CoOp's unified context: ``n_ctx`` soft tokens shared by all classes, ``X .. X {class}.``."""

    def __init__(self, tower: TextTower, names: list[str], n_ctx: int):
        super().__init__()
        # The template requires n_anchor >= 1; its normal layout has n_soft + n_anchor = n_ctx slots, which is
        # the CoOp prompt.  The anchor layout it also builds is never used.
        self.template = AnchorPromptTemplate(tower, names, n_soft=n_ctx - 1, n_anchor=1)
        self.ctx = nn.Parameter(torch.randn(n_ctx, tower.width, device=tower.device) * 0.02)

    def forward(self) -> torch.Tensor:
        features = self.template.encode_slots(self.template.normal, self.ctx)  # the path AnchorOPT uses
        return F.normalize(features.float(), dim=-1)


def sgd(params) -> torch.optim.SGD:
    """The CoOp / AnchorOPT optimizer settings."""
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=0.002, momentum=0.9, weight_decay=5e-4)


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--kd-weight", type=float, default=1.0, help="AnchorOPT KD weight (batchmean KL)")
    args = p.parse_args()
    names = common.classnames(args.classes)
    model = common.text_model(args.device, args.seed)
    tower = TextTower(model)
    scale = model.logit_scale.detach().exp()

    torch.manual_seed(args.seed)
    image_features = F.normalize(torch.randn(BATCH, tower.output_dim, device=args.device), dim=-1)
    labels = torch.randint(0, len(names), (BATCH,), device=args.device)
    anchors = torch.randn(1, tower.width, device=args.device) * 0.02

    learner = AnchorOPTPromptLearner(tower, names, anchors, n_soft=4).train()
    learner_opt = sgd(learner.parameters())
    coop = {n: CoOpPrompt(tower, names, n) for n in (4, 5)}
    coop_opt = {n: sgd(m.parameters()) for n, m in coop.items()}

    def anchoropt_step() -> None:
        logits_normal, logits_anchor = learner(image_features, scale)  # anchor features: computed once, cached
        loss = functional.anchoropt_loss(logits_normal, logits_anchor, labels, 1.0, args.kd_weight, 1.0)
        learner_opt.zero_grad(set_to_none=True)
        loss.backward()
        learner_opt.step()

    def coop_step(n: int) -> None:
        loss = F.cross_entropy(functional.clip_logits(image_features, coop[n](), scale), labels)
        coop_opt[n].zero_grad(set_to_none=True)
        loss.backward()
        coop_opt[n].step()

    times = common.time_interleaved(
        {"anchoropt": anchoropt_step, "coop_m4": lambda: coop_step(4), "coop_m5": lambda: coop_step(5)},
        args.repeats,
        args.device,
    )
    med = {name: common.median(t) for name, t in times.items()}
    lengths = {
        "anchoropt": tower.run_length(learner.template.normal.pool_index),
        "coop_m4": tower.run_length(coop[4].template.normal.pool_index),
        "coop_m5": tower.run_length(coop[5].template.normal.pool_index),
    }
    ratio_m4, ratio_m5 = med["anchoropt"] / med["coop_m4"], med["anchoropt"] / med["coop_m5"]

    head = (
        f"Stage II step, C={len(names)}, batch {BATCH} (cached image features), ViT-B/16 text tower, {args.device} "
        f"fp32, {torch.get_num_threads()} threads, median of {args.repeats}:"
    )
    print(
        f"{head} AnchorOPT (M=4+N=1, L={lengths['anchoropt']}) {med['anchoropt']:.3f} s | "
        f"CoOp (M=4, L={lengths['coop_m4']}) {med['coop_m4']:.3f} s | ratio AnchorOPT/CoOp {ratio_m4:.3f}x"
    )
    print(
        f"same prompt length: CoOp (M=5, L={lengths['coop_m5']}) {med['coop_m5']:.3f} s | "
        f"ratio AnchorOPT/CoOp-M5 {ratio_m5:.3f}x (method overhead without the extra token)"
    )
    path = common.write_results(
        "bench_stage2_step",
        args,
        {
            "n_classes": len(names),
            "batch": BATCH,
            "run_length": lengths,
            "seconds": times,
            "median_seconds": med,
            "ratio_anchoropt_over_coop_m4": ratio_m4,
            "ratio_anchoropt_over_coop_m5": ratio_m5,
        },
    )
    print(f"wrote {path.relative_to(path.parents[2])}")


if __name__ == "__main__":
    main()
