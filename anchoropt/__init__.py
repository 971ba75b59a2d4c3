"""anchoropt: AnchorOPT (dynamic anchor prompt learning for CLIP) for open_clip and the CoOp family.

Public names only; ``import anchoropt`` does not import open_clip.
"""

from . import _moved
from ._version import __version__
from .anchors import AnchorLearner, DescriptionTargets
from .methods.baselines import SoftPromptLearner, ZeroShotClassifier
from .deep import DeepAnchorHooks, DeepPrompts, attach_deep
from .descriptions import DescriptionsError, load_descriptions
from .io import load_anchors, save_anchors, save_prompt_learner
from .losses import StageIILoss, StageIILossConfig
from .official import load_official_anchors
from .methods.one_stage import OneStageTrainer
from .methods.pae import KoopmanLyapunov
from .position import ARRANGEMENTS, PositionMatrix
from .prompts import AnchorOPTPromptLearner, load_prompt_learner
from .template import AnchorPromptTemplate, PromptTemplate, default_tokenizer
from .towers import TextTower, UnsupportedTowerError

__all__ = [
    "__version__",
    "AnchorLearner",
    "AnchorOPTPromptLearner",
    "AnchorPromptTemplate",
    "ARRANGEMENTS",
    "DeepAnchorHooks",
    "DeepPrompts",
    "DescriptionTargets",
    "DescriptionsError",
    "KoopmanLyapunov",
    "OneStageTrainer",
    "PositionMatrix",
    "PromptTemplate",
    "SoftPromptLearner",
    "StageIILoss",
    "StageIILossConfig",
    "TextTower",
    "UnsupportedTowerError",
    "ZeroShotClassifier",
    "attach_deep",
    "default_tokenizer",
    "load_anchors",
    "load_descriptions",
    "load_official_anchors",
    "load_prompt_learner",
    "save_anchors",
    "save_prompt_learner",
]

_moved.install()  # old module paths (anchoropt.methods.registry, anchoropt.datasets.folders, ...) for one release, with a warning
__getattr__ = _moved.package_getattr(__name__)
