"""The ``anchoropt`` commands: argument parsing and one function per sub-command.

Commands::

    anchoropt learn-anchors  Stage I: anchors from a {class: [sentences]} descriptions JSON
    anchoropt train          (Stage I +) Stage II few-shot training + evaluation under a protocol
    anchoropt eval           evaluate a finished run again (other targets, another protocol)
    anchoropt plot           position-matrix heatmap and the anchors' nearest tokens of a run (PNG)
    anchoropt presets        the per-dataset settings of the released tables
    anchoropt datasets check what the runner reads from dataset folders (layout, classes, shots, preset)
    anchoropt demo           the whole method end to end on an offline tiny model (see anchoropt.runner.demo)

Run ``anchoropt COMMAND --help`` for the options.  Multi-GPU: ``torchrun --nproc_per_node 4 -m anchoropt
train ...``.  The console script (:mod:`anchoropt.runner.cli`) calls :func:`main`; the logic lives in the other
modules of :mod:`anchoropt.runner`; this module only parses arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Sequence

from .. import _files

__all__ = ["main", "build_parser"]

_HYPER = (
    # flag, dest, type, help
    ("--shots", "shots", int, "training images per class, K (16)"),
    ("--n-soft", "n_soft", int, "M, soft tokens of the normal prompt (4; CoOp 16)"),
    ("--tau", "tau", float, "Gumbel-softmax temperature of the position matrix (1.0)"),
    ("--epochs", "epochs", int, "Stage II epochs (100; CoOp 200)"),
    ("--batch-size", "batch_size", int, "Stage II batch size (32)"),
    ("--lr", "lr", float, "Stage II SGD learning rate (0.002)"),
    ("--momentum", "momentum", float, "SGD momentum (0.9)"),
    ("--weight-decay", "weight_decay", float, "SGD weight decay (5e-4)"),
    ("--warmup-epochs", "warmup_epochs", int, "epochs at the constant warm-up lr before the cosine (1)"),
    ("--warmup-lr", "warmup_lr", float, "warm-up learning rate (1e-5)"),
    ("--ce-weight", "ce_weight", float, "weight of the cross-entropy term (100.0)"),
    ("--kd-weight", "kd_weight", float, "weight of the KL(ensemble || normal) term (1000.0)"),
    ("--kd-temperature", "kd_temperature", float, "distillation temperature (1.0)"),
    ("--kd-normalization", "kd_normalization", str,
     "'released' (KL / (batch x classes), what the released weights assume) or 'batchmean' (KL per sample)"),
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
                   help="dataset directory: any layout of CoOp's DATASETS.md (split_zhou_*.json, ImageNet, "
                        "FGVCAircraft, ImageNet-V2 / -Sketch / -A / -R), root with train/ and test/ ImageFolders, or "
                        "an ImageFolder (root/<class>/*.jpg); see `anchoropt datasets check`")
    g.add_argument("--split-json", help="CoOp split file (default: the split_zhou_*.json inside --data, if any)")
    g.add_argument("--image-root", help="directory the split file's paths are relative to (default: guessed)")
    g.add_argument("--classnames-file", help="lines '<folder> <class name>' (default: --data/classnames.txt if any)")
    g.add_argument("--p-train", type=float, default=0.5, help="plain ImageFolder: train fraction per class (0.5)")
    g.add_argument("--p-val", type=float, default=0.2, help="plain ImageFolder: validation fraction per class (0.2)")
    g.add_argument("--split-seed", type=int, default=1, help="plain ImageFolder: seed of the per-class split (1)")
    _add_shots_from_arg(g)


def _add_shots_from_arg(g) -> None:
    g.add_argument("--shots-from", choices=("sample", "dassl"), default=None,
                   help="K shots drawn here with --seed (sample, default) or the images Dassl drew for the seed, "
                        "read from DATA/split_fewshot/shot_K-seed_S.pkl (dassl)")


def _add_common_args(p: argparse.ArgumentParser, grid: bool = False) -> None:
    p.add_argument("--preset", help="per-dataset settings of the released tables (see `anchoropt presets`); "
                                    "explicit options override it" + ("; default: each dataset's own, recognised "
                                                                      "from its folder" if grid else ""))
    p.add_argument("--recipe", default=None,  # checked by RunConfig (anchoropt.methods.recipes.RECIPES)
                   help="what fills the hyperparameters neither an option nor --preset sets: 'released' (default: "
                        "each method's released recipe, e.g. CoOp M 16 / 200 epochs, CoOp+AnchorOPT CE 100 + KD "
                        "1000 released normalisation), 'paper-text' (the same with the paper text's loss, CE 1 + "
                        "KD 10 per sample) or 'legacy' (CE 1 + KD 10 per sample, M 4, 100 epochs for every method); "
                        "docs/runner.md, 'Defaults'")
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
    p.add_argument("--config", metavar="RUN/run_config.json",
                   help="re-run a run from its saved run_config.json (or its run directory): every setting from the "
                        "file, the options typed here override it (give a new --output)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output (a finished or interrupted one); refused otherwise")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --output from its last complete checkpoint "
                        "(same options as it was started with)")
    _add_model_args(p)
    _add_data_args(p, required=False)  # required unless --config gives it (checked in _cmd_train)
    _add_common_args(p)
    _add_hyper_args(p)

    p = sub.add_parser("grid", help="methods x datasets x seeds under one protocol: tables with mean ± std",
                       description="Run every method x dataset x seed (anchoropt train for each; finished runs are "
                                   "skipped), then write OUT/results.json, OUT/table.md, OUT/table.csv, "
                                   "OUT/table.tex (booktabs) and OUT/hm.png. "
                                   "`anchoropt grid --report OUT` only merges the finished runs into the report. "
                                   "Docs: grid.md.")
    p.add_argument("--report", metavar="OUT", help="only (re)write the report of the grid in OUT")
    p.add_argument("--config", metavar="GRID/grid.json",
                   help="re-run a grid from its grid.json (or its directory): methods, datasets, seeds and every "
                        "setting from the file, the options typed here override them (default --output: that grid)")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="method specs, e.g. zeroshot coop coop+atprompt coop+anchoropt coop+anchoropt:pooling=released")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="seeds (1 2 3)")
    p.add_argument("--paper", action="store_true",
                   help="put the paper's published base / novel / HM (arXiv 2511.21188, Table 1) and the difference "
                        "beside each row of table.csv / table.tex that the paper has")
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
    _add_shots_from_arg(g)
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
    p.add_argument("--sampled-positions", action="store_true",
                   help="AnchorOPT runs: draw the position matrix (Gumbel-max) for every evaluation batch, as the "
                        "released code's test does, instead of its row-wise argmax")
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

    add_toyworld_parser(sub, suite_baselines=_suite_baselines, suite_table=_suite_table)

    p = sub.add_parser("presets", help="show the per-dataset settings of the released tables")
    p.add_argument("name", nargs="?", help="a dataset (all when omitted)")
    p.add_argument("--method", choices=("coop", "cocoop", "maple", "dept"), default="coop")

    _add_datasets_parser(sub)

    from . import demo

    p = sub.add_parser("demo", help="the whole method end to end, offline (Stage I, Stage II, base / novel / HM)",
                       description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(p)
    return parser


def _add_datasets_parser(sub) -> None:
    p = sub.add_parser("datasets", help="check dataset folders: layout, classes, splits, shots, preset, descriptions")
    checks = p.add_subparsers(dest="datasets_command", required=True, metavar="ACTION")
    c = checks.add_parser("check", help="what the runner would read from each folder; exit 1 on what it refuses",
                          description="Per folder: the recognised layout, classes, images per split, Dassl's "
                                      "split_fewshot files, the preset and descriptions that apply (docs: "
                                      "howto/get-the-data.md).")
    c.add_argument("folders", nargs="+", metavar="DIR", help="dataset folders (as --data / --target)")
    c.add_argument("--descriptions", help="a descriptions JSON, or a folder of <preset>.json files")
    c.add_argument("--shots", type=int, help="with --seeds: check split_fewshot/shot_K-seed_S.pkl (--shots-from dassl)")
    c.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="seeds for --shots (1 2 3)")


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
                                                "(AnchorOPT methods)" + ("; or a folder of <preset>.json files, one "
                                                                         "per dataset" if grid else ""))
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
    p.add_argument("--tensorboard", action="store_true", default=None,
                   help="also write TensorBoard event files to RUN/tensorboard/ (pip install tensorboard); "
                        "metrics.jsonl and metrics.csv are written always")


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
    g = p.add_argument_group("hyperparameters (default: --preset, else the method's --recipe; in brackets: "
                             "CoOp+AnchorOPT's released recipe)")
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


def _typed_dests(argv: Sequence[str], command: str) -> set[str]:
    """The ``dest`` of every option of ``command`` the user typed in ``argv`` (argparse defaults left out):
    a re-run from a saved config takes only these from the command line."""
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_action in action.choices[command]._actions:
                sub_action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(list(argv)))) - {"command"}


def _saved_file(path: str, name: str, what: str) -> Path:
    """``path`` itself, or ``path/name`` when ``path`` is a directory; missing: an error naming the fix."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / name
    if not file.is_file():
        raise FileNotFoundError(f"--config {path}: {file} not found (give the {name} {what} wrote, or its "
                                "directory)")
    return file


