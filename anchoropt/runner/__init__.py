"""The experiment runner behind ``anchoropt learn-anchors | train | eval | plot`` (see :mod:`anchoropt.runner.cli`).

Protocols (Dassl / CoOp conventions, :mod:`anchoropt.datasets.folders`):

* ``base2novel`` - the first ``ceil(C / 2)`` classes are base, the rest novel; Stage I learns the anchors
  from the base classes' descriptions; Stage II trains on K shots per base class; base classes are scored
  with the normal prompt, novel classes with the normal + anchor ensemble; the harmonic mean is reported.
* ``cross-dataset`` - train on all classes of the source dataset, evaluate on the source's test split and
  on every target dataset (its own classes).
* ``domain-generalization`` - train on all classes of the source, evaluate on target folders whose class
  names are source class names (ImageNet -> -V2 / -Sketch / -A / -R style).

Every evaluation reports the accuracy of the normal prompt, of the anchor prompt alone and of their
ensemble; the headline number uses the normal prompt for classes seen in training and the ensemble for
unseen ones (``eval_mode="auto"``), as the paper's inference switch.

Axes: ``B`` images, ``C`` classes, ``E`` joint-embedding width.

Modules, one job each: :mod:`~anchoropt.runner.config` (:class:`RunConfig`), :mod:`~anchoropt.runner.models`
(frozen CLIP, transforms, image features), :mod:`~anchoropt.runner.training` (Stage I and II),
:mod:`~anchoropt.runner.evaluation` (accuracies), :mod:`~anchoropt.runner.protocols` (what is trained and
scored), :mod:`~anchoropt.runner.reports` (summary line, plots), :mod:`~anchoropt.runner.console` (logs,
progress bars), :mod:`~anchoropt.runner.run` (whole runs), :mod:`~anchoropt.runner.learners` (a run's learner from its
method), :mod:`~anchoropt.runner.features` (shared image features), :mod:`~anchoropt.runner.grid` and
:mod:`~anchoropt.runner.tables` (``anchoropt grid`` and its report) and :mod:`~anchoropt.runner.cli` (the commands).
Their public names are re-exported here.
"""

from .config import AUGMENTATIONS, EVAL_MODES, PROTOCOLS, RESULTS, RUN_CONFIG, RunConfig, load_run_config
from .evaluation import evaluate, harmonic_mean
from .features import FeatureStore
from .grid import report_grid, run_grid
from .models import TINY_MODELS, ModelBundle, build_model, encode_images, eval_transform, train_transform
from .reports import summary_line
from .run import RunResult, run_evaluation, run_learn_anchors, run_training
from .training import StepTimer, epoch_lr, learn_anchors, seed_everything, train_stage2

__all__ = [
    "PROTOCOLS",
    "TINY_MODELS",
    "RunConfig",
    "ModelBundle",
    "RunResult",
    "build_model",
    "train_transform",
    "eval_transform",
    "seed_everything",
    "encode_images",
    "StepTimer",
    "learn_anchors",
    "train_stage2",
    "evaluate",
    "run_training",
    "run_learn_anchors",
    "run_evaluation",
    "harmonic_mean",
    "AUGMENTATIONS",
    "EVAL_MODES",
    "RESULTS",
    "RUN_CONFIG",
    "epoch_lr",
    "load_run_config",
    "summary_line",
    "FeatureStore",
    "run_grid",
    "report_grid",
]
