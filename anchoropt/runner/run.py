"""Whole runs, one per command: ``learn-anchors``, ``train`` and ``eval``; each writes its run directory."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .. import _files
from ..position import sample_positions_in_eval
from ..datasets import folders as D
from . import distributed as dist_utils
from .._jsonfile import read_json
from ..methods.registry import FEATURE_INPUTS
from . import checks
from . import rundir as R
from .config import RESULTS, RUN_CONFIG, RunConfig, _absolute_paths, load_run_config
from .console import _log
from .metrics import MetricsLog, check_tensorboard
from .models import ModelBundle, _text_width, build_model
from .protocols import _evaluations, _few_shot, _open_targets, _source_dataset, _training_view
from .reports import RANDOM_FLAG, _plots, summary_line, weights_record
from .training import learn_anchors, seed_everything, train_stage2

# options that may differ between an interrupted run and its --resume (they do not change the results)
_RESUMABLE_CHANGES = {"progress", "workers", "device", "plots", "eval_batch_size", "tensorboard"}


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
    Every input is checked before the model is built.
    """
    from ..descriptions import load_descriptions
    from ..io import save_anchors

    cfg = cfg.resolve() if any(getattr(cfg, k) is None for k in RunConfig._DEFAULTS) else cfg
    cfg.validate()
    if not cfg.descriptions:
        raise ValueError("learn-anchors needs --descriptions (a {class: [sentences]} JSON file)")
    _check_dataset_paths(cfg)
    out = Path(cfg.output)
    _check_anchors_output(out)
    ctx = dist_utils.init_from_env(cfg.device)
    if classnames is None:  # the inputs are read before the model is built: a wrong path fails at once
        if cfg.data:
            source = _source_dataset(cfg)
            classnames = D.subsample_classes(_few_shot(source, cfg), subsample).classnames
            _log(ctx, f"{source.summary()}; Stage I on the {subsample} classes: {len(classnames)}")
        else:
            keys = list(load_descriptions(cfg.descriptions))
            classnames = keys[: math.ceil(len(keys) / 2)] if subsample == "base" else keys
            _log(ctx, f"{cfg.descriptions}: {len(keys)} classes; Stage I on "
                      + (f"the first {len(classnames)} (base)" if subsample == "base" else f"all {len(keys)}"))
    checks.check_descriptions(cfg, classnames)
    checks.check_pretrained(cfg)
    with R.locked(out, "anchoropt learn-anchors") if ctx.is_main else _nothing():
        if ctx.is_main:
            _check_anchors_output(out)  # again under the lock: a run may have started there meanwhile
        seed_everything(cfg.seed)
        bundle = bundle or build_model(cfg.model, cfg.pretrained, ctx.device, cfg.precision, cfg.augment)
        anchors, info = learn_anchors(bundle, classnames, cfg.descriptions, cfg, ctx)
        info.update(classnames=list(classnames), model=cfg.model, **weights_record(cfg.pretrained, bundle),
                    descriptions=cfg.descriptions, anchor_norms=[round(float(x), 4) for x in anchors.norm(dim=-1)])
        if ctx.is_main:
            save_anchors(anchors, out / "anchors.safetensors", classnames=list(classnames))
            _files.write_json(out / R.STAGE1, info)
            flag = f" | {RANDOM_FLAG}" if info["random_weights"] else ""
            print(f"stage1 {len(classnames)} classes | {info['steps']} steps | loss {info['loss_first']:.4f} -> "
                  f"{info['loss_last']:.4f} | anchors -> {out / 'anchors.safetensors'}{flag}", flush=True)
    dist_utils.cleanup(ctx)
    return info


def _check_anchors_output(out: Path) -> None:
    """``learn-anchors`` writes only into a directory that holds no training run."""
    R.check_writable(out)
    if R.run_state(out) != "empty":
        raise R.RunDirectoryError(f"{out} holds a training run: learn-anchors would replace its anchors and mix "
                                  "two runs; choose another --output")


