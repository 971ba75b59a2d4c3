"""``anchoropt grid``: every method x dataset x seed under one protocol, resumable, shardable, one report.

Layout of ``OUT``::

    grid.json                    the grid's methods, datasets, seeds and protocol (the report's order)
    runs/<dataset>/<method>/seed<k>/   one ``anchoropt train`` run directory each
    features/<model key>.safetensors   frozen image features shared by all runs (``--augment none``)
    features/<model key>-raw.safetensors   the same, not L2-normalised, for DePT's runs
    stage1/<key>.safetensors     Stage I anchors shared by the AnchorOPT runs that learn the same ones
    results.json  table.md  hm.png     the report (:mod:`anchoropt.runner.tables`)

* **Resume**: a run whose ``results.json`` exists is skipped (its settings must match the grid's, else the
  grid stops and says which setting differs; ``--pretrained`` files with the same contents match, and the toy
  CLIP's default matches its shipped file named by path); an interrupted run started with the grid's settings continues
  from its last checkpoint (``anchoropt train --resume``); any other unfinished run directory is cleared (under
  its lock: never one another process is writing) and run again.  A ``results.json`` that cannot be read is
  refused by name, not taken for an interrupted run.
* **Shared image features**: with ``--augment none`` the image tower runs once per image for the whole grid.
* **Shared Stage I**: the AnchorOPT rows of one dataset and seed (CoOp / CoCoOp / MaPLe / DePT + AnchorOPT, an
  ablation) start Stage I from the same anchors with the same inputs; the first run learns them, the others read
  them (:mod:`.stage1_cache`: keyed on every input, so the anchors are the bits a fresh Stage I gives).
* **Parallel**: ``--jobs N`` runs N runs at once in local processes, the longest first (:mod:`.schedule`), each
  on its own GPU when there are several; under ``torchrun`` every run uses all processes (DDP) one after the other.
* **Beyond one machine**: ``--shard I/N`` runs the runs ``I, I + N, I + 2N, ...`` of the fixed run order
  (``I`` from 0, e.g. ``$SLURM_ARRAY_TASK_ID``), and ``anchoropt grid --report OUT`` merges what exists.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .. import _files
from ..datasets import folders as D
from .dataset_recipes import dataset_recipe
from . import rundir as R
from .config import RESULTS, RUN_CONFIG, RunConfig, _absolute_paths, load_run_config
from .schedule import estimated_work, longest_first
from .stage1_cache import Stage1Cache
from .console import _log
from .tables import record_from_results, write_report

__all__ = ["GridRun", "plan_grid", "parse_shard", "select_shard", "run_grid", "collect_records", "report_grid"]

GRID_FILE = "grid.json"
STAGE1_DIR = "stage1"
# settings that do not change a run's numbers (where it runs, how it logs)
_VOLATILE = {"output", "device", "workers", "progress", "plots", "save_every", "threads", "cache_image_features",
             "tensorboard"}


@dataclass(frozen=True)
class GridRun:
    """One cell of the grid."""

    method: str
    data: str
    dataset: str
    seed: int
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.dataset} / {self.method} / seed {self.seed}"

    @property
    def grid_dir(self) -> Path:
        """The grid's ``OUT`` (``run_dir`` is ``OUT/runs/<dataset>/<method>/seed<k>``, :func:`plan_grid`)."""
        return self.run_dir.parents[3]


def plan_grid(methods: Sequence[str], data: Sequence[str], seeds: Sequence[int], output: str | os.PathLike) -> list[GridRun]:
    """The runs in their fixed order (dataset, then method, then seed); dataset names are the folder names
    (``name_2`` ... when two folders share one).  A dataset is its resolved folder: the same folder given twice
    (``DIR`` and ``DIR/``, or through a symbolic link) is refused."""
    from ..methods.registry import parse_method

    if not methods or not data or not seeds:
        raise ValueError("a grid needs at least one method (--methods), one dataset (--data) and one seed (--seeds)")
    for group, values in (("methods", methods), ("data", data), ("seeds", seeds)):
        if len(set(values)) != len(values):
            raise ValueError(f"--{group} lists an entry twice: {list(values)}")
    choices = [parse_method(m) for m in methods]  # unknown methods / options fail here, before any run
    _check_distinct_datasets(data)
    names: list[str] = []
    for path in data:
        base, name, n = Path(path).name or "data", Path(path).name or "data", 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    runs = [GridRun(choice.label, str(path), name, int(seed), Path(output) / "runs" / name / choice.slug / f"seed{seed}")
            for path, name in zip(data, names) for choice in choices for seed in seeds]
    slugs = [r.run_dir for r in runs]
    if len(set(slugs)) != len(slugs):
        raise ValueError("two methods map to the same run directory name; make their specs differ in letters")
    return runs


