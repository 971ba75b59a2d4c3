"""anchoropt: AnchorOPT (dynamic anchor prompt learning for CLIP) for open_clip and the CoOp family.

Public names only; ``import anchoropt`` does not import open_clip.
"""

from ._version import __version__
from .anchors import AnchorLearner, DescriptionTargets
from .descriptions import DescriptionsError, load_descriptions
from .position import ARRANGEMENTS, PositionMatrix
from .prompts import AnchorOPTPromptLearner
from .template import AnchorPromptTemplate, default_tokenizer
from .towers import TextTower, UnsupportedTowerError

__all__ = [
    "__version__",
    "AnchorLearner",
    "AnchorOPTPromptLearner",
    "AnchorPromptTemplate",
    "ARRANGEMENTS",
    "DescriptionTargets",
    "DescriptionsError",
    "PositionMatrix",
    "TextTower",
    "UnsupportedTowerError",
    "default_tokenizer",
    "load_descriptions",
]