def run_training(cfg: RunConfig, bundle: ModelBundle | None = None, evaluate_after: bool = True,
                 ctx: dist_utils.DistContext | None = None, overwrite: bool = False,
                 resume: bool = False, features=None, stage1_cache=None) -> RunResult:
    """``anchoropt train``: (Stage I) + Stage II + the protocol's evaluation; writes the run directory.

    The method (``cfg.method``, :mod:`anchoropt.methods.registry`) decides what is built and trained: AnchorOPT
    (the default) runs Stage I first (or loads ``cfg.anchors``); zero-shot CLIP trains nothing.

    Run directory: ``run_config.json``, ``anchors.safetensors`` + ``stage1.json`` (AnchorOPT), ``checkpoints/``,
    ``prompt_learner/`` (AnchorOPT, safetensors + JSON, :mod:`anchoropt.io`) or ``learner/`` (other methods,
    :func:`anchoropt.methods.registry.save_learner`), ``results.json`` (written last) and ``plots/*.png`` (AnchorOPT,
    when matplotlib is installed); every part carries the run id (:mod:`.rundir`).
    Options, data, descriptions, anchors and images are all checked before the model is built.

    Args:
        bundle: a ready :class:`ModelBundle` (any CLIP model object); built from ``cfg.model`` otherwise.
        ctx: a distributed context (from :func:`anchoropt.runner.distributed.init_from_env` by default).
        overwrite: replace a finished (or interrupted) run in ``cfg.output``; refused otherwise.
        resume: continue the interrupted run in ``cfg.output`` from its last complete checkpoint (every
            training method writes one after each epoch; AnchorOPT's Stage I anchors are reused); the options
            must be the ones it was started with.
        features: a shared :class:`~anchoropt.runner.features.FeatureStore` (a grid's): with
            ``cfg.cache_image_features`` and ``augment="none"``, training and evaluation read image
            features from it instead of running the image tower.
        stage1_cache: a grid's :class:`~anchoropt.runner.stage1_cache.Stage1Cache`: Stage I anchors another run
            learned from the same start and inputs are read from it instead of learned again (exact).
    """
    from ..prompts import AnchorOPTPromptLearner
    from .learners import build_learner, method_settings, save_run_learner

    wall = time.perf_counter()
    plan = _plan_training(cfg, evaluate_after, overwrite, resume)  # every input, before any model is built
    cfg, choice, method, out, run_id = plan.cfg, plan.choice, plan.method, plan.out, plan.run_id
    own_ctx = ctx is None
    ctx = ctx or dist_utils.init_from_env(cfg.device)
    with R.locked(out, "anchoropt train") if ctx.is_main else _nothing():
        state = plan.state
        if ctx.is_main:  # again under the lock: another process may have finished or replaced a run there
            state = R.recheck_output(out, overwrite, resume, run_id if resume else None)
        if ctx.is_main and state != "empty" and overwrite:
            R.clear_run(out)
        seed_everything(cfg.seed)  # same frozen random towers and initial prompts on every process
        bundle = bundle or build_model(cfg.model, cfg.pretrained, ctx.device, cfg.precision, cfg.augment)
        features = _usable_features(features, cfg, choice)
        _log_start(ctx, plan, resume)
        if ctx.is_main and not resume:
            _files.write_json(out / RUN_CONFIG, {**cfg.to_json(), "run_id": run_id})
        anchors, stage1 = _stage1(plan, bundle, ctx, resume, stage1_cache)
        if anchors is not None and cfg.n_anchor != anchors.shape[0]:
            cfg = dataclasses.replace(cfg, n_anchor=int(anchors.shape[0]))

        settings = method_settings(cfg, anchors, bundle.tokenizer)
        learner = build_learner(choice, bundle, plan.trained, settings)
        start_from = _resume_point(learner, plan, ctx) if resume and method.trains else None
        metrics = MetricsLog(out, start_from[0]["epochs_done"] if start_from else None,
                             tensorboard=cfg.tensorboard) if ctx.is_main else None
        stage2: dict[str, Any] | None = None
        if method.trains and any(p.requires_grad for p in learner.parameters()):
            stage2 = train_stage2(learner, bundle, plan.train_view.train, cfg, ctx,
                                  on_checkpoint=_checkpointer(learner, out, run_id, cfg, ctx), resume=start_from,
                                  loss_fn=method.loss(settings), image_input=method.image_input, features=features,
                                  on_metrics=metrics.epoch if metrics is not None else None)
            _log(ctx, f"Stage II: {stage2['epochs']} epochs x {stage2['steps_per_epoch']} steps, loss "
                      f"{stage2['epoch_losses'][0]:.4f} -> {stage2['epoch_losses'][-1]:.4f} ({stage2['seconds']} s)")
        if ctx.is_main:
            save_run_learner(learner, choice, settings, out, run_id)
        anchoropt_learner = isinstance(learner, AnchorOPTPromptLearner)  # plots, position
        results = _results_record(plan, cfg, bundle, ctx, settings, stage1, stage2, _position_of(learner))
        if evaluate_after:
            start = time.perf_counter()
            results["results"] = _evaluations(learner, bundle, cfg, ctx, plan.train_view, plan.novel_view,
                                              plan.trained, method, features)
            results["eval_seconds"] = round(time.perf_counter() - start, 3)
            learner.set_classnames(list(plan.trained))
            results["summary"] = summary_line(results)
            if metrics is not None:
                metrics.evaluation(results["results"])
        if metrics is not None:
            metrics.close()
        results["seconds"] = round(time.perf_counter() - wall, 3)
        if ctx.is_main:
            _write_results(results, learner, bundle, out, cfg.plots and anchoropt_learner)
        dist_utils.barrier(ctx)
    if own_ctx:
        dist_utils.cleanup(ctx)
    return RunResult(results, learner, out)


