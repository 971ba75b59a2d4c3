"""The ``anchoropt`` commands: argument parsing and one function per sub-command.

Commands::

    anchoropt learn-anchors  Stage I: anchors from a {class: [sentences]} descriptions JSON
    anchoropt train          (Stage I +) Stage II few-shot training + evaluation under a protocol
    anchoropt eval           evaluate a finished run again (other targets, another protocol)
    anchoropt plot           position-matrix heatmap and the anchors' nearest tokens of a run (PNG)
    anchoropt presets        the per-dataset settings of the released tables
    anchoropt demo           the whole method end to end on an offline tiny model (see anchoropt.runner.demo)

Run ``anchoropt COMMAND --help`` for the options.  Multi-GPU: ``torchrun --nproc_per_node 4 -m anchoropt
train ...``.  The console script (:mod:`anchoropt.runner.cli`) calls :func:`main`; the logic lives in the other
modules of :mod:`anchoropt.runner`; this module only parses arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from .. import _files

__all__ = ["main", "build_parser"]

_HYPER = (
    # flag, dest, type, help
    ("--shots", "shots", int, "training images per class, K (16)"),
    ("--n-soft", "n_soft", int, "M, soft tokens of the normal prompt (4)"),
    ("--tau", "tau", float, "Gumbel-softmax temperature of the position matrix (1.0)"),
    ("--epochs", "epochs", int, "Stage II epochs (100)"),
    ("--batch-size", "batch_size", int, "Stage II batch size (32)"),
    ("--lr", "lr", float, "Stage II SGD learning rate (0.002)"),
    ("--momentum", "momentum", float, "SGD momentum (0.9)"),
    ("--weight-decay", "weight_decay", float, "SGD weight decay (5e-4)"),
    ("--warmup-epochs", "warmup_epochs", int, "epochs at the constant warm-up lr before the cosine (1)"),
    ("--warmup-lr", "warmup_lr", float, "warm-up learning rate (1e-5)"),
    ("--ce-weight", "ce_weight", float, "weight of the cross-entropy term (1.0)"),
    ("--kd-weight", "kd_weight", float, "weight of the KL(ensemble || normal) term (10.0)"),
    ("--kd-temperature", "kd_temperature", float, "distillation temperature (1.0)"),
    ("--kd-normalization", "kd_normalization", str,
     "'batchmean' (KL per sample) or 'released' (KL / (batch x classes), what the released weights assume)"),
    ("--stage1-steps", "stage1_steps", int,
     "Stage I steps (default: the released schedule, preset epochs x floor(shots x classes / 32))"),
    ("--stage1-mse-weight", "stage1_mse_weight", float, "Stage I MSE weight (1000)"),
    ("--stage1-lr", "stage1_lr", float, "Stage I SGD learning rate (0.002)"),
    ("--max-descriptions", "max_descriptions", int, "descriptions kept per class, first in file order (10)"),
)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="ViT-B-16",
                   help="open_clip model name (ViT-B-16, EVA02-B-16, ViT-B-16-SigLIP, ...), a .json open_clip model "
                        "config, toy-clip (the toy world's pretrained CLIP, shipped; see docs/toyworld.md), "
                        "or tiny-test / tiny-eva-test / tiny-siglip-test (random tiny towers for tests)")
    g.add_argument("--pretrained", default="openai",
                   help="open_clip pretrained tag (downloaded on first use: needs a network, else it fails at once "
                        "saying so), a local checkpoint file, or 'none' for random weights (default: openai)")
    g.add_argument("--precision", default="fp32", help="open_clip precision: fp32 (default), fp16, bf16, amp ...")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required,
                   help="dataset directory: ImageFolder (root/<class>/*.jpg), root with train/ and test/ "
                        "ImageFolders, or a CoOp dataset folder with its split_zhou_*.json")
    g.add_argument("--split-json", help="CoOp split file (default: the split_zhou_*.json inside --data, if any)")
    g.add_argument("--image-root", help="directory the split file's paths are relative to (default: guessed)")
    g.add_argument("--classnames-file", help="lines '<folder> <class name>' (default: --data/classnames.txt if any)")
    g.add_argument("--p-train", type=float, default=0.5, help="plain ImageFolder: train fraction per class (0.5)")
    g.add_argument("--p-val", type=float, default=0.2, help="plain ImageFolder: validation fraction per class (0.2)")
    g.add_argument("--split-seed", type=int, default=1, help="plain ImageFolder: seed of the per-class split (1)")


def _add_common_args(p: argparse.ArgumentParser, grid: bool = False) -> None:
    p.add_argument("--preset", help="per-dataset settings of the released tables (see `anchoropt presets`); "
                                    "explicit options override it")
    if grid:
        p.add_argument("--output", "-o", help="the grid's directory (runs/, results.json, table.md, hm.png)")
    else:
        p.add_argument("--seed", type=int, default=1, help="seed for the shots, initialisation and shuffling (1)")
        p.add_argument("--output", "-o", default="runs/anchoropt", help="run directory (runs/anchoropt)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (0)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress reports (a tqdm bar on a terminal, a plain line every 10%% elsewhere)")
    _add_threads_arg(p)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's own, one per core); on a machine shared with other "
                        "busy processes --threads 1 avoids oversubscribing the cores")


def build_parser() -> argparse.ArgumentParser:
    """The ``anchoropt`` argument parser (for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="anchoropt", description="AnchorOPT experiment runner: anchors, few-shot prompts, evaluation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  anchoropt train --data DATA/caltech-101 --descriptions caltech101.json --preset caltech101 "
               "-o runs/cal\n"
               "  anchoropt eval runs/cal\n"
               "  torchrun --nproc_per_node 2 -m anchoropt train ...",
    )
    from .._version import __version__

    parser.add_argument("--version", action="version", version=f"anchoropt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("learn-anchors", help="Stage I: learn anchors from class descriptions",
                       description="Stage I: learn the anchor tokens from a {class: [sentences]} JSON "
                                   "(CuPL format) for the base (or all) classes of --data, or of the JSON.")
    p.add_argument("--descriptions", required=True, help="descriptions JSON {class name: [sentence, ...]}")
    p.add_argument("--subsample", choices=("base", "all"), default="base",
                   help="learn on the base half of the classes (base-to-novel) or on all (default: base)")
    p.add_argument("--n-anchor", type=int, default=None, help="N, anchor tokens (1)")
    _add_model_args(p)
    _add_data_args(p, required=False)
    _add_common_args(p)
    _add_hyper_args(p, stage1_only=True)
    _add_released_args(p, stage1_only=True)

    p = sub.add_parser("train", help="Stage II few-shot training (after Stage I) and evaluation",
                       description="Train AnchorOPT's soft tokens and position matrix on K shots per class and "
                                   "evaluate under a protocol. Writes run_config.json, anchors.safetensors, "
                                   "prompt_learner/, results.json and plots/ to --output.")
    p.add_argument("--protocol", choices=("base2novel", "cross-dataset", "domain-generalization"),
                   default="base2novel", help="evaluation protocol (default: base2novel)")
    p.add_argument("--target", dest="targets", action="append", default=[], metavar="DIR",
                   help="a target dataset directory for cross-dataset / domain generalisation (repeatable)")
    _add_train_options(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output (a finished or interrupted one); refused otherwise")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --output from its last complete checkpoint "
                        "(same options as it was started with)")
    _add_model_args(p)
    _add_data_args(p)
    _add_common_args(p)
    _add_hyper_args(p)

    p = sub.add_parser("grid", help="methods x datasets x seeds under one protocol: tables with mean ± std",
                       description="Run every method x dataset x seed (anchoropt train for each; finished runs are "
                                   "skipped), then write OUT/results.json, OUT/table.md and OUT/hm.png. "
                                   "`anchoropt grid --report OUT` only merges the finished runs into the report. "
                                   "Docs: grid.md.")
    p.add_argument("--report", metavar="OUT", help="only (re)write the report of the grid in OUT")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="method specs, e.g. zeroshot coop coop+atprompt coop+anchoropt coop+anchoropt:pooling=released")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="seeds (1 2 3)")
    p.add_argument("--jobs", type=_positive_int, default=1, help="runs at once, in local processes (1)")
    p.add_argument("--shard", metavar="I/N", help="run only shard I of N (I from 0) of the fixed run order")
    p.add_argument("--protocol", choices=("base2novel", "cross-dataset", "domain-generalization"),
                   default="base2novel", help="evaluation protocol (default: base2novel)")
    p.add_argument("--target", dest="targets", action="extend", nargs="+", default=[], metavar="DIR",
                   help="target dataset(s) for cross-dataset / domain generalisation (every --data is a source)")
    _add_train_options(p, grid=True)
    _add_model_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", metavar="DIR", help="dataset directories (each as `anchoropt train --data`)")
    g.add_argument("--p-train", type=float, default=0.5, help="plain ImageFolder: train fraction per class (0.5)")
    g.add_argument("--p-val", type=float, default=0.2, help="plain ImageFolder: validation fraction per class (0.2)")
    g.add_argument("--split-seed", type=int, default=1, help="plain ImageFolder: seed of the per-class split (1)")
    _add_common_args(p, grid=True)
    _add_hyper_args(p)

    p = sub.add_parser("eval", help="evaluate a finished run (again, or on other targets)",
                       description="Rebuild a run's model and splits from its run_config.json, reload the "
                                   "learned prompts and evaluate; options given here override the run's.")
    p.add_argument("run", help="run directory written by `anchoropt train`")
    p.add_argument("--protocol", choices=("base2novel", "cross-dataset", "domain-generalization"))
    p.add_argument("--target", dest="targets", action="append", default=None, metavar="DIR",
                   help="target dataset directory (repeatable; replaces the run's targets)")
    p.add_argument("--data", help="source dataset directory (default: the run's)")
    p.add_argument("--pretrained", help="model weights (default: the run's)")
    p.add_argument("--eval-mode", choices=("auto", "base", "novel", "anchor"))
    p.add_argument("--device", default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--output", "-o", help="results file (default: RUN/eval_results.json)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    _add_threads_arg(p)

    p = sub.add_parser("plot", help="position-matrix heatmap and nearest tokens of a run (PNG)",
                       description="Write position_matrix.png, anchor_tokens.png and anchor_tokens.json "
                                   "(needs matplotlib: pip install matplotlib).")
    p.add_argument("run", help="run directory written by `anchoropt train`")
    p.add_argument("--output", "-o", help="output directory (default: RUN/plots)")
    p.add_argument("--k", type=int, default=10, help="nearest tokens per anchor (10)")
    p.add_argument("--pretrained", help="model weights (default: the run's)")
    _add_threads_arg(p)

    from ..toyworld.cli import add_parser as add_toyworld_parser

    add_toyworld_parser(sub)

    p = sub.add_parser("presets", help="show the per-dataset settings of the released tables")
    p.add_argument("name", nargs="?", help="a dataset (all when omitted)")
    p.add_argument("--method", choices=("coop", "cocoop", "maple", "dept"), default="coop")

    from . import demo

    p = sub.add_parser("demo", help="the whole method end to end, offline (Stage I, Stage II, base / novel / HM)",
                       description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(p)
    return parser


def _add_train_options(p: argparse.ArgumentParser, grid: bool = False) -> None:
    """The options ``train`` and ``grid`` share (besides data, model, hyperparameters)."""
    g = p.add_argument_group("method (anchoropt.methods.registry; docs: grid.md)")
    if not grid:
        g.add_argument("--method", default=None,
                       help="zeroshot, coop, coop+atprompt, coop+anchoropt (default), coop+atprompt+anchoropt; "
                            "options after a colon, e.g. coop+anchoropt:pooling=released, coop:csc=true")
    g.add_argument("--attributes", nargs="+", default=None, metavar="WORD",
                   help="ATPrompt attribute words (default: the --preset dataset's, e.g. playfulness energy for pets)")
    g.add_argument("--n-attr-soft", type=int, default=None, help="soft tokens before each attribute (default: M)")
    g.add_argument("--template", dest="templates", action="append", default=None, metavar="TEXT",
                   help="zero-shot template with {} for the class (repeatable: an ensemble; default: the preset's "
                        "or 'a photo of a {}.')")
    _add_released_args(p)
    anchors = p.add_mutually_exclusive_group()
    anchors.add_argument("--descriptions", help="descriptions JSON: run Stage I first on the training classes "
                                                "(AnchorOPT methods)")
    anchors.add_argument("--anchors", help="Stage I anchors: our .safetensors or the authors' model.pth.tar")
    p.add_argument("--n-anchor", type=int, default=None, help="N, anchor tokens for Stage I (1)")
    p.add_argument("--deep-depth", type=int, default=0,
                   help="deep variant: per-layer soft prompts for the first N text blocks after the input, anchors "
                        "carried through (0: shallow, the default)")
    _add_pae_args(p)
    p.add_argument("--augment", choices=("rrc_flip", "none"), default="rrc_flip",
                   help="training augmentation: random resized crop + flip (default) or none")
    p.add_argument("--cache-image-features", action="store_true",
                   help="encode the training images once, before training (with --augment none, or --cache-views)")
    p.add_argument("--cache-views", type=int, default=None,
                   help="with --cache-image-features and an augmentation: K augmented views per image drawn once; "
                        "each step uses one at random")
    p.add_argument("--eval-mode", choices=("auto", "base", "novel", "anchor"), default="auto",
                   help="headline accuracy: auto (normal prompt for trained classes, ensemble for unseen ones), "
                        "base (normal), novel (ensemble), anchor (anchor prompt only)")
    p.add_argument("--eval-batch-size", type=int, default=100, help="evaluation batch size (100)")
    p.add_argument("--save-every", type=int, default=0, help="also save the learner every N epochs")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="do not write plots/*.png")


def _add_released_args(p: argparse.ArgumentParser, stage1_only: bool = False) -> None:
    r = p.add_argument_group("released behaviour (defaults stay paper-correct; docs: howto/reproduce.md)")
    if not stage1_only:
        r.add_argument("--pooling", choices=("eot", "released"), default=None,
                       help="normal prompt read at the true EOT (default) or at EOT - N as the released code does")
    r.add_argument("--stage1-schedule", choices=("cosine", "released"), default=None,
                   help="Stage I lr: cosine per step (default) or Dassl's (warm-up epoch at 1e-5, cosine per epoch)")
    r.add_argument("--description-selection", choices=("usable", "released"), default=None,
                   help="Stage I sentences: the first N with a letter (default) or the first N raw entries")
    if not stage1_only:
        r.add_argument("--drop-last", action=argparse.BooleanOptionalAction, default=None,
                       help="Stage II drops the last partial batch of an epoch, as Dassl's training loader (default: "
                            "off; on with --preset)")


def _add_pae_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("PAE (Koopman-Lyapunov regulariser of the deep prompts; docs: pae.md)")
    g.add_argument("--pae", action="store_true", help="add PAE's Koopman + Lyapunov terms (needs --deep-depth >= 2)")
    g.add_argument("--pae-alpha", type=float, default=None, help="weight of the Koopman term (0.5)")
    g.add_argument("--pae-beta", type=float, default=None, help="weight of the Lyapunov term (0.2)")
    g.add_argument("--pae-dim", type=int, default=None, help="lifted (Koopman) width (256)")
    g.add_argument("--pae-mode", choices=("global", "layerwise"), default=None,
                   help="one shared Koopman operator (global, default) or one per layer pair")
    g.add_argument("--pae-energy", choices=("shared", "per_pair"), default=None,
                   help="one Lyapunov factor L for every layer pair (shared, default) or one per pair (per_pair: "
                        "the release's layerwise mode, with --pae-mode layerwise)")
    g.add_argument("--pae-reading", choices=("released", "paper"), default=None,
                   help="the released code's terms (default) or the paper's formulas")
    g.add_argument("--pae-decay", action="store_true", default=None,
                   help="weight-decay PAE's U, K, L like the prompts (the released SGD path; default: no decay)")


def _add_hyper_args(p: argparse.ArgumentParser, stage1_only: bool = False) -> None:
    g = p.add_argument_group("hyperparameters (default: --preset, else the value in brackets)")
    for flag, dest, kind, text in _HYPER:
        if stage1_only and not (dest.startswith("stage1") or dest in ("max_descriptions", "shots")):
            continue
        g.add_argument(flag, dest=dest, type=kind, default=None, help=text)


def _config(args: argparse.Namespace):
    from .config import RunConfig

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return RunConfig(**values)


def _cmd_learn_anchors(args) -> int:
    from .run import run_learn_anchors

    run_learn_anchors(_config(args), subsample=args.subsample)
    return 0


def _cmd_train(args) -> int:
    from .run import run_training

    run_training(_config(args), overwrite=args.overwrite, resume=args.resume)
    return 0


def _cmd_grid(args) -> int:
    from .grid import report_grid, run_grid

    if args.report:
        report_grid(args.report)
        return 0
    missing = [flag for flag, value in (("--methods", args.methods), ("--data", args.data),
                                        ("--output", args.output)) if not value]
    if missing:
        raise ValueError(f"anchoropt grid needs {', '.join(missing)} (or --report OUT to only write the report)")
    base = _config(argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("data", "output", "seeds")}))
    done = run_grid(base, args.methods, args.data, args.seeds, args.output, jobs=args.jobs, shard=args.shard,
                    threads=getattr(args, "threads", None))
    print(f"grid: {len(done['ran'])} run(s) done, {len(done['skipped'])} already finished", flush=True)
    return 0