def _check_distinct_datasets(data: Sequence[str]) -> None:
    """Refuse two ``--data`` entries naming one folder (``DIR`` and ``DIR/``, ``~/d`` and its absolute path, a
    symbolic link and its target): the grid would train and report the same dataset twice."""
    seen: dict[Path, str] = {}
    for path in data:
        resolved = Path(path).expanduser().resolve()
        if resolved in seen:
            raise ValueError(f"--data lists one dataset twice: {seen[resolved]!r} and {str(path)!r} are both "
                             f"{resolved}; give each dataset once")
        seen[resolved] = str(path)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard takes I/N (e.g. 0/4, the first of four shards), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard I/N needs N >= 1 and 0 <= I < N, got {text!r}")
    return index, count


def select_shard(runs: Sequence[GridRun], shard: tuple[int, int] | None) -> list[GridRun]:
    """Runs ``I, I + N, ...`` of the fixed order (every run in exactly one shard)."""
    if shard is None:
        return list(runs)
    index, count = shard
    return list(runs)[index::count]


def _run_config(base: RunConfig, run: GridRun) -> RunConfig:
    """The run's config: the grid's options with the run's method, dataset, seed and directory; a dataset's
    own ``descriptions.json`` serves Stage I when ``--descriptions`` is not given (the toy world writes one)."""
    cfg = dataclasses.replace(base, method=run.method, data=run.data, seed=run.seed, output=str(run.run_dir))
    cfg = dataset_recipe(cfg)  # the dataset's own preset and descriptions (runner/dataset_recipes.py)
    own = Path(run.data) / "descriptions.json"
    if not cfg.descriptions and not cfg.anchors and own.is_file():
        cfg = dataclasses.replace(cfg, descriptions=str(own))
    if cfg.augment == "none":
        cfg = dataclasses.replace(cfg, cache_image_features=True)
    return cfg


def _comparable(values: dict) -> dict:
    return {k: v for k, v in values.items() if k not in _VOLATILE}


def run_state(run: GridRun, cfg: RunConfig) -> str:
    """``"done"`` (results.json written with the same settings), ``"partial"`` or ``"new"``.

    Raises:
        ValueError: a finished run was made with other settings (naming the first that differs), or its
            ``results.json`` cannot be read (it is not taken for an interrupted run and deleted) or is another
            run's (its run id or seed differ).
    """
    results = run.run_dir / RESULTS
    if results.is_file():
        finished = _finished_results(results)
        foreign = _foreign_results(results, finished)
        if foreign:  # another run's results.json copied here: this run is not finished
            raise ValueError(f"{results} is not this run's own: {foreign} (or delete {run.run_dir} to redo it)")
        wanted = _comparable(_absolute_paths(cfg.resolve()).to_json())
        stored = _comparable(load_run_config(run.run_dir).to_json())
        stored.pop("n_anchor", None), wanted.pop("n_anchor", None)  # set from the anchors file
        if _same_weights(cfg.model, wanted.get("pretrained"), stored.get("pretrained")):
            stored.pop("pretrained", None), wanted.pop("pretrained", None)
        for key in sorted(set(wanted) | set(stored)):
            if wanted.get(key) != stored.get(key):
                raise ValueError(
                    f"{run.run_dir} was finished with {key}={stored.get(key)!r}, but this grid asks for "
                    f"{key}={wanted.get(key)!r}: use another --output, or delete that run directory to redo it"
                )
        return "done"
    return "partial" if run.run_dir.exists() else "new"