@dataclass
class _TrainingPlan:
    """A training run's checked inputs: what :func:`_plan_training` read before any model is built."""

    cfg: RunConfig  # resolved, with absolute paths
    choice: Any  # the parsed method spec (registry.MethodChoice)
    out: Path
    state: str  # the output directory's state before the run (rundir.check_output)
    run_id: str
    source: D.DatasetSplits
    train_view: D.DatasetSplits
    novel_view: D.DatasetSplits | None
    given_anchors: Any  # the checked --anchors file, or None
    short: dict  # classes with fewer images than the shots asked, per split

    @property
    def method(self):
        return self.choice.method

    @property
    def trained(self) -> list[str]:
        return self.train_view.classnames


def _plan_training(cfg: RunConfig, evaluate_after: bool, overwrite: bool, resume: bool) -> _TrainingPlan:
    """Check every input of ``anchoropt train`` - options, output directory, datasets, targets, descriptions,
    anchors, images - and read what the run needs of them, before any model is built."""
    cfg = cfg.resolve()
    choice = cfg.method_choice()
    method = choice.method
    if cfg.tensorboard:
        check_tensorboard()  # its install hint, before anything is read or built
    if method.needs_anchors and not (cfg.anchors or cfg.descriptions):
        raise ValueError(f"{choice.label} needs anchors: pass --descriptions JSON (Stage I runs first) or "
                         "--anchors FILE")
    _check_dataset_paths(cfg)  # the paths as typed, in the messages
    cfg = _absolute_paths(cfg)  # run_config.json then works from any directory
    out = Path(cfg.output)
    state = R.check_output(out, overwrite, resume)
    run_id = _resumed_run_id(out, cfg) if resume else R.new_run_id()
    source = _source_dataset(cfg)
    train_view, novel_view = _training_view(source, cfg)
    trained = train_view.classnames
    targets = _open_targets(cfg, trained) if evaluate_after else []
    checks.check_class_specific(choice, trained, targets)
    if method.needs_anchors:
        checks.check_descriptions(cfg, trained)
    given_anchors = checks.check_anchor_file(cfg) if method.needs_anchors else None
    checks.check_images(train_view.train, "training", decode=True)
    if evaluate_after:  # read whole: a truncated test image is found now, not after Stage II
        checks.check_images([*train_view.test, *(novel_view.test if novel_view else []),
                             *(r for t in targets for r in t.test)], "test", decode=True)
    short = checks.short_class_report(source, cfg)
    checks.check_pretrained(cfg)
    return _TrainingPlan(cfg, choice, out, state, run_id, source, train_view, novel_view, given_anchors, short)


