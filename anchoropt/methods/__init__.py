"""Every method built on the core's blocks, and the registry that names them (``docs/architecture.md``).

* :mod:`~anchoropt.methods.baselines` - zero-shot CLIP, CoOp (``SoftPromptLearner``) and ATPrompt's template;
* :mod:`~anchoropt.methods.registry` - a method's name -> how its learner is built, trained and scored, with
  :mod:`~anchoropt.methods.entries` (the entries below) and :mod:`~anchoropt.methods.presets` (released recipes);
* :mod:`~anchoropt.methods.one_stage` (the paper's one-stage variant), :mod:`~anchoropt.methods.pae` (PAE's
  Koopman-Lyapunov regulariser) and :mod:`~anchoropt.methods.mpa` (its mask search);
* the base methods of the paper's Table 1 as small modules, each with AnchorOPT as an option:

* :class:`PromptMethod` on its own is CoOp (the learned prompt, the same for every image);
* :class:`CoCoOp` (:mod:`~anchoropt.methods.cocoop`) - meta-net bias on the context, one prompt per image;
* :class:`MaPLe` (:mod:`~anchoropt.methods.maple`) - deep text prompts coupled to deep vision prompts on open_clip's
  text transformers and ViT image towers (open_clip's own, timm ViT / Eva trunks; images in);
* :class:`DePT` (:mod:`~anchoropt.methods.dept`) - channel-wise transformation + linear-probe head fused with a
  base method (CoOp, CoCoOp or MaPLe);

Each takes ``template="coop"`` (the method alone), ``"atprompt"`` (on ATPrompt's attribute template) or
``"anchoropt"`` (the method + AnchorOPT: anchors, position matrix, KD toward the anchor ensemble, the ensemble for
novel classes) and runs on open_clip ``CLIP`` /
``CustomTextCLIP`` and OpenAI-``clip`` towers through the core's exact fast text path.  The shared surface
(``forward``, ``loss``, ``heads``, ``predict``, ``set_classnames``) is :class:`PromptMethod`'s.

Importing this package registers ``cocoop``, ``maple``, ``dept`` and their ``+atprompt`` / ``+anchoropt`` variants
in :mod:`anchoropt.methods.registry` (:mod:`~anchoropt.methods.entries`).
"""

from . import entries
from .base import MODES, MethodOutput, PromptMethod
from .cocoop import CoCoOp
from .dept import DePT, FiLM
from .maple import MaPLe
from .text import TEMPLATES, ContextPrompt

__all__ = [
    "CoCoOp", "ContextPrompt", "DePT", "FiLM", "MaPLe", "MethodOutput", "MODES", "PromptMethod", "TEMPLATES", "entries",
]