def _config_from_file(args: argparse.Namespace):
    """``anchoropt train --config``: the saved run's :class:`RunConfig`, the typed options on top."""
    from .._jsonfile import read_json
    from .config import RUN_CONFIG, RunConfig

    file = _saved_file(args.config, RUN_CONFIG, "`anchoropt train`")
    values = read_json(file, f"{file} not found")
    if isinstance(values, dict) and "methods" in values and "seeds" in values:
        raise ValueError(f"--config {args.config}: {file} is a grid's file; re-run it with "
                         "`anchoropt grid --config`")
    try:
        saved = RunConfig.from_json(values)
    except ValueError as err:
        raise ValueError(f"--config {args.config}: {file}: {err}") from None
    return dataclasses.replace(saved, **_typed_fields(args))


def _typed_fields(args: argparse.Namespace, leave_out: tuple[str, ...] = ()) -> dict:
    """The :class:`RunConfig` fields among the options typed on the command line (``args._typed``)."""
    from .config import RunConfig

    typed = getattr(args, "_typed", set())
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
            if f.name in typed and f.name not in leave_out}


def _cmd_train(args) -> int:
    from .run import run_training

    if args.config:
        cfg = _config_from_file(args)
    elif not args.data:
        raise ValueError("the following argument is required: --data DIR (or --config RUN/run_config.json to "
                         "re-run a saved run)")
    else:
        cfg = _config(args)
    run_training(cfg, overwrite=args.overwrite, resume=args.resume)
    return 0


