"""Progress reports: a tqdm bar on a terminal; elsewhere (logs, CI, ``| tee``) a plain line every 10 %.

Off a terminal tqdm's carriage-return redraws pile up as hundreds of lines and finished bars leave blank
lines; :class:`Progress` writes ``Stage I anchors: 40/200 loss 12.6409`` instead, ten times per bar at most.
"""

from __future__ import annotations

import math
import sys
from typing import Any, TextIO

__all__ = ["Progress"]


class Progress:
    """``update(**postfix)`` once per step, ``close()`` at the end.

    Args:
        total: number of steps.
        description: the bar's label.
        stream: where to write (``sys.stderr`` by default); tqdm is used only when it is a terminal.
        lines: plain lines per bar off a terminal (the last step always gets one).
    """

    def __init__(self, total: int, description: str, stream: TextIO | None = None, lines: int = 10):
        self.total, self.description, self.n = int(total), description, 0
        self.stream = stream if stream is not None else sys.stderr
        self._bar = None
        if _is_terminal(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, file=self.stream)
        self.every = max(1, math.ceil(self.total / max(1, lines)))

    def update(self, **postfix: Any) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.set_postfix(**postfix, refresh=False)
            self._bar.update()
        elif self.n % self.every == 0 or self.n == self.total:
            extra = "".join(f" {key} {value}" for key, value in postfix.items())
            print(f"{self.description}: {self.n}/{self.total}{extra}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False
