"""Adapter shims: AnchorOPT inside existing CoOp / CoCoOp / MaPLe / DePT code (Dassl trainers, OpenAI ``clip``).

One module per method, each with the same two entry points:

* ``patch(trainer_module, anchors=..., **options) -> ClassPatch`` - before ``trainer.build_model()``: replaces the
  module's prompt-learner class by a subclass that attaches AnchorOPT right after the peer's ``__init__``;
* ``wrap(prompt_learner, clip_model=..., classnames=..., anchors=..., owner=None, **options) -> AnchorOPTInjection``
  - for a model that is already built.

The injection lives at ``prompt_learner.anchoropt`` (find it with :func:`find`), so the peers' optimizers,
freezing by name and checkpoints include it.  It is also the handle: ``loss(labels, ...)`` inside
``forward_backward``, ``predict(logits)`` / ``set_mode("base" | "novel")`` at test time, ``remove()``.

:func:`accelerate` (independent of the shims) makes a CoOp / CoCoOp / MaPLe / DePT ``TextEncoder`` use anchoropt's
exact fast text path (stop at the last EOT; shared prefix computed once; CoCoOp's images in one pass) - with or
without AnchorOPT (the shims' loss then reads the text features from it).

Modules: :mod:`~anchoropt.adapters.base` (:class:`AnchorOPTInjection`, the prompt block every shim attaches),
:mod:`~anchoropt.adapters.inputs` (what a shim reads from the peer and the user, checked),
:mod:`~anchoropt.adapters.patching` (the class-level ``patch()``), :mod:`~anchoropt.adapters.dassl` (Dassl config
glue), :mod:`~anchoropt.adapters.fast_text` (:func:`accelerate`) and one module per peer.

>>> import anchoropt.adapters as adapters
>>> sorted(adapters.METHODS)
['cocoop', 'coop', 'dept', 'maple']
"""

from . import cocoop, coop, dassl, dept, maple
from .base import CHILD_NAME, AnchorOPTInjection, find
from .inputs import shift_token_ids
from .patching import ClassPatch
from .cocoop import CoCoOpInjection
from .coop import CoOpInjection
from .fast_text import FastTextEncoder, accelerate
from .maple import MaPLeInjection

METHODS = {"coop": coop, "cocoop": cocoop, "maple": maple, "dept": dept}
"""Method name -> shim module (each has ``patch`` and ``wrap``)."""

__all__ = [
    "AnchorOPTInjection",
    "CHILD_NAME",
    "ClassPatch",
    "CoCoOpInjection",
    "CoOpInjection",
    "FastTextEncoder",
    "MaPLeInjection",
    "METHODS",
    "accelerate",
    "cocoop",
    "coop",
    "dassl",
    "dept",
    "find",
    "maple",
    "shift_token_ids",
]
