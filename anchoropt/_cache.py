"""Cache keys that cannot go stale: exact copies of the tensors a cached value was computed from.

A key built from ``tensor._version`` or ``data_ptr()`` misses writes through ``tensor.data`` (``.data.copy_``
does not bump the version), a reassigned ``.data`` that reuses memory, and some ``load_state_dict`` paths.
Comparing the values themselves catches every route; the learned tensors of a prompt learner are a few
thousand numbers, so the copy and the comparison cost far less than the text pass they save.
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["TensorSnapshot"]


class TensorSnapshot:
    """Copies of ``tensors`` (detached) that :meth:`matches` compares with the current values, bit for bit."""

    def __init__(self, tensors: Iterable[torch.Tensor]):
        self._copies = tuple(t.detach().clone() for t in tensors)

    def matches(self, tensors: Iterable[torch.Tensor]) -> bool:
        """Whether ``tensors`` have the same count, shapes, dtypes, devices and values (NaN never matches)."""
        current = tuple(tensors)
        return len(current) == len(self._copies) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a.detach(), b)
            for a, b in zip(current, self._copies)
        )