def _usable_features(features, cfg: RunConfig, choice):
    """The shared feature store, when this run may read from it (``None`` otherwise); refuses one of the wrong
    kind (raw vs L2-normalised features)."""
    if not (cfg.cache_image_features and cfg.augment == "none"):
        return None
    method = choice.method
    if features is not None and method.image_input in FEATURE_INPUTS and \
            features.normalize != (method.image_input == "features"):
        raise ValueError(f"{choice.label} takes {'raw' if features.normalize else 'L2-normalised'} image "
                         "features: pass a FeatureStore(normalize=...) of that kind")
    return features


def _log_start(ctx: dist_utils.DistContext, plan: _TrainingPlan, resume: bool) -> None:
    cfg = plan.cfg
    _log(ctx, f"{plan.source.summary()}; {plan.choice.label}, training on {len(plan.train_view.train)} images of "
              f"{len(plan.trained)} classes ({cfg.shots} shots, seed {cfg.seed}, protocol {cfg.protocol}, world size "
              f"{ctx.world_size}, run {plan.run_id}{', resumed' if resume else ''})")
    for split, classes in plan.short.items():
        _log(ctx, f"warning: {split} classes with fewer than the shots asked (sampled with replacement): "
                  + ", ".join(f"{name} ({n})" for name, n in list(classes.items())[:10]))


def _stage1(plan: _TrainingPlan, bundle: ModelBundle, ctx: dist_utils.DistContext,
            resume: bool, cache=None) -> tuple[Any, dict[str, Any] | None]:
    """``(anchors (N, D) or None, the Stage I record)``: the interrupted run's anchors (``--resume``), the
    ``--anchors`` file, or Stage I run now; new anchors are saved to the run directory."""
    from ..io import load_anchors, save_anchors

    cfg, out = plan.cfg, plan.out
    saved_anchors = out / "anchors.safetensors"
    if not plan.method.needs_anchors:
        return None, None
    if resume and saved_anchors.is_file():
        anchors = load_anchors(saved_anchors, expected_width=_text_width(bundle.model))
        stage1 = read_json(out / R.STAGE1, f"{out / R.STAGE1} not found") if (out / R.STAGE1).is_file() else {}
        return anchors, {k: v for k, v in stage1.items() if k != "run_id"}
    if plan.given_anchors is not None:
        anchors = load_anchors(cfg.anchors, expected_width=_text_width(bundle.model))
        stage1 = {"anchors_from": cfg.anchors}
    else:
        anchors, stage1 = learn_anchors(bundle, plan.trained, cfg.descriptions, cfg, ctx, cache)
        if ctx.is_main:  # the other processes did not run Stage I (rank 0 broadcast the anchors)
            _log(ctx, f"Stage I: {stage1['steps']} steps, loss {stage1['loss_first']:.4f} -> "
                      f"{stage1['loss_last']:.4f}")
    if ctx.is_main:
        save_anchors(anchors, saved_anchors, classnames=plan.trained, run_id=plan.run_id)
        _files.write_json(out / R.STAGE1, {**stage1, "run_id": plan.run_id})
    return anchors, stage1


