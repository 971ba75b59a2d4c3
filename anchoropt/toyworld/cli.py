"""The toy world's commands: make a dataset, pretrain / evaluate / calibrate the toy CLIP.

``anchoropt toyworld ...``, or ``python -m anchoropt.toyworld ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

__all__ = ["add_parser", "build_parser", "run", "main"]


def add_parser(subparsers, suite_baselines=None, suite_table=None) -> argparse.ArgumentParser:
    """Add the ``toyworld`` command (with ``make`` / ``suite`` / ``pretrain`` / ...) to an argparse sub-parser set.

    ``suite_baselines(args) -> figures``: runs the baselines of ``calibrate --suite`` (the runner provides it:
    training lives above the toy world); without it, ``calibrate --suite`` measures the world's properties only.
    ``suite_table(args)``: runs ``table1`` (the runner's too).
    """
    p = subparsers.add_parser("toyworld", help="the toy world: write a dataset or the suite, pretrain the toy CLIP",
                              description=__doc__.splitlines()[0])
    _fill(p)
    p.set_defaults(toyworld_suite_baselines=suite_baselines, toyworld_suite_table=suite_table)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anchoropt toyworld", description=__doc__.splitlines()[0])
    _fill(p)
    return p


def _fill(p: argparse.ArgumentParser) -> None:
    from .concepts import GROUP_SIZE, N_GROUPS
    from .render import DOMAINS

    sub = p.add_subparsers(dest="toyworld_command", required=True, metavar="{make,suite,pretrain,zeroshot,calibrate,table1,info}")
    m = sub.add_parser("make", help="write a toy-world dataset (PNG folders, split.json, classes.txt, descriptions.json)")
    m.add_argument("dir", help="output directory (must be new or empty; --overwrite replaces an old toy world)")
    m.add_argument("--seed", type=int, default=0, help="seed of the images (the classes never change) (0)")
    m.add_argument("--classes", type=int, default=100, help=f"number of classes, the first of the group (1..{GROUP_SIZE}) (100)")
    m.add_argument("--per-class", type=int, default=60,
                   help="images per class, split 50%% train / 20%% val / 30%% test (60)")
    m.add_argument("--domain", default="photo", choices=DOMAINS, help="image domain (photo)")
    m.add_argument("--group", type=int, default=0, help=f"class group 0..{N_GROUPS - 1}, disjoint classes (0)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing toy world in DIR")
    m.set_defaults(toyworld_func=_make)

    t = sub.add_parser("pretrain", help="pretrain the toy CLIP from scratch (contrastive; CPU, minutes)")
    t.add_argument("--output", "-o", required=True, help="checkpoint to write (.safetensors; a .json record beside it)")
    t.add_argument("--seed", type=int, default=0, help="seed of the pool images, captions, init and batches (0)")
    t.add_argument("--steps", type=int, default=None, help="optimisation steps (the shipped recipe's by default)")
    t.add_argument("--batch-size", type=int, default=None, help="batch size (recipe default)")
    t.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate (recipe default)")
    t.add_argument("--logit-scale-lr", type=float, default=None,
                   help="AdamW peak learning rate of the temperature (recipe default)")
    t.add_argument("--name-zipf", type=float, default=None,
                   help="exponent of the Zipf law of name frequencies (recipe default; 0: every name always)")
    t.add_argument("--name-noise", type=float, default=None,
                   help="probability that a caption names a neighbouring class instead (recipe default)")
    t.add_argument("--threads", type=int, default=1, help="torch threads; results are deterministic per count (1)")
    t.set_defaults(toyworld_func=_pretrain)

    z = sub.add_parser("zeroshot", help="zero-shot top-1 of the toy CLIP on a dataset directory")
    z.add_argument("dir", help="a dataset directory (e.g. written by 'toyworld make')")
    z.add_argument("--weights", help="a checkpoint from 'toyworld pretrain' (default: the shipped one)")
    z.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to evaluate (test)")
    z.add_argument("--template", default="a photo of a {}.", help="prompt template ('a photo of a {}.')")
    z.add_argument("--threads", type=int, default=1, help="torch threads (1: the toy CLIP gains nothing from more)")
    z.set_defaults(toyworld_func=_zeroshot)

    c = sub.add_parser("calibrate", help="--suite DIR: the world's properties and the baselines' base-to-novel "
                                         "pattern on a suite, against the targets; --workdir DIR: zero-shot top-1 "
                                         "on the per-domain calibration worlds; optionally write the card")
    c.add_argument("--weights", help="a checkpoint from 'toyworld pretrain' (default: the shipped one)")
    where = c.add_mutually_exclusive_group(required=True)
    where.add_argument("--suite", help="a suite written by 'toyworld suite': logit scale, template spread, CuPL "
                                       "gain, then the baselines (zero-shot, CoOp M=4/16, CoCoOp, MaPLe, DePT)")
    where.add_argument("--workdir", help="where the per-domain calibration datasets are (or are written)")
    c.add_argument("--output", help="--suite: the baselines' grid folder (default: SUITE/calibration)")
    c.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="--suite: seeds (1 2 3)")
    c.add_argument("--jobs", type=int, default=1, help="--suite: runs at once (1)")
    c.add_argument("--datasets", nargs="+", metavar="NAME", help="--suite: only these datasets")
    c.add_argument("--quick", action="store_true",
                   help="--suite: one seed on caltech, dtd and eurosat (a first look, minutes)")
    c.add_argument("--properties-only", action="store_true",
                   help="--suite: only the world's properties (no training)")
    c.add_argument("--card", help="write the model card (sha256, pretraining record, figures) to this JSON file "
                                  "(a card of the same checkpoint there keeps its other figures)")
    c.add_argument("--rerun", help="JSON of another pretraining run's figures, recorded in the card")
    c.add_argument("--threads", type=int, default=1, help="torch threads (1: the toy CLIP gains nothing from more)")
    c.set_defaults(toyworld_func=_calibrate)

    s = sub.add_parser("suite", help="write the toy benchmark: 11 base-to-novel datasets and 4 domain-"
                                     "generalisation variants, and DIR/suite.json")
    s.add_argument("dir", help="output directory (new or empty)")
    s.add_argument("--seed", type=int, default=0, help="seed of the images (the classes never change) (0)")
    s.add_argument("--only", nargs="+", metavar="NAME", help="write only these datasets of the suite")
    s.add_argument("--overwrite", action="store_true", help="replace the datasets of an existing suite in DIR")
    s.set_defaults(toyworld_func=_suite)

    b = sub.add_parser("table1", help="the paper's Table 1 on a suite: zero-shot and CoOp / CoCoOp / MaPLe / DePT, "
                                      "alone, +ATPrompt, +AnchorOPT, at the released recipes (a grid)")
    b.add_argument("--suite", required=True, help="a suite written by 'toyworld suite'")
    b.add_argument("--output", help="the grid folder (default: SUITE/table1, or SUITE/table1-quick with --quick)")
    b.add_argument("--weights", help="a checkpoint from 'toyworld pretrain' (default: the shipped one)")
    b.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (1 2 3)")
    b.add_argument("--jobs", type=int, default=1, help="runs at once (1)")
    b.add_argument("--datasets", nargs="+", metavar="NAME", help="only these datasets of the suite")
    b.add_argument("--quick", action="store_true", help="one seed; zero-shot, CoOp, CoOp+ATPrompt, CoOp+AnchorOPT; "
                                                        "toy_caltech, toy_dtd, toy_eurosat")
    b.add_argument("--methods", nargs="+", metavar="SPEC",
                   help="other method specs instead of the table's rows, e.g. the ablations "
                        "'coop+anchoropt:kd_weight=0' 'coop+anchoropt:pooling=released' (use another --output)")
    b.set_defaults(toyworld_func=_table1)

    i = sub.add_parser("info", help="print the shipped checkpoint's record (sha256, command, calibration)")
    i.set_defaults(toyworld_func=_info)


def _make(args) -> int:
    from pathlib import Path

    from .make import make

    root = Path(args.dir)
    if not args.overwrite and root.is_dir() and any(root.iterdir()):  # the library's message names overwrite=True
        raise FileExistsError(f"{root} exists and is not empty; choose a new directory or pass --overwrite")
    record = make(args.dir, seed=args.seed, classes=args.classes, per_class=args.per_class, domain=args.domain,
                  group=args.group, overwrite=args.overwrite)
    sizes = record["split_sizes"]
    print(f"wrote {args.dir}: {record['classes']} classes of group {record['group']}, domain {record['domain']}, "
          f"{sizes['train']}/{sizes['val']}/{sizes['test']} train/val/test images per class "
          "(split.json, classes.txt, descriptions.json, world.json)")
    return 0


def _suite(args) -> int:
    import time

    from .suite import DG_VARIANTS, SUITE, make_suite

    known = {d.name: d for d in SUITE + DG_VARIANTS}
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        raise ValueError(f"--only: unknown suite datasets {unknown}; the suite has {', '.join(known)}")
    chosen = [known[n] for n in args.only] if args.only else None
    start = time.perf_counter()
    record = make_suite(args.dir, seed=args.seed, overwrite=args.overwrite, datasets=chosen,
                        log=lambda line: print(line, flush=True))
    print(f"wrote {len(record['datasets'])} datasets and {args.dir}/suite.json in {time.perf_counter() - start:.0f} s")
    return 0


def _pretrain(args) -> int:
    from dataclasses import replace

    from .make import check_seed
    from .pretrain import RECIPE, pretrain, save_checkpoint

    check_seed(args.seed)
    cfg = RECIPE
    overrides = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "logit_scale_lr")
                 if getattr(args, k) is not None}
    cfg = replace(cfg, seed=args.seed, threads=args.threads, **overrides)
    mix = {k: getattr(args, k) for k in ("name_noise", "name_zipf") if getattr(args, k) is not None}
    cfg = replace(cfg, mix=replace(cfg.mix, **mix))
    model, record = pretrain(cfg, log=lambda line: print(line, flush=True))
    record["command"] = _pretrain_command(args)
    path = save_checkpoint(model, args.output, record)
    from .model import sha256_file

    print(f"wrote {path} (sha256 {sha256_file(path)}) and {path.with_suffix('.json')}")
    return 0


def _zeroshot(args) -> int:
    import torch

    from .model import load_model
    from .zeroshot import dataset_accuracy

    if args.threads:
        torch.set_num_threads(args.threads)
    from ..template import check_template

    check_template(args.template, "--template")
    model, preprocess, tokenizer = load_model(args.weights)
    acc = dataset_accuracy(args.dir, model, preprocess, tokenizer, args.split, args.template)
    print(f"zero-shot top-1 on {args.dir} ({args.split}): {100 * acc:.2f}%  (toy-world figure)")
    return 0


def _calibrate(args) -> int:
    import torch

    from .calibrate import calibrate

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite:
        return _calibrate_suite(args)
    figures = calibrate(args.weights, args.workdir)
    print("zero-shot top-1 (toy-world figures): " + ", ".join(f"{d} {100 * v:.2f}%" for d, v in figures.items()))
    if args.card:
        _write_card(args, figures)
    return 0


def _calibrate_suite(args) -> int:
    """``calibrate --suite``: the world's properties, then (through the runner) the baselines; ``--card``
    records both."""
    from .model import load_model
    from .properties import suite_properties
    from .suite import read_suite

    suite = read_suite(args.suite)
    if args.card:
        _check_card_first(args, suite)
    model, preprocess, tokenizer = load_model(args.weights)
    properties = suite_properties(args.suite, model, preprocess, tokenizer, names=args.datasets,
                                  log=lambda line: print(line, flush=True))
    _print_targets(properties["targets"])
    figures = {"properties": properties}
    if not args.properties_only:
        if args.toyworld_suite_baselines is None:
            raise ValueError("the baselines need the runner: use 'anchoropt toyworld calibrate --suite ...' "
                             "(or pass --properties-only)")
        figures["baselines"] = args.toyworld_suite_baselines(args)
    if args.card:
        _write_card(args, {"suite": figures})
    return 0


def _check_card_first(args, suite: dict) -> None:
    """``calibrate --suite --card``: refuse before the runs a card that could not be written after them."""
    from .calibrate import check_card_scope
    from .suite import suite_scope

    scope = {"properties": {"datasets": suite_scope(suite, args.datasets, ())[0]}}  # never narrowed by --quick
    if not args.properties_only:
        datasets, seeds = suite_scope(suite, args.datasets, args.seeds, args.quick)
        scope["baselines"] = {"datasets": datasets, "seeds": seeds}
    check_card_scope(args.card, args.weights, scope)


def _table1(args) -> int:
    if args.toyworld_suite_table is None:
        raise ValueError("table1 trains with the runner: use 'anchoropt toyworld table1 ...'")
    args.toyworld_suite_table(args)
    return 0


def _print_targets(targets: dict) -> None:
    for name, t in targets.items():
        mark = {True: "holds", False: "MISSED", None: "not run"}[t["holds"]]
        print(f"  [{mark}] {name}: {t['value']}", flush=True)


def _write_card(args, figures: dict) -> None:
    from .calibrate import model_card_for

    if args.weights is None:
        raise ValueError("--card needs --weights (the checkpoint the card describes)")
    from pathlib import Path

    rerun = json.loads(open(args.rerun, encoding="utf-8").read()) if args.rerun else None
    earlier = json.loads(Path(args.card).read_text(encoding="utf-8")) if Path(args.card).is_file() else None
    card = model_card_for(args.weights, figures, rerun, earlier)
    with open(args.card, "w", encoding="utf-8") as f:
        f.write(json.dumps(card, indent=2) + "\n")
    print(f"wrote {args.card}")


def _pretrain_command(args) -> str:
    """The command line that reproduces this run (options as given)."""
    words = ["anchoropt toyworld pretrain", f"--output {args.output}", f"--seed {args.seed}", f"--threads {args.threads}"]
    for flag in ("steps", "batch_size", "lr", "logit_scale_lr", "name_zipf", "name_noise"):
        if getattr(args, flag) is not None:
            words.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}")
    return " ".join(words)


def _info(args) -> int:
    from .model import model_card

    print(json.dumps(model_card(), indent=2))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``toyworld`` command; a user error prints one line and returns 2."""
    try:
        return args.toyworld_func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"anchoropt toyworld {args.toyworld_command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only folder, a file in the way: the path and the fix
        from .._files import describe_os_error

        where = getattr(args, "dir", None) or getattr(args, "output", None)
        print(f"anchoropt toyworld {args.toyworld_command}: error: {describe_os_error(err, where)}",
              file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m anchoropt.toyworld``: the same commands as ``anchoropt toyworld``."""
    return run(build_parser().parse_args(argv))