def _cmd_grid(args) -> int:
    from .grid import report_grid, run_grid

    if args.report:
        report_grid(args.report, paper=args.paper)
        return 0
    if args.config:
        return _grid_from_file(args)
    missing = [flag for flag, value in (("--methods", args.methods), ("--data", args.data),
                                        ("--output", args.output)) if not value]
    if missing:
        raise ValueError(f"anchoropt grid needs {', '.join(missing)} (or --report OUT to only write the report)")
    base = _config(argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("data", "output", "seeds")}))
    done = run_grid(base, args.methods, args.data, args.seeds, args.output, jobs=args.jobs, shard=args.shard,
                    threads=getattr(args, "threads", None), paper=args.paper)
    print(f"grid: {len(done['ran'])} run(s) done, {len(done['skipped'])} already finished", flush=True)
    return 0


def _grid_from_file(args: argparse.Namespace) -> int:
    """``anchoropt grid --config GRID/grid.json``: the saved grid again (methods, datasets, seeds, settings),
    the typed options on top; ``--output`` defaults to the saved grid's directory (finished runs are skipped)."""
    from .._jsonfile import read_json
    from .config import RunConfig
    from .grid import GRID_FILE, run_grid

    file = _saved_file(args.config, GRID_FILE, "`anchoropt grid`")
    spec = read_json(file, f"{file} not found")
    if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict) or "data_dirs" not in spec:
        raise ValueError(f"--config {args.config}: {file} holds no saved settings (a grid.json of an older "
                         "anchoropt, or not a grid's file): run the grid with its options instead")
    try:
        base = RunConfig.from_json(spec["config"])
    except ValueError as err:
        raise ValueError(f"--config {args.config}: {file}: {err}") from None
    base = dataclasses.replace(base, **_typed_fields(args, leave_out=("data", "output", "seed")))
    typed = getattr(args, "_typed", set())
    methods = args.methods if "methods" in typed else spec["methods"]
    data = args.data if "data" in typed else spec["data_dirs"]
    seeds = args.seeds if "seeds" in typed else spec["seeds"]
    output = args.output if "output" in typed else str(file.parent)
    done = run_grid(base, methods, data, seeds, output, jobs=args.jobs, shard=args.shard,
                    threads=getattr(args, "threads", None), paper=args.paper)
    print(f"grid: {len(done['ran'])} run(s) done, {len(done['skipped'])} already finished", flush=True)
    return 0


def _cmd_eval(args) -> int:
    from .run import run_evaluation

    overrides = {k: getattr(args, k) for k in ("protocol", "targets", "data", "pretrained", "eval_mode", "device",
                                                "workers", "progress") if getattr(args, k) is not None}
    run_evaluation(args.run, overrides, output=args.output, sample_positions=args.sampled_positions)
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


def _cmd_datasets(args) -> int:
    from .datasets_check import check_datasets

    return check_datasets(args.folders, args.descriptions, args.shots, args.seeds)


def _cmd_demo(args) -> int:
    from . import demo

    return demo.run(args)


