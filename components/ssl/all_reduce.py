"""Collectives that degrade to no-ops without a process group.

The SSL losses run unchanged on one process (tests, CPU debugging) and under ``torch.distributed``:
every helper here checks ``dist.is_available() and dist.is_initialized()`` first, so callers never
branch on the world size themselves.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a default process group exists (``init_process_group`` has been called)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all processes, in place; returns it for chaining."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max_(tensor: Tensor) -> Tensor:
    """Element-wise maximum of ``tensor`` over all processes, in place; returns it for chaining."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def start_all_reduce_sum_(tensor: Tensor) -> dist.Work | None:
    """Start an asynchronous in-place sum over processes; the returned handle must be waited on.

    Returns None without a process group (the tensor already holds the "sum" over one process).
    """
    if not is_distributed():
        return None
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)

