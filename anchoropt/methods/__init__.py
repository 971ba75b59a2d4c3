"""The base methods of the paper's Table 1 as small modules over the core, each with AnchorOPT as an option.

* :class:`CoCoOp` (:mod:`~anchoropt.methods.cocoop`) - meta-net bias on the context, one prompt per image;

Each takes ``template="coop"`` (the method alone) or ``"anchoropt"`` (the method + AnchorOPT: anchors, position
matrix, KD toward the anchor ensemble, the ensemble for novel classes) and runs on open_clip ``CLIP`` /
``CustomTextCLIP`` and OpenAI-``clip`` towers through the core's exact fast text path.  The shared surface
(``forward``, ``loss``, ``heads``, ``predict``, ``set_classnames``) is :class:`PromptMethod`'s.
"""

from .base import MODES, PromptMethod
from .cocoop import CoCoOp
from .text import TEMPLATES, ContextPrompt

__all__ = ["CoCoOp", "ContextPrompt", "MODES", "PromptMethod", "TEMPLATES"]