def _cmd_eval(args) -> int:
    from .run import run_evaluation

    overrides = {k: getattr(args, k) for k in ("protocol", "targets", "data", "pretrained", "eval_mode", "device",
                                                "workers", "progress") if getattr(args, k) is not None}
    run_evaluation(args.run, overrides, output=args.output)
    return 0


def _cmd_plot(args) -> int:
    from .. import viz
    from ..io import read_config
    from ..prompts import load_prompt_learner
    from .config import load_run_config
    from .models import build_model
    from .reports import random_weights

    viz.check_matplotlib()  # before the model is built
    run = Path(args.run)
    cfg = load_run_config(run)
    pretrained = args.pretrained or cfg.pretrained
    bundle = build_model(cfg.model, pretrained, "cpu", "fp32", "none")
    saved = read_config(run / "prompt_learner", "prompt_learner")
    learner = load_prompt_learner(run / "prompt_learner", bundle.model, saved["trained_classnames"],
                                  tokenizer=bundle.tokenizer)
    out = Path(args.output) if args.output else run / "plots"
    note = "\nRANDOM WEIGHTS: this picture means nothing" if random_weights(pretrained, bundle) else ""
    heatmap = viz.save_position_matrix(learner, out / "position_matrix.png", title="AnchorOPT position matrix" + note)
    neighbours = viz.nearest_tokens(learner.anchors, bundle.model, bundle.tokenizer, k=args.k)
    _files.write_json(out / "anchor_tokens.json", neighbours)
    bars = viz.save_nearest_tokens(neighbours, out / "anchor_tokens.png",
                                   title="nearest vocabulary tokens of the learned anchors" + note)
    for item in neighbours:
        words = ", ".join(f"{t['token']!r} {t['cosine']:.2f}" for t in item["tokens"][:5])
        print(f"anchor {item['anchor']} (norm {item['norm']:.2f}): {words}")
    print(f"wrote {heatmap}, {bars}, {out / 'anchor_tokens.json'}")
    return 0


