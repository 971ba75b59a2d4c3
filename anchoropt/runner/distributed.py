"""Multi-process training helpers: ``torchrun`` / DistributedDataParallel for the experiment runner.

The runner calls :func:`init_from_env`; under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) it starts
the process group (NCCL on CUDA, gloo on CPU), pins one GPU per process and returns a :class:`DistContext`.
Without ``torchrun`` everything is a no-op on a single process.

What is distributed, and how:

* Stage II: the prompt learner (soft tokens + position logits: a few kB) is wrapped in
  ``DistributedDataParallel``; each process draws its own batch (``DistributedSampler``) and its own Gumbel
  sample, gradients are averaged, so the replicas stay equal.  The frozen CLIP is not wrapped.
* Stage I: its loss does not depend on images, so rank 0 learns the anchors and broadcasts them.
* Evaluation: each process scores a disjoint slice of the test images; the counts are summed.

The same learner works under Lightning or accelerate: they wrap ``AnchorOPTPromptLearner`` like any
``nn.Module`` (see the docs' multi-GPU how-to).
"""

from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistContext", "init_from_env", "wrap_ddp", "unwrap", "broadcast_tensor", "all_reduce_sum", "shard",
           "barrier", "cleanup"]

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    started_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str | None = None, backend: str | None = None, timeout_s: int = 1800) -> DistContext:
    """A :class:`DistContext` from ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

    Args:
        device: ``"cpu"``, ``"cuda"`` (one GPU per process: ``cuda:LOCAL_RANK``) or ``None`` for CUDA when
            available.
        backend: process-group backend; ``"nccl"`` for CUDA and ``"gloo"`` for CPU by default.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if world_size <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistContext(device=torch.device(device or ("cuda" if want_cuda else "cpu")))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if want_cuda else "gloo"),
                                timeout=datetime.timedelta(seconds=timeout_s))
        started = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, started)


def wrap_ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    """``module`` wrapped in ``DistributedDataParallel`` when running distributed (unchanged otherwise).

    Buffers are not re-broadcast every step: the learner's buffers are the
    frozen anchors and prompt tokens, equal on every process.
    """
    if not ctx.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    params = inspect.signature(DistributedDataParallel).parameters
    sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=device_ids, **sync)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (itself otherwise)."""
    return getattr(module, "module", module)


def broadcast_tensor(tensor: torch.Tensor, ctx: DistContext, src: int = 0) -> torch.Tensor:
    """``tensor`` as rank ``src`` holds it, on every process (in place)."""
    if ctx.distributed:
        dist.broadcast(tensor, src=src)
    return tensor


def all_reduce_sum(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Element-wise sum of ``values`` over all processes."""
    if not ctx.distributed:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def shard(items: Sequence[T], ctx: DistContext) -> list[T]:
    """This process's disjoint slice ``items[rank::world_size]`` (no padding, so counts add up exactly)."""
    return list(items[ctx.rank :: ctx.world_size]) if ctx.distributed else list(items)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_from_env` started it.

    Every rank meets at a barrier first, so no rank tears gloo down while another still has work in flight (a rank
    that exits under a peer's pending collective can abort with "terminate called without an active exception")."""
    if ctx.started_here and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
