"""``anchoropt`` console script (also ``python -m anchoropt``): the experiment runner's commands.

The parser and the sub-commands live in :mod:`anchoropt.runner.cli`; this module is the entry point
(``anchoropt = "anchoropt.cli:main"``) and re-exports :func:`main` and :func:`build_parser`.
"""

from __future__ import annotations

import sys

from .runner.cli import build_parser, main

__all__ = ["main", "build_parser"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
