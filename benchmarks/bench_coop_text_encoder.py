"""A CoOp-family ``TextEncoder`` as the peers run it vs the same encoder after ``anchoropt.adapters.accelerate``.

OpenAI-clip-shaped random tower with ViT-B/16's text width (512, 12 layers, 8 heads), sequence-first blocks as
CoOp / CoCoOp / DePT vendor them, fp32 on CPU; CoOp prompts ``[SOS] ctx x M {class} . [EOT]`` (M = 4) for
C classes; forward + backward to the context.  This is what a CoOp-family user gets by adding one line.

    python benchmarks/bench_coop_text_encoder.py [--classes 100] [--repeats 3]
"""

from __future__ import annotations

import torch

import common
from anchoropt import AnchorPromptTemplate, TextTower
from anchoropt.adapters import accelerate
from anchoropt.testing import CoOpStyleTextEncoder, tiny_openai_clip


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    names = common.classnames(args.classes)
    model = tiny_openai_clip(width=512, layers=12, heads=8, embed_dim=512, fp16=False, seed=args.seed)
    model = model.to(args.device).requires_grad_(False)
    # CoOp's prompt: its M context slots are the template's normal-prompt slots (n_soft + n_anchor = 4).
    template = AnchorPromptTemplate(TextTower(model, truncate=False), names, n_soft=3, n_anchor=1)
    tokenized = template.normal.token_ids
    ctx = torch.nn.Parameter(torch.randn(4, 512, device=args.device) * 0.02)
    weights = torch.randn(len(names), 512, device=args.device)
    peers, ours = CoOpStyleTextEncoder(model), CoOpStyleTextEncoder(model)
    handle = accelerate(ours, model)

    def step(encoder) -> torch.Tensor:
        ctx.grad = None
        features = encoder(template.fill(template.normal, ctx), tokenized)
        (features * weights).sum().backward()
        return features.detach()

    times = common.time_interleaved({"peers": lambda: step(peers), "accelerated": lambda: step(ours)},
                                    args.repeats, args.device)
    medians = {k: common.median(v) for k, v in times.items()}
    a, b = step(peers), step(ours)
    diff = float((a - b).abs().max() / a.abs().max())
    ratio = medians["peers"] / medians["accelerated"]
    print(f"CoOp TextEncoder fwd+bwd C={len(names)} OpenAI-layout ViT-B/16 text tower {args.device} fp32: peers "
          f"{medians['peers']:.3f} s | accelerated {medians['accelerated']:.3f} s | {ratio:.1f}x | "
          f"max rel diff {diff:.1e}")
    handle.remove()
    path = common.write_results("bench_coop_text_encoder", args, {
        "n_classes": len(names), "seconds": times, "median_seconds": medians, "speedup": ratio, "max_rel_diff": diff})
    print(f"wrote {path.relative_to(path.parents[2])}")


if __name__ == "__main__":
    main()
