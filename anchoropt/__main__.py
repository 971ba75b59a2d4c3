"""``python -m anchoropt``: the experiment runner (same as the ``anchoropt`` console script)."""

import sys

from .runner.cli import main

if __name__ == "__main__":
    sys.exit(main())
