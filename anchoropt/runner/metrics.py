"""Per-epoch metrics of a run, in the forms the field reads: ``metrics.jsonl``, ``metrics.csv``, TensorBoard.

One row per Stage II epoch: ``epoch`` (epochs done, from 1), ``loss`` (the training loss, mean per image),
``ce`` (cross-entropy of the learner's first logits, unweighted, when its output has them), PAE's
``pae_koopman`` / ``pae_lyapunov`` (with ``--pae``), ``lr`` (the first parameter group's rate during the epoch;
``lr_<group>`` for every further group), ``seconds`` (the epoch's wall time).  The evaluation, which runs
once after training, goes into the last row as ``eval_<name>`` columns (``eval_base``, ``eval_novel``,
``eval_hm``; ``eval_source``, ``eval_target_mean``, ``eval_<target>``); a method that trains nothing gets one
row, epoch 0, with the evaluation alone.

Both files are rewritten atomically after every epoch (:mod:`anchoropt._files`): an interrupted run leaves
the rows of the epochs it finished.  ``--resume`` keeps the rows up to its checkpoint and drops any later
ones, so no epoch appears twice.  With ``--tensorboard`` every number also goes to TensorBoard event files in
``RUN/tensorboard/`` (needs the ``tensorboard`` package: ``pip install tensorboard``, the ``tensorboard`` extra).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from .. import _files

__all__ = ["METRICS_JSONL", "METRICS_CSV", "TENSORBOARD_DIR", "MetricsLog", "check_tensorboard",
           "evaluation_metrics", "read_metrics"]

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_HINT = ("--tensorboard needs the tensorboard package: pip install tensorboard (metrics.jsonl and "
                    "metrics.csv are written without it; leave out --tensorboard)")


def check_tensorboard():
    """torch's ``SummaryWriter`` class; ``ImportError`` with the one-line install hint when tensorboard is
    not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(TENSORBOARD_HINT) from None
    return SummaryWriter


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``RUN/metrics.jsonl`` (``[]`` when there is none; a torn last line is left out)."""
    path = Path(run_dir) / METRICS_JSONL
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows.append(row)
    return rows


def evaluation_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of a run's ``results`` block as flat ``eval_<name>`` entries."""
    out: dict[str, float] = {}
    if "hm" in results:  # base-to-novel
        out.update(eval_base=results["base"]["accuracy"], eval_novel=results["novel"]["accuracy"],
                   eval_hm=results["hm"])
    if "source" in results:
        out["eval_source"] = results["source"]["accuracy"]
        for name, value in (results.get("targets") or {}).items():
            out[f"eval_{name}"] = value["accuracy"]
        if results.get("target_mean") is not None:
            out["eval_target_mean"] = results["target_mean"]
    return out


class MetricsLog:
    """A run's ``metrics.jsonl`` / ``metrics.csv`` (and TensorBoard events), one row per epoch.

    Args:
        out: the run directory.
        keep_epochs: rows of an interrupted run to keep (``--resume``: the checkpoint's epochs done); ``None``
            starts empty (a new run).
        tensorboard: also write TensorBoard event files to ``out/tensorboard``.
    """

    def __init__(self, out: str | Path, keep_epochs: int | None = None, tensorboard: bool = False):
        self.out = Path(out)
        self.rows = [r for r in read_metrics(self.out) if r["epoch"] <= keep_epochs] if keep_epochs else []
        self.writer = check_tensorboard()(log_dir=str(self.out / TENSORBOARD_DIR)) if tensorboard else None
        self._write()

    def epoch(self, row: Mapping[str, Any]) -> None:
        """Add one epoch's row and rewrite the files (and log its numbers to TensorBoard)."""
        row = {k: _plain(v) for k, v in row.items()}
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
        self._write()
        self._scalars(row, row["epoch"])

    def evaluation(self, results: Mapping[str, Any]) -> None:
        """Put the evaluation's numbers into the last row (a row ``epoch 0`` when nothing was trained)."""
        values = evaluation_metrics(results)
        if not values:
            return
        if not self.rows:
            self.rows.append({"epoch": 0})
        self.rows[-1] = {**self.rows[-1], **values}
        self._write()
        self._scalars(values, self.rows[-1]["epoch"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _scalars(self, row: Mapping[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(_tag(key), value, step)
        self.writer.flush()

    def _write(self) -> None:
        _files.write_text(self.out / METRICS_JSONL,
                          "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.rows))
        _files.write_text(self.out / METRICS_CSV, _files.csv_text(self.rows, empty_header=("epoch",)))


def _plain(value: Any) -> Any:
    """A JSON-able number: floats rounded to 6 digits; NaN / inf as ``None``."""
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value


def _tag(key: str) -> str:
    """TensorBoard tag of a column: ``train/loss``, ``lr/prompt``, ``eval/hm`` ..."""
    if key.startswith("eval_"):
        return "eval/" + key[5:]
    if key.startswith("lr"):
        return "lr/" + (key[3:] or "first_group")
    if key == "seconds":
        return "time/epoch_seconds"
    return "train/" + key
