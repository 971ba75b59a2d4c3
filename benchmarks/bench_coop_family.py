"""The CoOp family's own text encoders vs the same after ``anchoropt.adapters.accelerate``: CoOp, DePT, CoCoOp, MaPLe.

Models are the contract fakes of ``tests/peer_fakes.py`` (the peers' ``PromptLearner`` / ``TextEncoder`` /
``CustomCLIP`` code paths, written from their source) on an OpenAI-layout ViT-B/16 text tower (width 512, 12
sequence-first blocks, 8 heads; random weights, fp32), C classes (CIFAR-100's names).  Each figure is one
training pass of the text side, forward + backward, as each trainer runs it:

* ``coop``   - CoOp (N_CTX 4): ``text_encoder(prompt_learner(), tokenized_prompts)``, CE on fixed image features;
* ``dept``   - DePT's ELP-CoOp (CTX_INIT "a photo of a"): the same text pass + FiLM + linear-probe loss;
* ``cocoop`` - CoCoOp (CTX_INIT "a photo of a"), a batch of B images (fixed image features): meta-net, one
  text pass per image (the peer) / all images in one pass (accelerated), CE; also the peak resident memory
  of the pass (``--memory``: each contender in a fresh subprocess);
* ``maple``  - MaPLe (N_CTX 2, "a photo of a", PROMPT_DEPTH 9): ``text_encoder(prompts, tokenized, compound)``;
* ``cocoop_step`` - a whole CoCoOp training step (``model(image, label)``, backward, SGD step) with an
  OpenAI-layout ViT-B/16 image tower at 224 px, the repo's step vs the accelerated one.

Runs at ``--threads`` (default 1: a shared machine) with few repeats (default 2): the peers' passes take seconds
to tens of seconds each here.  Contenders alternate (A B A B) after one warm-up pass each (which doubles as the
exactness check: every trained parameter's gradient, fast vs peer); the median is reported.  Timed by this
process's CPU time by default (``--clock cpu``: on a machine other jobs keep busy, wall time mostly measures
the wait for a core; with one thread CPU time is the pass's own cost), ``--clock wall`` otherwise.

    python benchmarks/bench_coop_family.py [--classes 100] [--repeats 2] [--batch 4] [--memory] [--only coop maple]
    python benchmarks/bench_coop_family.py --only cocoop --batch 4 --memory --no-peers   # ours alone
    python benchmarks/bench_coop_family.py --exactness-only --batch 1   # fp32 gradients vs a float64 reference
"""

from __future__ import annotations

import gc
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import peer_fakes as pf  # noqa: E402  (the contract fakes: the peers' code paths)

from anchoropt.adapters import accelerate  # noqa: E402
from anchoropt.testing import LayerNormFp32, tiny_openai_clip  # noqa: E402

CASES = ("coop", "dept", "cocoop", "maple", "cocoop_step")
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
WIDTH = 512


def text_clip(seed: int, maple: bool = False) -> torch.nn.Module:
    """Frozen fp32 CLIP with ViT-B/16's text tower in the OpenAI layout (MaPLe's list-protocol blocks if asked)."""
    if maple:
        model = pf.tiny_maple_clip("fp32", n_ctx=2, seed=seed, width=WIDTH, layers=12, heads=8, embed_dim=512)
    else:
        model = tiny_openai_clip(width=WIDTH, layers=12, heads=8, embed_dim=512, fp16=False, seed=seed)
    return model.requires_grad_(False)


