"""One training step per method: anchoropt.methods' CoCoOp / MaPLe / DePT vs the peers' own models on the same tower.

The peers' real code from checkouts (``--peers DIR`` or ``$ANCHOROPT_PEERS_DIR``: ``CoOp``, ``multimodal-prompt-learning``,
``DePT``, loaded as ``tests/test_adapters_real_peers.py`` does: the repo's own ``clip.model.CLIP`` through its
``build_model``, Dassl stubbed).  Random weights with ViT-B/16's text tower (width 512, 12 layers, 8 heads) and a
768-wide, 12-block ViT image tower (patch 16) on 64 x 64 images, fp32, CPU.  A step is forward + loss + backward +
SGD step on the trainable prompts, images in (the image tower runs in both contenders):

* CoCoOp, batch 1 (released): the peer's ``CustomCLIP(image, label)``; ours ``CoCoOp(model).loss(visual(image), label)``
  on the same OpenAI-layout CLIP;
* MaPLe, batch 4, ``PROMPT_DEPTH`` 9, ``n_ctx`` 2 (released): the peer on a MaPLe-built CLIP; ours on an open_clip
  ``CLIP`` holding the same weights;
* DePT (ELP-CoOp), batch 4: the peer's ``CustomCLIP(image, label)``; ours ``DePT(model).loss(...)``.

    ANCHOROPT_PEERS_DIR=... python benchmarks/bench_methods_vs_peers.py [--classes 100] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch

import common

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the real-peer harness and the cfg fake


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--peers", default=os.environ.get("ANCHOROPT_PEERS_DIR"), help="folder with the peer checkouts")
    p.add_argument("--methods", nargs="+", default=["cocoop", "maple", "dept"], choices=["cocoop", "maple", "dept"])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not args.peers:
        raise SystemExit("give --peers DIR (or ANCHOROPT_PEERS_DIR): CoOp / multimodal-prompt-learning / DePT checkouts")
    os.environ["ANCHOROPT_PEERS_DIR"] = args.peers
    import test_adapters_real_peers as harness  # noqa: E402  (reads ANCHOROPT_PEERS_DIR at import)

    names = common.classnames(args.classes)
    results, lines = {}, []
    for method in args.methods:
        repo = {"cocoop": "CoOp", "maple": "multimodal-prompt-learning", "dept": "DePT"}[method]
        with harness.peer_repo(repo):
            peer_step, our_step = _contenders(method, names, args.seed)
            times = common.time_interleaved({"peer": peer_step, "ours": our_step}, args.repeats, args.device)
        medians = {k: common.median(v) for k, v in times.items()}
        ratio = medians["peer"] / medians["ours"]
        results[method] = {"seconds": times, "median_seconds": medians, "speedup": ratio}
        lines.append(f"{method}: peer {medians['peer']:.2f} s | ours {medians['ours']:.2f} s | {ratio:.1f}x")
        print(f"{lines[-1]}  (C={len(names)}, one training step, CPU fp32, {torch.get_num_threads()} thread(s))",
              flush=True)
    path = common.write_results("bench_methods_vs_peers", args, {"n_classes": len(names), "methods": results})
    print(f"wrote {path.relative_to(path.parents[2])}")


_SIZES = dict(embed_dim=512, image_resolution=64, vision_layers=12, vision_width=768, vision_patch_size=16,
              context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)


def _repo_clip(design_details=None):
    model_module = importlib.import_module("clip.model")
    extra = {} if design_details is None else {"design_details": design_details}
    state = model_module.CLIP(**_SIZES, **extra).state_dict()
    built = model_module.build_model(state, **extra) if extra else model_module.build_model(state)
    return built.float().requires_grad_(False)  # fp32, as the trainers' PREC fp32


def _contenders(method: str, names, seed: int):
    import peer_fakes as pf
    from anchoropt.methods import CoCoOp, DePT, MaPLe

    torch.manual_seed(seed)
    tokenize = importlib.import_module("clip.clip").tokenize
    batch = 1 if method == "cocoop" else 4
    images = torch.randn(batch, 3, 64, 64)
    labels = torch.arange(batch) % len(names)
    cfg_size = {"image_size": 64}
    if method == "maple":
        details = {"trainer": "MaPLe", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0, "language_ctx": 0,
                   "maple_length": 2}
        clip_model = _repo_clip(details)
        peer = importlib.import_module("trainers.maple").CustomCLIP(
            pf.make_cfg("maple", n_ctx=2, depth=9, **cfg_size), names, clip_model)
        peer.prompt_learner.proj.float()  # MaPLe's unconditional proj.half() fails in fp32
        ours = MaPLe(_open_clip_copy(clip_model), names, n_ctx=2, prompt_depth=9, tokenizer=tokenize)
        our_loss = lambda: ours.loss(images, labels)  # noqa: E731
    else:
        clip_model = _repo_clip()
        if method == "cocoop":
            peer = importlib.import_module("trainers.cocoop").CustomCLIP(
                pf.make_cfg("cocoop", n_ctx=4, **cfg_size), names, clip_model)
            ours = CoCoOp(clip_model, names, n_ctx=4, tokenizer=tokenize)
        else:
            peer = importlib.import_module("trainers.elp_coop").CustomCLIP(
                pf.make_cfg("dept", n_ctx=4, **cfg_size), names, clip_model)
            ours = DePT(clip_model, names, n_ctx=4, tokenizer=tokenize)
        our_loss = lambda: ours.loss(clip_model.visual(images), labels)  # noqa: E731
    peer.train(), ours.train()
    for name, param in peer.named_parameters():  # the trainers' freezing by name
        param.requires_grad_(any(k in name for k in ("prompt_learner", "linear_probe", "film")))
    peer_opt = torch.optim.SGD([q for q in peer.parameters() if q.requires_grad], lr=0.002, momentum=0.9)
    our_opt = torch.optim.SGD(ours.optimizer_groups(0.002), lr=0.002, momentum=0.9)

    def peer_step():
        peer_opt.zero_grad(set_to_none=True)
        loss = peer(images, labels)
        loss.backward()
        peer_opt.step()

    def our_step():
        our_opt.zero_grad(set_to_none=True)
        loss = our_loss()
        loss.backward()
        our_opt.step()

    return peer_step, our_step


def _open_clip_copy(maple_clip) -> torch.nn.Module:
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=12, width=768, head_width=64, patch_size=16, image_size=64)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)
    model = open_clip.CLIP(512, vision, text, quick_gelu=True).eval()
    model.load_state_dict(maple_clip.state_dict(), strict=False)
    return model.requires_grad_(False)


if __name__ == "__main__":
    main()
