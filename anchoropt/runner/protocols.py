"""The evaluation protocols: which datasets and classes a run trains on and is scored on."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from ..datasets import dassl_fewshot
from ..datasets import folders as D
from ..datasets import layouts
from .config import RunConfig
from .evaluation import evaluate as _evaluate
from .evaluation import harmonic_mean


def _source_dataset(cfg: RunConfig) -> D.DatasetSplits:
    if not cfg.data:
        raise ValueError("no dataset: pass --data DIR (an ImageFolder directory or a CoOp dataset directory)")
    return layouts.open_dataset(cfg.data, split_json=cfg.split_json, image_root=cfg.image_root,
                                classnames_file=cfg.classnames_file, holdout=True, p_train=cfg.p_train,
                                p_val=cfg.p_val, split_seed=cfg.split_seed)


def _target_dataset(path: str, cfg: RunConfig) -> D.DatasetSplits:
    return layouts.open_dataset(path, holdout=False, split_seed=cfg.split_seed)


def _few_shot(source: D.DatasetSplits, cfg: RunConfig) -> D.DatasetSplits:
    """:func:`~anchoropt.datasets.folders.sample_few_shot` without its shortage warnings: the runner reports the
    training split's shortage itself, once (:func:`.checks.short_class_report`), and never uses the val split."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*class\(es\) have fewer than", category=UserWarning)
        return D.sample_few_shot(source, cfg.shots, cfg.seed)


def _training_view(source: D.DatasetSplits, cfg: RunConfig) -> tuple[D.DatasetSplits, D.DatasetSplits | None]:
    """The (K-shot, subsampled) training dataset and, for base-to-novel, the novel view."""
    if cfg.shots_from == "dassl" and cfg.shots >= 1:  # the images Dassl drew for the seed
        few = dassl_fewshot.dassl_few_shot(source, cfg.shots, cfg.seed)
    else:
        few = _few_shot(source, cfg)
    if cfg.protocol == "base2novel":
        if source.n_classes < 2:
            raise ValueError("base-to-novel needs at least two classes")
        return D.subsample_classes(few, "base"), D.subsample_classes(few, "new")
    return few, None


def _headline(mode: str, classnames: Sequence[str], trained: Sequence[str], method=None):
    """The evaluation mode (``base`` / ``novel`` / ``anchor``) for ``classnames`` and, with a registry
    method, ``(mode, head)``: the head that scores them."""
    seen = set(classnames) <= set(trained)
    name = mode if mode != "auto" else ("base" if seen else "novel")
    return name if method is None else (name, method.head(seen, mode))


def _open_targets(cfg: RunConfig, trained: Sequence[str]) -> list[D.DatasetSplits]:
    """The target datasets, checked against the protocol (before any training is spent)."""
    targets = []
    for path in cfg.targets:
        target = _target_dataset(path, cfg)
        unknown = sorted(set(target.classnames) - set(trained))
        if cfg.protocol == "domain-generalization" and unknown:
            raise ValueError(
                f"domain generalisation needs the target's classes among the source's: {target.name} has "
                f"{len(unknown)} unknown class(es), e.g. {unknown[:5]} (use --protocol cross-dataset, or a "
                "classnames.txt in the target folder mapping its folders to source class names)"
            )
        if not target.test:
            raise ValueError(f"target {path} has no test images")
        targets.append(target)
    return targets


def _evaluations(learner, bundle, cfg, ctx, train_view, novel_view, trained, method=None, features=None) -> dict:
    """Run the protocol's evaluations; returns the ``results`` part of results.json.

    ``method``: the run's :class:`~anchoropt.methods.registry.Method` (picks the head per class set); ``features``: a
    shared :class:`~anchoropt.runner.features.FeatureStore` for the frozen image features.
    """
    out: dict[str, Any] = {}
    image_input = method.image_input if method is not None else "features"

    def evaluate(learner, bundle, records, classnames, cfg, ctx, headline, description):
        mode, head = headline if isinstance(headline, tuple) else (headline, headline)
        return _evaluate(learner, bundle, records, classnames, cfg, ctx, head, description, features, image_input,
                         mode=mode)

    if cfg.protocol == "base2novel":
        base = evaluate(learner, bundle, train_view.test, train_view.classnames, cfg, ctx,
                        _headline(cfg.eval_mode, train_view.classnames, trained, method), "eval base")
        novel = evaluate(learner, bundle, novel_view.test, novel_view.classnames, cfg, ctx,
                         _headline(cfg.eval_mode, novel_view.classnames, trained, method), "eval novel")
        out.update(base=base, novel=novel, hm=round(harmonic_mean(base["accuracy"], novel["accuracy"]), 4))
        return out
    out["source"] = evaluate(learner, bundle, train_view.test, train_view.classnames, cfg, ctx,
                             _headline(cfg.eval_mode, train_view.classnames, trained, method), "eval source")
    out["targets"] = {}
    for path, target in zip(cfg.targets, _open_targets(cfg, trained)):
        name = _unique_key(target.name, out["targets"])
        out["targets"][name] = evaluate(learner, bundle, target.test, target.classnames, cfg, ctx,
                                        _headline(cfg.eval_mode, target.classnames, trained, method), f"eval {name}")
        out["targets"][name]["path"] = str(path)
    accs = [r["accuracy"] for r in out["targets"].values()]
    out["target_mean"] = round(sum(accs) / len(accs), 4) if accs else None
    return out


def _unique_key(name: str, taken: dict) -> str:
    key, n = name, 2
    while key in taken:
        key, n = f"{name}_{n}", n + 1
    return key