_COMMANDS = {"learn-anchors": _cmd_learn_anchors, "train": _cmd_train, "grid": _cmd_grid, "eval": _cmd_eval,
             "plot": _cmd_plot, "presets": _cmd_presets, "demo": _cmd_demo, "datasets": _cmd_datasets}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``anchoropt`` console script; returns the exit status.

    Warnings print as one plain ``warning: <message>`` line each, once; Ctrl-C prints one line (for ``train``
    and ``grid`` the command that continues the work) and returns 130.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None):
        args._typed = _typed_dests(argv, args.command)
    _set_threads(args)
    with warnings.catch_warnings():
        warnings.showwarning = _plain_warning_printer()
        try:
            return _run_command(args)
        except KeyboardInterrupt:
            print(_interrupted_line(args, argv), file=sys.stderr, flush=True)
            return 130


def _suite_baselines(args: argparse.Namespace) -> dict:
    """``toyworld calibrate --suite``'s training half: the baselines' grid (:mod:`anchoropt.runner.toy_calibration`)."""
    from ..toyworld.suite import read_suite, suite_scope
    from .toy_calibration import calibrate_suite

    datasets, seeds = suite_scope(read_suite(args.suite), args.datasets, args.seeds, args.quick)
    output = args.output or str(Path(args.suite) / "calibration")
    return calibrate_suite(args.suite, output, seeds=seeds, datasets=datasets, jobs=args.jobs, weights=args.weights,
                           log=lambda line: print(line, flush=True))


def _suite_table(args: argparse.Namespace) -> dict:
    """``toyworld table1``: Table 1's grid on the suite (:mod:`anchoropt.runner.toy_table`)."""
    from .toy_table import run_table1

    output = args.output or str(Path(args.suite) / ("table1-quick" if args.quick else "table1"))
    return run_table1(args.suite, output, quick=args.quick, seeds=args.seeds, datasets=args.datasets,
                      methods=args.methods, jobs=args.jobs, weights=args.weights,
                      log=lambda line: print(line, flush=True))


def _run_command(args: argparse.Namespace) -> int:
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


# commands whose models are small enough that more than one torch thread only adds overhead
_ONE_THREAD_COMMANDS = ("demo", "toyworld")
_COMPUTE_COMMANDS = ("learn-anchors", "train", "grid", "eval", "plot")


def _set_threads(args: argparse.Namespace) -> None:
    """``--threads N``; else one thread for the demo and the toy world, torch's default for the rest, with a
    one-line hint on stderr when the machine is busier than its cores."""
    threads = getattr(args, "threads", None)
    if not threads and args.command in _ONE_THREAD_COMMANDS:
        threads = 1
    if threads:
        import torch

        torch.set_num_threads(threads)
    elif args.command in _COMPUTE_COMMANDS and _torch_threads() > 1:  # one thread already: nothing to add
        hint = busy_machine_hint()
        if hint:
            print(hint, file=sys.stderr, flush=True)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def busy_machine_hint(load: float | None = None, cores: int | None = None) -> str | None:
    """The note printed when the 1-minute load average exceeds the core count (``None`` otherwise, on the
    non-zero ranks of a torchrun job, and where the load is unknown)."""
    import os

    if os.environ.get("RANK", "0") != "0":
        return None
    try:
        load = os.getloadavg()[0] if load is None else load
    except (AttributeError, OSError):  # no load average on this platform
        return None
    cores = cores or os.cpu_count() or 1
    if load <= cores:
        return None
    return (f"note: this machine is busy (1-minute load {load:.1f} on {cores} cores): torch uses one thread per "
            "core by default; --threads 1 (or a few) is often faster here")


def _plain_warning_printer():
    """A ``warnings.showwarning`` that prints ``warning: <message>`` on stderr, each message once, without the
    source line Python adds."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if text in seen:
            return
        seen.add(text)
        print(f"warning: {text}", file=file or sys.stderr, flush=True)

    return show


def _interrupted_line(args: argparse.Namespace, argv: Sequence[str]) -> str:
    """The one line Ctrl-C prints: for ``train`` the ``--resume`` command, for ``grid`` the same command (it
    skips finished runs and resumes interrupted ones)."""
    import shlex

    from .config import RUN_CONFIG

    if args.command == "train":
        words = [w for w in argv if w not in ("--overwrite", "--resume")] + ["--resume"]
        started = (Path(args.output) / RUN_CONFIG).is_file() or (args.config and "output" not in args._typed)
        if started:
            return f"interrupted: continue with: anchoropt {shlex.join(words)}"
        return "interrupted before the run started: nothing was written; run the same command again"
    if args.command == "grid" and not args.report:
        return (f"interrupted: continue with: anchoropt {shlex.join(argv)} (finished runs are skipped, the "
                "interrupted one resumes from its last checkpoint)")
    return f"interrupted: anchoropt {args.command} stopped"
