"""Dataset readers: the layouts researchers keep their images in, read into :class:`DatasetSplits`.

:mod:`~anchoropt.datasets.layouts`: every layout of CoOp's DATASETS.md, recognised by its files
(``open_dataset`` here is that module's); :mod:`~anchoropt.datasets.dassl_fewshot`: Dassl's few-shot files.

:mod:`~anchoropt.datasets.folders`: ImageFolder directories, CoOp split files (``split_zhou_*.json``) and
``classnames.txt`` mappings, plus the field's protocols over them (Dassl's few-shot sampling, the base / novel
class split).  The runner, the toy world and the demo read every dataset through here; nothing here imports
open_clip or any other part of the package but the core's JSON and description helpers.
"""

from .folders import *  # noqa: F401,F403  (the public names of folders.py, listed in its __all__)
from .folders import __all__ as _folders_all
from .layouts import LAYOUTS, LayoutError, detect_layout, open_dataset  # every CoOp layout (a superset)

__all__ = [*_folders_all, "LAYOUTS", "LayoutError", "detect_layout"]