def with_vit_b16_image_tower(model: torch.nn.Module) -> torch.nn.Module:
    """Replace the fake's toy image tower by a random ViT-B/16 (224 px, width 768, 12 blocks), frozen, fp32."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    visual = _build_vision_tower(512, CLIPVisionCfg(layers=12, width=768, patch_size=16, image_size=224),
                                 quick_gelu=True)
    visual.input_resolution = 224  # what CoOp-family prompt learners assert against cfg.INPUT.SIZE
    model.visual = visual.requires_grad_(False).eval()
    return model


def build(case: str, classes: int, seed: int, dtype: torch.dtype = torch.float32):
    """``(model, clip_model, step)`` for one case; ``step()`` runs forward + backward (+ SGD for the whole step).

    ``dtype=torch.float64``: the same weights and inputs in double precision (the exactness reference)."""
    names = common.classnames(classes)
    method = {"coop": "coop", "dept": "dept", "cocoop": "cocoop", "maple": "maple", "cocoop_step": "cocoop"}[case]
    clip_model = text_clip(seed, maple=method == "maple")
    image_size = 32
    if case == "cocoop_step":
        clip_model, image_size = with_vit_b16_image_tower(clip_model), 224
    cfg = pf.make_cfg(method, n_ctx=2 if method == "maple" else 4, prec="fp32", depth=9, image_size=image_size,
                      ctx_init="" if method == "coop" else "a photo of a")
    torch.manual_seed(seed)
    model, optim, _ = pf.build_model(method, cfg, names, clip_model)
    model.train()
    labels = torch.arange(4) % classes
    image_features = F.normalize(torch.randn(4, 512), dim=-1)
    pl, encoder = model.prompt_learner, model.text_encoder
    if method == "maple":
        pl.proj.float()  # MaPLe's proj.half() (fp32 would fail in proj(ctx); the text pass does not use it)
    if dtype != torch.float32:
        model.to(dtype)
        clip_model.to(dtype)
        model.dtype = encoder.dtype = dtype  # the peers read clip_model.dtype once, at construction
        image_features = image_features.to(dtype)

    def coop_step():
        text = F.normalize(encoder(pl(), model.tokenized_prompts), dim=-1)
        F.cross_entropy(100 * image_features @ text.t(), labels).backward()

    def dept_step():
        text = encoder(pl(), model.tokenized_prompts)
        logits = 100 * image_features @ F.normalize(text, dim=-1).t()
        lp = model.linear_probe_proj(torch.cat([model.film_lp_text(text)[labels], model.film_lp_img(image_features)]))
        w = model.lp_cfg.WEIGHT
        ((1 - w) * F.cross_entropy(logits, labels) + w * F.cross_entropy(lp, torch.cat([labels, labels]))).backward()

    def cocoop_text_step(batch: int):
        feats = image_features[:batch].repeat(-(-batch // 4), 1)[:batch]
        prompts = pl(feats)
        logits = torch.stack([100 * f @ F.normalize(encoder(p, model.tokenized_prompts), dim=-1).t()
                              for p, f in zip(prompts, feats)])
        F.cross_entropy(logits, labels.repeat(-(-batch // 4))[:batch]).backward()

    def maple_step():
        prompts, _, compound, _ = pl()
        text = F.normalize(encoder(prompts, model.tokenized_prompts, compound), dim=-1)
        F.cross_entropy(100 * image_features @ text.t(), labels).backward()

    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(seed))

    def whole_step(batch: int):
        loss = model(images[:batch], labels[:batch])  # CoCoOp returns its CE in training
        optim.zero_grad()
        loss.backward()
        optim.step()

    steps = {"coop": coop_step, "dept": dept_step, "maple": maple_step,
             "cocoop": cocoop_text_step, "cocoop_step": whole_step}
    return model, clip_model, steps[case]


def run_case(case: str, args) -> dict:
    model, clip_model, step = build(case, args.classes, args.seed)
    peers = (lambda: step(args.batch)) if case.startswith("cocoop") else step
    def accelerated():
        with accelerate(model.text_encoder, clip_model):
            peers()

    if args.exactness_only:
        return _exactness_vs_float64(case, args, model, peers, accelerated)
    if args.no_peers:  # the peer's pass does not fit this machine's memory: time ours alone
        times = common.time_interleaved({"accelerated": accelerated}, args.repeats, "cpu", clock=CLOCKS[args.clock])
        return {"seconds": times, "median_seconds": {k: common.median(v) for k, v in times.items()}}
    result = {}
    if case != "cocoop_step":  # the warm-up pass of each contender doubles as the exactness check
        result["rel_grad_diff"] = _exactness(model, peers, accelerated)
    warmup = 0 if case != "cocoop_step" else 1
    times = common.time_interleaved({"peers": peers, "accelerated": accelerated}, args.repeats, "cpu",
                                    warmup=warmup, clock=CLOCKS[args.clock])
    medians = {k: common.median(v) for k, v in times.items()}
    result.update(seconds=times, median_seconds=medians, speedup=medians["peers"] / medians["accelerated"])
    return result


def _exactness(model, peers, accelerated) -> dict[str, float]:
    """``||g_fast - g_peer|| / ||g_peer||`` of every trained parameter after one pass of each contender."""
    want, got = _grads(model, peers), _grads(model, accelerated)
    return {n: float((got[n] - g).norm() / g.norm()) for n, g in want.items()}


def _exactness_vs_float64(case: str, args, model, peers, accelerated) -> dict:
    """Each fp32 contender's gradients against the peer's path run in float64 on the same weights and inputs."""
    ref_model, _, ref_step = build(case, args.classes, args.seed, dtype=torch.float64)
    fp32_layer_norm = LayerNormFp32.forward
    LayerNormFp32.forward = torch.nn.LayerNorm.forward  # OpenAI clip's LayerNorm computes in fp32: not here
    try:
        reference = _grads(ref_model, (lambda: ref_step(args.batch)) if case.startswith("cocoop") else ref_step)
    finally:
        LayerNormFp32.forward = fp32_layer_norm
    result = {}
    for name, fn in (("peers", peers), ("accelerated", accelerated)):
        grads = _grads(model, fn)
        result[name] = {n: float((g.double() - reference[n]).norm() / reference[n].norm()) for n, g in grads.items()}
    return {"rel_error_vs_float64": result}


def _grads(model, fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    fn()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def memory_child(case: str, contender: str, args) -> None:
    """Print the resident memory before and at the peak of one pass (run in a fresh process)."""
    model, clip_model, step = build(case, args.classes, args.seed)
    fast = accelerate(model.text_encoder, clip_model) if contender == "accelerated" else None
    gc.collect()
    before, peak = common.peak_rss_mb(lambda: step(args.batch))
    if fast is not None:
        fast.remove()
    print(f"{before} {peak}")


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=2)
    p.add_argument("--batch", type=int, default=4, help="CoCoOp images per batch (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    p.add_argument("--only", nargs="+", choices=CASES, default=list(CASES), help="cases to run")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="cpu",
                   help="cpu: this process's CPU time (default; robust on a machine other jobs keep busy); wall")
    p.add_argument("--memory", action="store_true", help="peak RSS of CoCoOp's pass, each contender in a subprocess")
    p.add_argument("--no-peers", action="store_true",
                   help="time and measure only the accelerated contender (where the peer's pass needs more memory "
                        "than the machine has)")
    p.add_argument("--exactness-only", action="store_true",
                   help="no timing: each fp32 contender's gradients vs the peer's path in float64 (same weights)")
    p.add_argument("--memory-child", nargs=2, default=None, help=common.hidden_help())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args)
        return
    results = {"threads": args.threads, "clock": args.clock, "cases": {}}
    for case in args.only:
        result = run_case(case, args)
        results["cases"][case] = result
        if args.exactness_only:
            worst = {k: max(v.items(), key=lambda item: item[1]) for k, v in result["rel_error_vs_float64"].items()}
            print(f"{case:>11} C={args.classes} gradients vs float64: " + " | ".join(
                f"{k} max {e:.1e} ({n})" for k, (n, e) in worst.items()), flush=True)
            continue
        m = result["median_seconds"]
        if args.no_peers:
            print(f"{case:>11} C={args.classes} B={args.batch}, {args.threads} thread(s), {args.clock} time: "
                  f"accelerated {m['accelerated']:.3f} s (peers not run)", flush=True)
            continue
        diffs = result.get("rel_grad_diff", {})
        worst = max(diffs, key=diffs.get) if diffs else None
        extra = f" | max rel grad diff {diffs[worst]:.1e} ({worst})" if worst else ""
        batch = f" B={args.batch}" if case.startswith("cocoop") else ""
        print(f"{case:>11} C={args.classes}{batch} fwd+bwd, {args.threads} thread(s), {args.clock} time: "
              f"peers {m['peers']:.2f} s | "
              f"accelerated {m['accelerated']:.3f} s | {result['speedup']:.1f}x{extra}", flush=True)
    if args.memory:
        memory = {}
        for contender in ("accelerated",) if args.no_peers else ("peers", "accelerated"):
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", "cocoop", contender, "--classes", str(args.classes),
                 "--batch", str(args.batch), "--threads", str(args.threads), "--seed", str(args.seed)],
                capture_output=True, text=True, check=True,
            ).stdout.split()
            before, peak = float(out[-2]), float(out[-1])
            memory[contender] = {"before_pass_mb": before, "peak_mb": peak, "pass_mb": peak - before}
        results["cocoop_peak_rss"] = memory
        ours = f"accelerated +{memory['accelerated']['pass_mb']:.0f} MB"
        if "peers" in memory:
            memory["ratio"] = memory["peers"]["pass_mb"] / max(memory["accelerated"]["pass_mb"], 1e-9)
            ours = f"peers +{memory['peers']['pass_mb']:.0f} MB | {ours} | {memory['ratio']:.1f}x lower"
        print(f"CoCoOp B={args.batch} C={args.classes} peak memory of the pass: {ours}")
    tag = "_exactness" if args.exactness_only else "_accelerated_only" if args.no_peers else ""
    name = f"bench_coop_family{tag}_b{args.batch}_c{args.classes}"
    path = common.write_results(name, args, results)
    print(f"wrote {path.relative_to(path.parents[2])}")


if __name__ == "__main__":
    main()