def _same_weights(model: str, wanted: str | None, stored: str | None) -> bool:
    """Whether two ``--pretrained`` settings name the same weights though spelled differently: two files with
    the same contents, the toy CLIP's default (``None``) being its shipped file."""
    from ..toyworld.model import shipped_weights
    from .models import TOY_MODEL

    def weights_file(value: str | None) -> Path | None:
        if value is None and model == TOY_MODEL:
            return shipped_weights()
        return Path(value) if value and Path(value).is_file() else None

    if wanted == stored:
        return False  # nothing to reconcile: the plain comparison decides
    files = weights_file(wanted), weights_file(stored)
    return None not in files and _digest(files[0]) == _digest(files[1])


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    from ..toyworld.model import sha256_file

    return sha256_file(path)


def _digest(path: Path) -> str:
    """The file's sha256, computed once per file version (a grid compares one checkpoint for every run)."""
    stat = path.stat()
    return _file_digest(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _finished_results(results: Path) -> dict:
    """The content of a finished run's ``results.json``; a file that cannot be read, or holds no ``results``,
    is refused by name (the run may well have finished: redoing it would delete what it wrote)."""
    from .._jsonfile import read_json

    fix = (f"restore it, or delete {results.parent} to run it again (nothing is deleted without you saying "
           "so)")
    try:
        finished = read_json(results, f"{results} not found")
    except (OSError, ValueError) as err:
        raise ValueError(f"{results} is damaged ({err}): {fix}") from None
    if not isinstance(finished, dict) or not isinstance(finished.get("results"), dict):
        raise ValueError(f"{results} holds no 'results' (not a finished grid run's file): {fix}")
    return finished


def resumable(run: GridRun, cfg: RunConfig) -> bool:
    """Whether ``run``'s directory holds an interrupted run started with ``cfg`` and a complete checkpoint of it
    (then it continues from there, bit-exactly on one process).  Without a checkpoint starting over gives the
    fresh run's numbers, which a resume without one would not; a directory the runner refuses to resume
    (other options, no run id, mixed parts) is not resumable either."""
    from . import rundir as R
    from .run import _resumed_run_id

    if R.run_state(run.run_dir) != "interrupted":
        return False
    try:
        run_id = _resumed_run_id(run.run_dir, _absolute_paths(cfg.resolve()))
    except (R.RunDirectoryError, ValueError, OSError):
        return False
    return R.latest_checkpoint(run.run_dir, run_id) is not None


def run_grid(
    base: RunConfig,
    methods: Sequence[str],
    data: Sequence[str],
    seeds: Sequence[int],
    output: str | os.PathLike,
    jobs: int = 1,
    shard: str | None = None,
    plot: bool = True,
    threads: int | None = None,
    paper: bool = False,
) -> dict:
    """Run (the shard of) the grid, skipping finished runs, then write the report of everything in ``output``.

    ``base`` holds ``anchoropt train``'s options (protocol, targets, model, epochs ...); each run gets its
    method, dataset, seed and run directory.  ``threads``: torch threads of each ``--jobs`` worker (default:
    the cores divided by ``jobs``).  Returns ``{"ran": [...], "skipped": [...], "report": {...}}``.
    """
    from . import distributed as dist_utils

    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    output = Path(output)
    runs = plan_grid(methods, data, seeds, output)
    mine = select_shard(runs, parse_shard(shard))
    for run in mine:  # every setting checked before the first run starts
        _run_config(base, run).resolve()
    ctx = dist_utils.init_from_env(base.device)
    if ctx.distributed and jobs > 1:
        raise ValueError("under torchrun every run already uses all processes (DDP): leave --jobs at 1")
    states = {run: run_state(run, _run_config(base, run)) for run in mine}
    todo = [run for run in mine if states[run] != "done"]
    skipped = [run for run in mine if states[run] == "done"]
    if ctx.is_main:
        _files.write_json(output / GRID_FILE, grid_spec(base, methods, data, seeds, runs))  # atomic, makes output/
        partial = [run for run in todo if states[run] == "partial"]
        resumed = [run for run in partial if resumable(run, _run_config(base, run))]
        _log(ctx, f"grid: {len(runs)} runs ({len(mine)} in this shard): {len(skipped)} finished, "
                  f"{len(todo)} to run" + (f" ({len(partial)} interrupted: {len(resumed)} resumed, "
                                           f"{len(partial) - len(resumed)} redone)" if partial else ""))
        for run in partial:
            if run not in resumed:  # under the run's lock: a directory another process is writing is refused
                R.clear_unfinished(run.run_dir, "anchoropt grid (clearing an unfinished run)")
    dist_utils.barrier(ctx)
    store_file = None
    if todo and base.augment == "none":
        store_file = _prepare_features(base, todo, output, ctx)
    if jobs == 1 or len(todo) <= 1:
        _run_sequential(base, todo, store_file, ctx)
    else:  # longest first, so no worker idles at the end while another finishes a long run
        work = {run: estimated_work(_run_config(base, run)) for run in todo}
        _run_pool(base, longest_first(todo, work.__getitem__), store_file, jobs, threads)
    report = report_grid(output, plot=plot, paper=paper) if ctx.is_main else {}
    if ctx.distributed:
        dist_utils.cleanup(ctx)
    return {"ran": [r.name for r in todo], "skipped": [r.name for r in skipped], "report": report}


def grid_spec(base: RunConfig, methods: Sequence[str], data: Sequence[str], seeds: Sequence[int],
              runs: Sequence[GridRun]) -> dict:
    """``grid.json``: the report's order (methods, datasets, seeds) and what ``anchoropt grid --config`` needs
    to run the same grid again: ``config`` (the runs' shared settings, paths absolute) and ``data_dirs``."""
    return {"methods": list(methods), "data": [str(d) for d in data], "datasets": _names(runs),
            "seeds": list(seeds), "protocol": base.protocol, "targets": list(base.targets),
            "data_dirs": [os.path.abspath(Path(d).expanduser()) for d in data],
            "config": _absolute_paths(base).to_json()}


def _names(runs: Sequence[GridRun]) -> list[str]:
    return list(dict.fromkeys(r.dataset for r in runs))


def _records_needing_features(cfg: RunConfig) -> list[D.Record]:
    """The images a run reads: its K-shot training images and the test images it is scored on."""
    from .protocols import _open_targets, _source_dataset, _training_view

    cfg = cfg.resolve()
    source = _source_dataset(cfg)
    train_view, novel_view = _training_view(source, cfg)
    records = list(train_view.train) + list(train_view.test)
    if novel_view is not None:
        records += list(novel_view.test)
    for target in _open_targets(cfg, train_view.classnames):
        records += list(target.test)
    return records


def _feature_file(base: RunConfig, output: Path) -> Path:
    from .features import feature_key

    return output / "features" / f"{feature_key(base.model, base.pretrained, base.precision)}.safetensors"


def _raw_twin(file: Path) -> Path:
    """The raw (not normalised) features' file next to the normalised ones' (:func:`feature_key`'s suffix)."""
    from .features import RAW_SUFFIX

    return file.with_name(f"{file.stem}{RAW_SUFFIX}{file.suffix}")


def _wants_raw(cfg: RunConfig) -> bool:
    return cfg.method_choice().method.image_input == "raw_features"


def _prepare_features(base: RunConfig, todo: Sequence[GridRun], output: Path, ctx) -> Path:
    """Encode every image the remaining runs need once (rank 0) and save the shared feature file(s): the
    L2-normalised features for every run (unless all are DePT's), the raw ones for DePT's runs."""
    from . import distributed as dist_utils
    from .features import FeatureStore

    file = _feature_file(base, output)
    if ctx.is_main:
        bundle = _bundle(base, ctx.device)
        records: list[D.Record] = []
        raw_records: list[D.Record] = []
        for run in todo:
            cfg = _run_config(base, run)
            needed = _records_needing_features(cfg)
            records += needed
            raw_records += needed if _wants_raw(cfg) else []
        kinds = [(True, file, records)] if len(raw_records) < len(records) else []
        kinds += [(False, _raw_twin(file), raw_records)] if raw_records else []
        for normalize, path, wanted in kinds:
            store = FeatureStore(bundle, path, batch_size=base.eval_batch_size, workers=base.workers,
                                 normalize=normalize)
            added = store.add(wanted)
            if added:
                store.save()
            _log(ctx, f"grid: image features of {len(store)} images in {path} ({added} encoded now)")
    dist_utils.barrier(ctx)
    return file


_BUNDLES: dict = {}


def _bundle(cfg: RunConfig, device):
    """The frozen model for ``cfg`` (built once per process)."""
    from .models import build_model

    key = (cfg.model, cfg.pretrained, cfg.precision, str(device), cfg.augment)
    if key not in _BUNDLES:
        _BUNDLES[key] = build_model(cfg.model, cfg.pretrained, device, cfg.precision, cfg.augment)
    return _BUNDLES[key]


def _run_one(base: RunConfig, run: GridRun, store_file: Path | None, ctx=None, device: str | None = None) -> str:
    from .features import FeatureStore
    from .run import run_training

    cfg = _run_config(base, run)
    if device is not None:
        cfg = dataclasses.replace(cfg, device=device)
    bundle_device = ctx.device if ctx is not None else (device or _default_device())
    bundle = _bundle(cfg, bundle_device)
    features = None
    if store_file is not None:
        raw = _wants_raw(cfg)
        file = _raw_twin(store_file) if raw else store_file
        features = _STORES.get(str(file))
        if features is None:
            features = _STORES[str(file)] = FeatureStore(bundle, file, batch_size=cfg.eval_batch_size,
                                                         normalize=not raw)
    from . import rundir as R

    if R.run_state(run.run_dir) == "finished" and run_state(run, cfg) == "done":
        return run.name  # finished meanwhile by another process (a second grid on the same --output)
    # run_grid cleared every unfinished directory it could not resume: what is still interrupted continues
    run_training(cfg, bundle=bundle, ctx=ctx, features=features, resume=R.run_state(run.run_dir) == "interrupted",
                 stage1_cache=Stage1Cache(run.grid_dir / STAGE1_DIR))
    return run.name


_STORES: dict = {}


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_sequential(base: RunConfig, todo: Sequence[GridRun], store_file: Path | None, ctx) -> None:
    for i, run in enumerate(todo):
        _log(ctx, f"grid: run {i + 1}/{len(todo)}: {run.name}")
        _run_one(base, run, store_file, ctx=ctx)


def _worker(base_json: dict, run: GridRun, store_file: str | None, device: str | None, threads: int | None) -> str:
    import torch

    if threads:
        torch.set_num_threads(threads)
    return _run_one(RunConfig.from_json(base_json), run, Path(store_file) if store_file else None, device=device)


def _run_pool(base: RunConfig, todo: Sequence[GridRun], store_file: Path | None, jobs: int,
              threads: int | None = None) -> None:
    """``jobs`` local processes (spawned); with several GPUs run ``i`` goes to GPU ``i % count``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch

    gpus = torch.cuda.device_count() if base.device in (None, "cuda") else 0
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {
            pool.submit(_worker, base.to_json(), run, str(store_file) if store_file else None,
                        f"cuda:{i % gpus}" if gpus > 1 else None, threads): run
            for i, run in enumerate(todo)
        }
        failures = []
        for future in as_completed(futures):
            run = futures[future]
            try:
                print(f"grid: finished {future.result()}", file=sys.stderr, flush=True)
            except Exception as err:  # one failed run does not stop the others; all are reported
                failures.append(f"{run.name}: {type(err).__name__}: {err}")
                print(f"grid: FAILED {run.name}: {err}", file=sys.stderr, flush=True)
    if failures:
        raise RuntimeError(f"{len(failures)} grid run(s) failed (the others finished; rerun to retry): "
                           + "; ".join(failures))


def collect_records(output: str | os.PathLike) -> list[dict]:
    """One record per finished run under ``output/runs`` (unfinished runs are left out).

    A record's dataset is the grid's name of it (the ``runs/<dataset>/`` folder, unique per dataset folder),
    not the dataset's folder name, which two datasets may share.  A ``results.json`` that is not its run
    directory's own (its run id differs from ``run_config.json``'s, or its seed from the ``seed<k>`` folder's:
    a file copied from another run) is left out with a warning naming it.
    """
    records = []
    for results in sorted(Path(output).glob(f"runs/*/*/seed*/{RESULTS}")):
        try:
            data = json.loads(results.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "results" in data:
            foreign = _foreign_results(results, data)
            if foreign:
                warnings.warn(f"grid report: leaving out {results}: {foreign}", stacklevel=2)
                continue
            method = data.get("method") or _method_of(results.parent)
            record = record_from_results(data, str(results.parent), method)
            record["dataset"] = results.parent.parent.parent.name
            records.append(record)
    return records


def _foreign_results(results: Path, data: dict) -> str | None:
    """Why ``results`` is not the result of the run in its directory (``None`` when it is)."""
    from .._jsonfile import read_json

    run_dir = results.parent
    seed = run_dir.name[len("seed"):]
    if str(data.get("seed")) != seed:
        return (f"it is the result of seed {data.get('seed')!r}, but lies in {run_dir.name}/ (copied from another "
                "run?); move it back or re-run this one")
    config = run_dir / RUN_CONFIG
    if "run_id" not in data and not config.is_file():
        return None  # written before run ids
    try:
        own = read_json(config, f"{config} not found").get("run_id")
    except (OSError, ValueError, AttributeError) as err:
        return f"its run's {RUN_CONFIG} cannot be read ({err})"
    if data.get("run_id") != own:
        return (f"its run id {data.get('run_id')!r} is not the run id {own!r} of {config} (copied from another "
                "run?); re-run this one")
    return None


def _method_of(run_dir: Path) -> str:
    cfg_file = run_dir / RUN_CONFIG
    return load_run_config(run_dir).method if cfg_file.is_file() else "coop+anchoropt"


def report_grid(output: str | os.PathLike, plot: bool = True, paper: bool = False) -> dict:
    """``anchoropt grid --report OUT``: merge every finished run into results.json, table.md, table.csv,
    table.tex and hm.png; ``paper``: the paper's Table 1 numbers beside each row it has (``--paper``)."""
    output = Path(output)
    if not (output / "runs").is_dir():
        raise FileNotFoundError(f"{output} holds no runs/ directory: is it the --output of an `anchoropt grid`?")
    spec = _read_grid_spec(output / GRID_FILE)
    records = collect_records(output)
    written = write_report(output, records, spec.get("methods", ()), spec.get("datasets", ()), plot=plot,
                           paper=paper)
    print(f"grid report: {len(records)} finished runs -> {written['table']}, {written['csv']}, {written['tex']}",
          flush=True)
    if paper:
        print(f"grid report: {written['paper_rows']} row(s) beside the paper's Table 1 (arXiv 2511.21188)"
              + ("" if written["paper_rows"] else ": none of the grid's methods and datasets is in it (datasets "
                 "are matched by folder name, e.g. caltech-101, oxford_pets; methods by spec, e.g. coop+anchoropt)"),
              flush=True)
    return written


def _read_grid_spec(path: Path) -> dict:
    """The grid's ``grid.json`` (``{}`` when absent): a JSON object whose ``methods`` and ``datasets`` are lists
    of names; a damaged or hand-edited file is refused with a message naming it."""
    from .._jsonfile import read_json

    if not path.is_file():
        return {}
    spec = read_json(path, f"{path} not found")
    if not isinstance(spec, dict):
        raise ValueError(f"{path} must be a JSON object with the grid's methods, datasets and seeds, got a "
                         f"{type(spec).__name__}: restore it or delete it (the report then orders rows as found)")
    for key in ("methods", "datasets"):
        value = spec.get(key, [])
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{path}: {key!r} must be a list of names, got {value!r}: restore it or delete the "
                             "file (the report then orders rows as found)")
    return spec