def _resume_point(learner: nn.Module, plan: _TrainingPlan, ctx: dist_utils.DistContext):
    """The interrupted run's last complete checkpoint, loaded into ``learner``: ``(trainer state, tensors)`` for
    :func:`train_stage2`, or ``None`` when there is none (Stage II starts again)."""
    from ..io import module_device

    found = R.latest_checkpoint(plan.out, plan.run_id)
    dist_utils.barrier(ctx)
    if found is None:
        _log(ctx, "no complete checkpoint: Stage II starts again from epoch 0"
                  + (" (Stage I anchors reused)" if plan.method.needs_anchors else ""))
        return None
    directory, trainer_state, trainer_tensors, weights = found
    device = module_device(learner)
    learner.load_state_dict({k: v.to(device) for k, v in weights.items()})
    _log(ctx, f"resuming from {directory} ({trainer_state['epochs_done']} of {plan.cfg.epochs} epochs done)")
    return trainer_state, trainer_tensors


def _checkpointer(learner: nn.Module, out: Path, run_id: str, cfg: RunConfig, ctx: dist_utils.DistContext):
    """``on_checkpoint(state, tensors)`` for :func:`train_stage2`: the last epoch always, every
    ``cfg.save_every`` epochs as ``epoch_<n>`` too (rank 0 only)."""

    def checkpoint(state: dict, tensors: dict) -> None:
        if not ctx.is_main:
            return
        done = state["epochs_done"]
        R.save_checkpoint(out / R.CHECKPOINTS / R.LAST_CHECKPOINT, learner, run_id, state, tensors)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.epochs:
            R.save_checkpoint(out / R.CHECKPOINTS / f"epoch_{done}", learner, run_id, state, tensors)

    return checkpoint


def _results_record(plan: _TrainingPlan, cfg: RunConfig, bundle: ModelBundle, ctx: dist_utils.DistContext,
                    settings, stage1: dict | None, stage2: dict | None, position=None) -> dict[str, Any]:
    """``results.json`` before evaluation: what ran, on what, with which settings (and AnchorOPT's learned
    arrangement, from its ``position`` matrix)."""
    results: dict[str, Any] = {
        "run_id": plan.run_id, "method": plan.choice.label,
        "protocol": cfg.protocol, "dataset": plan.source.name, "model": cfg.model,
        **weights_record(cfg.pretrained, bundle), "preset": cfg.preset, "recipe": cfg.recipe, "seed": cfg.seed,
        "shots": cfg.shots, "trained_classes": list(plan.trained),
        "world_size": ctx.world_size, "stage1": stage1, "stage2": stage2,
        "method_settings": settings.to_json(),
    }
    if position is not None:
        placed = position.anchors_placed()
        results["position"] = {"assignment": position.assignment().tolist(), "slots": position.describe()}
        results["anchors_placed"] = placed  # of position.n_anchor; 0: the test-time prompt has no anchor
        results["no_anchor_placed"] = placed == 0 and position.n_anchor > 0
    if plan.short:
        results["classes_short_of_shots"] = plan.short
    return results


def _position_of(learner: nn.Module):
    """The learner's AnchorOPT position matrix (its own, or inside a method's text prompt), or ``None``."""
    from ..position import PositionMatrix

    return next((m for m in learner.modules() if isinstance(m, PositionMatrix)), None)


def _write_results(results: dict, learner: nn.Module, bundle: ModelBundle, out: Path, plots: bool) -> None:
    """``results.json`` (last: it marks the run finished), the position-matrix plots, the summary line."""
    _files.write_json(out / RESULTS, results)
    shutil.rmtree(out / R.CHECKPOINTS / R.LAST_CHECKPOINT, ignore_errors=True)  # (prompt_)learner/ has it
    if plots:
        note = f"{RANDOM_FLAG}: this picture means nothing" if results["random_weights"] else None
        results["plots"] = _plots(learner, bundle, out, note)
    if "summary" in results:
        print(results["summary"], flush=True)


