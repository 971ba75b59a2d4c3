"""What a run prints: log lines on the main process and progress (tqdm on a terminal, plain lines elsewhere)."""

from __future__ import annotations

import sys

from . import distributed as dist_utils


def _log(ctx: dist_utils.DistContext, message: str) -> None:
    if ctx.is_main:
        print(message, file=sys.stderr, flush=True)


def _bar(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    from .._progress import Progress

    return Progress(total, description)
