"""Whole runs, one per command: ``learn-anchors``, ``train`` and ``eval``; each writes its run directory."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .. import data as D
from .. import distributed as dist_utils
from .config import RESULTS, RUN_CONFIG, RunConfig, _absolute_paths, load_run_config
from .console import _log
from .models import ModelBundle, _text_width, build_model
from .protocols import _evaluations, _open_targets, _source_dataset, _training_view
from .reports import RANDOM_FLAG, _plots, random_weights, summary_line
from .training import learn_anchors, seed_everything, train_stage2


@dataclass
class RunResult:
    """What :func:`run_training` returns: the results dict, the trained learner (unwrapped) and the paths."""

    results: dict
    learner: nn.Module | None = None
    output: Path | None = None


def _check_dataset_paths(cfg: RunConfig) -> None:
    """``--data`` and every ``--target`` must be directories; the error shows the path as it was given."""
    for flag, path in [("--data", cfg.data)] + [("--target", t) for t in cfg.targets]:
        if path and not Path(path).expanduser().is_dir():
            what = "not a directory" if Path(path).expanduser().exists() else "not found"
            raise FileNotFoundError(f"dataset directory {what}: {path} ({flag})")


def run_learn_anchors(cfg: RunConfig, bundle: ModelBundle | None = None, classnames: Sequence[str] | None = None,
                      subsample: str = "base") -> dict:
    """``anchoropt learn-anchors``: Stage I only; writes ``<output>/anchors.safetensors`` and ``stage1.json``.

    Classes: the base (or all) classes of ``cfg.data``, or ``classnames``, or the descriptions file's keys.
    """
    from ..descriptions import load_descriptions
    from ..io import save_anchors

    cfg = cfg.resolve() if any(getattr(cfg, k) is None for k in RunConfig._DEFAULTS) else cfg
    if not cfg.descriptions:
        raise ValueError("learn-anchors needs --descriptions (a {class: [sentences]} JSON file)")
    _check_dataset_paths(cfg)
    ctx = dist_utils.init_from_env(cfg.device)
    seed_everything(cfg.seed)
    if classnames is None:  # the inputs are read before the model is built: a wrong path fails at once
        if cfg.data:
            source = _source_dataset(cfg)
            classnames = D.subsample_classes(D.sample_few_shot(source, cfg.shots, cfg.seed), subsample).classnames
            _log(ctx, f"{source.summary()}; Stage I on the {subsample} classes: {len(classnames)}")
        else:
            keys = list(load_descriptions(cfg.descriptions))
            classnames = keys[: math.ceil(len(keys) / 2)] if subsample == "base" else keys
            _log(ctx, f"{cfg.descriptions}: {len(keys)} classes; Stage I on "
                      + (f"the first {len(classnames)} (base)" if subsample == "base" else f"all {len(keys)}"))
    bundle = bundle or build_model(cfg.model, cfg.pretrained, ctx.device, cfg.precision, cfg.augment)
    anchors, info = learn_anchors(bundle, classnames, cfg.descriptions, cfg, ctx)
    out = Path(cfg.output)
    info.update(classnames=list(classnames), model=cfg.model, pretrained=cfg.pretrained,
                random_weights=random_weights(cfg.pretrained),
                descriptions=cfg.descriptions, anchor_norms=[round(float(x), 4) for x in anchors.norm(dim=-1)])
    if ctx.is_main:
        save_anchors(anchors, out / "anchors.safetensors", classnames=list(classnames))
        (out / "stage1.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        flag = f" | {RANDOM_FLAG}" if random_weights(cfg.pretrained) else ""
        print(f"stage1 {len(classnames)} classes | {info['steps']} steps | loss {info['loss_first']:.4f} -> "
              f"{info['loss_last']:.4f} | anchors -> {out / 'anchors.safetensors'}{flag}", flush=True)
    dist_utils.cleanup(ctx)
    return info


def run_training(cfg: RunConfig, bundle: ModelBundle | None = None, evaluate_after: bool = True,
                 ctx: dist_utils.DistContext | None = None) -> RunResult:
    """``anchoropt train``: (Stage I) + Stage II + the protocol's evaluation; writes the run directory.

    Run directory: ``run_config.json``, ``anchors.safetensors``, ``prompt_learner/`` (safetensors + JSON,
    :mod:`anchoropt.io`), ``results.json`` and ``plots/*.png`` (when matplotlib is installed).

    Args:
        bundle: a ready :class:`ModelBundle` (any CLIP model object); built from ``cfg.model`` otherwise.
        ctx: a distributed context (from :func:`anchoropt.distributed.init_from_env` by default).
    """
    from ..io import load_anchors, save_anchors, save_prompt_learner
    from ..prompts import AnchorOPTPromptLearner

    wall = time.perf_counter()
    cfg = cfg.resolve()
    _check_dataset_paths(cfg)  # the paths as typed, in the messages
    cfg = _absolute_paths(cfg)  # run_config.json then works from any directory
    # the inputs are read before the model is built: a wrong --data or --target fails at once
    source = _source_dataset(cfg)
    train_view, novel_view = _training_view(source, cfg)
    trained = train_view.classnames
    if evaluate_after:
        _open_targets(cfg, trained)
    own_ctx = ctx is None
    ctx = ctx or dist_utils.init_from_env(cfg.device)
    seed_everything(cfg.seed)  # same frozen random towers and initial prompts on every process
    bundle = bundle or build_model(cfg.model, cfg.pretrained, ctx.device, cfg.precision, cfg.augment)
    _log(ctx, f"{source.summary()}; training on {len(train_view.train)} images of {len(trained)} classes "
              f"({cfg.shots} shots, seed {cfg.seed}, protocol {cfg.protocol}, world size {ctx.world_size})")
    out = Path(cfg.output)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_CONFIG).write_text(json.dumps(cfg.to_json(), indent=2) + "\n", encoding="utf-8")

    stage1: dict[str, Any]
    if cfg.anchors:
        anchors = load_anchors(cfg.anchors, expected_width=_text_width(bundle.model))
        stage1 = {"anchors_from": cfg.anchors}
    elif cfg.descriptions:
        anchors, stage1 = learn_anchors(bundle, trained, cfg.descriptions, cfg, ctx)
        if ctx.is_main:  # the other processes did not run Stage I (rank 0 broadcast the anchors)
            _log(ctx, f"Stage I: {stage1['steps']} steps, loss {stage1['loss_first']:.4f} -> "
                      f"{stage1['loss_last']:.4f}")
    else:
        raise ValueError("Stage II needs anchors: pass --descriptions JSON (Stage I runs first) or --anchors FILE")
    if cfg.n_anchor != anchors.shape[0]:
        cfg = dataclasses.replace(cfg, n_anchor=int(anchors.shape[0]))

    deep = {"deep_depth": cfg.deep_depth} if cfg.deep_depth else {}
    learner = AnchorOPTPromptLearner(bundle.model, trained, anchors, n_soft=cfg.n_soft, preposition=cfg.preposition,
                                     tokenizer=bundle.tokenizer, tau=cfg.tau, **deep)

    def checkpoint(epoch: int, loss: float) -> None:
        if ctx.is_main and cfg.save_every and (epoch + 1) % cfg.save_every == 0 and epoch + 1 < cfg.epochs:
            save_prompt_learner(learner, out / "checkpoints" / f"epoch_{epoch + 1}")

    stage2 = train_stage2(learner, bundle, train_view.train, cfg, ctx, on_epoch_end=checkpoint)
    _log(ctx, f"Stage II: {stage2['epochs']} epochs x {stage2['steps_per_epoch']} steps, "
              f"loss {stage2['epoch_losses'][0]:.4f} -> {stage2['epoch_losses'][-1]:.4f} ({stage2['seconds']} s)")
    if ctx.is_main:
        save_anchors(anchors, out / "anchors.safetensors", classnames=trained)
        save_prompt_learner(learner, out / "prompt_learner")
    results: dict[str, Any] = {
        "protocol": cfg.protocol, "dataset": source.name, "model": cfg.model, "pretrained": cfg.pretrained,
        "random_weights": random_weights(cfg.pretrained), "preset": cfg.preset, "seed": cfg.seed, "shots": cfg.shots, "trained_classes": list(trained),
        "world_size": ctx.world_size, "stage1": stage1, "stage2": stage2,
        "position": {"assignment": learner.position.assignment().tolist(), "slots": learner.position.describe()},
    }
    if evaluate_after:
        start = time.perf_counter()
        results["results"] = _evaluations(learner, bundle, cfg, ctx, train_view, novel_view, trained)
        results["eval_seconds"] = round(time.perf_counter() - start, 3)
        learner.set_classnames(list(trained))
        results["summary"] = summary_line(results)
    results["seconds"] = round(time.perf_counter() - wall, 3)
    if ctx.is_main:
        (out / RESULTS).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        if cfg.plots:
            note = f"{RANDOM_FLAG}: this picture means nothing" if results["random_weights"] else None
            results["plots"] = _plots(learner, bundle, out, note)
        if "summary" in results:
            print(results["summary"], flush=True)
    dist_utils.barrier(ctx)
    if own_ctx:
        dist_utils.cleanup(ctx)
    return RunResult(results, learner, out)


def run_evaluation(run_dir: str | os.PathLike, overrides: dict | None = None, bundle: ModelBundle | None = None,
                   output: str | os.PathLike | None = None) -> dict:
    """``anchoropt eval``: rebuild a finished run's model and splits, reload its learner, evaluate again.

    Args:
        overrides: ``RunConfig`` fields to change (``targets``, ``protocol``, ``data``, ``eval_mode``,
            ``pretrained`` ...), e.g. new cross-dataset targets for a trained run.
        output: results file (``<run_dir>/eval_results.json`` by default).
    """
    from ..io import load_prompt_learner, read_config

    run_dir = Path(run_dir)
    cfg = dataclasses.replace(load_run_config(run_dir), **(overrides or {})).resolve()
    _check_dataset_paths(cfg)
    source = _source_dataset(cfg)  # before the model: a wrong --data fails at once
    train_view, novel_view = _training_view(source, cfg)
    ctx = dist_utils.init_from_env(cfg.device)
    seed_everything(cfg.seed)
    bundle = bundle or build_model(cfg.model, cfg.pretrained, ctx.device, cfg.precision, "none")
    learner = load_prompt_learner(run_dir / "prompt_learner", bundle.model, train_view.classnames,
                                  tokenizer=bundle.tokenizer)
    trained = read_config(run_dir / "prompt_learner", "prompt_learner")["trained_classnames"]
    results = {"protocol": cfg.protocol, "dataset": source.name, "model": cfg.model, "pretrained": cfg.pretrained,
               "random_weights": random_weights(cfg.pretrained), "seed": cfg.seed, "shots": cfg.shots, "run": str(run_dir),
               "results": _evaluations(learner, bundle, cfg, ctx, train_view, novel_view, trained)}
    results["summary"] = summary_line(results)
    if ctx.is_main:
        target = Path(output) if output else run_dir / "eval_results.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(results["summary"], flush=True)
    dist_utils.cleanup(ctx)
    return results