def _resumed_run_id(out: Path, cfg: RunConfig) -> str:
    """The id of the interrupted run in ``out``, after checking that ``cfg`` asks for the same run."""
    saved_values = read_json(out / RUN_CONFIG, f"{out / RUN_CONFIG} not found")
    run_id = saved_values.get("run_id") if isinstance(saved_values, dict) else None
    if run_id is None:
        raise R.RunDirectoryError(f"{out} was written by an anchoropt without run ids: it cannot be resumed safely; "
                                  "start over with --overwrite")
    saved = load_run_config(out)
    changed = sorted(k for k, v in dataclasses.asdict(cfg).items()
                     if k not in _RESUMABLE_CHANGES and dataclasses.asdict(saved).get(k) != v)
    if changed:
        diff = ", ".join(f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in changed[:6])
        raise R.RunDirectoryError(f"--resume: the run in {out} was started with other options ({diff}); resume "
                                  "with the same options, or start over with --overwrite")
    R.check_one_run(out)
    return run_id


def run_evaluation(run_dir: str | os.PathLike, overrides: dict | None = None, bundle: ModelBundle | None = None,
                   output: str | os.PathLike | None = None, sample_positions: bool = False) -> dict:
    """``anchoropt eval``: rebuild a finished run's model and splits, reload its learner, evaluate again.

    Refuses a directory whose parts come from different runs (run ids), one that a run is writing (lock), and
    checks the options, datasets and images before the model is built.

    Args:
        overrides: ``RunConfig`` fields to change (``targets``, ``protocol``, ``data``, ``eval_mode``,
            ``pretrained`` ...), e.g. new cross-dataset targets for a trained run.
        output: results file (``<run_dir>/eval_results.json`` by default).
        sample_positions: draw AnchorOPT's position matrix (Gumbel-max) at every evaluation batch of
            ``eval_batch_size`` images, as the released code's test does, instead of its row-wise argmax.
    """
    from .learners import load_run_learner, trained_classnames

    run_dir = Path(run_dir)
    cfg = dataclasses.replace(load_run_config(run_dir), **(overrides or {})).resolve()
    _check_dataset_paths(cfg)
    run_id = R.check_one_run(run_dir)
    trained = trained_classnames(run_dir)
    target = Path(output) if output else run_dir / "eval_results.json"
    R.check_writable(target.parent)
    source = _source_dataset(cfg)
    train_view, novel_view = _training_view(source, cfg)
    targets = _open_targets(cfg, trained)
    checks.check_images([*train_view.test, *(novel_view.test if novel_view else []),
                         *(r for t in targets for r in t.test)], "test", decode=True)
    checks.check_pretrained(cfg)
    ctx = dist_utils.init_from_env(cfg.device)
    with R.locked(run_dir, "anchoropt eval") if ctx.is_main else _nothing():
        if ctx.is_main and R.check_one_run(run_dir) != run_id:  # again under the lock: re-run meanwhile
            raise R.RunDirectoryError(f"{run_dir} was replaced by another run while eval got ready; run eval again")
        seed_everything(cfg.seed)
        bundle = bundle or build_model(cfg.model, cfg.pretrained, ctx.device, cfg.precision, "none")
        learner = load_run_learner(run_dir, bundle, train_view.classnames)
        if sample_positions and sample_positions_in_eval(learner) == 0:
            raise ValueError(f"sampled positions: the run in {run_dir} ({cfg.method}) has no learned position matrix "
                             "to sample (AnchorOPT runs have one)")
        results = {"protocol": cfg.protocol, "dataset": source.name, "model": cfg.model,
                   **weights_record(cfg.pretrained, bundle), "seed": cfg.seed, "shots": cfg.shots, "run": str(run_dir),
                   "run_id": run_id, "method": cfg.method,
                   "results": _evaluations(learner, bundle, cfg, ctx, train_view, novel_view, trained,
                                           cfg.method_choice().method)}
        if sample_positions:
            results["positions"] = f"sampled: one Gumbel-max draw per evaluation batch of {cfg.eval_batch_size} images"
        results["summary"] = summary_line(results)
        if ctx.is_main:
            _files.write_json(target, results)
            print(results["summary"], flush=True)
    dist_utils.cleanup(ctx)
    return results


def _nothing():
    import contextlib

    return contextlib.nullcontext()