def _cmd_presets(args) -> int:
    from ..methods.presets import DATASETS, preset

    names = [args.name] if args.name else ["default", "xd", *DATASETS]
    if args.name:
        preset(args.name, args.method)  # an unknown name: the error goes to stderr, exit status 2
    print(f"{'preset':<15}{'n_soft':>7}{'epochs':>7}{'ce':>8}{'kd':>8}{'kd_T':>6}{'batch':>6}{'lr':>8}"
          f"{'stage1 ep':>10}{'mse':>7}")
    for name in names:
        try:
            p = preset(name, args.method)
        except (KeyError, ValueError) as err:
            print(f"{name:<15}{err}")
            continue
        print(f"{p.name:<15}{p.n_soft:>7}{p.epochs:>7}{p.ce_weight:>8g}{p.kd_weight:>8g}{p.kd_temperature:>6g}"
              f"{p.batch_size:>6}{p.lr:>8g}{p.stage1_epochs:>10}{p.stage1_mse_weight:>7g}"
              + (f"  {p.extra}" if p.extra else ""))
    print("KD normalisation of the presets: 'released' (KL summed / (batch x classes)).")
    return 0


def _cmd_demo(args) -> int:
    from . import demo

    return demo.run(args)


_COMMANDS = {"learn-anchors": _cmd_learn_anchors, "train": _cmd_train, "grid": _cmd_grid, "eval": _cmd_eval,
             "plot": _cmd_plot, "presets": _cmd_presets, "demo": _cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``anchoropt`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "toyworld":
        from ..toyworld.cli import run as run_toyworld

        return run_toyworld(args)
    try:
        return _COMMANDS[args.command](args)
    except ImportError as err:  # an optional dependency (matplotlib): its one-line install hint
        print(f"anchoropt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError, KeyError,
            FloatingPointError) as err:
        # user errors (missing files, bad options, unknown classes, a diverging run): one clear line, no traceback
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"anchoropt {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only output, a file in the way: the path and the fix
        where = getattr(args, "output", None) or getattr(args, "report", None)
        print(f"anchoropt {args.command}: error: {_files.describe_os_error(err, where)}", file=sys.stderr)
        return 2

