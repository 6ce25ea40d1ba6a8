"""Collecting per-rank results under torch.distributed (DDP): on global rank 0 (objects) or on every rank
(sums of tensors); as they are without a process group."""

from __future__ import annotations

from typing import TypeVar

import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_on_rank_zero(items: list[T]) -> list[T] | None:
    """Every rank's ``items`` (picklable) concatenated in rank order on global rank 0, None on the other
    ranks; ``items`` as they are without a process group. Collective: every rank must call it."""
    if not is_distributed():
        return list(items)
    rank_zero = dist.get_rank() == 0
    gathered: list[list[T] | None] | None = [None] * dist.get_world_size() if rank_zero else None
    dist.gather_object(items, gathered, dst=0)
    return [item for rank_items in gathered for item in rank_items] if rank_zero else None


def sum_over_processes(values: Tensor) -> Tensor:
    """The element-wise sum of ``values`` over all processes, on every process (a detached copy; ``values``
    itself is left alone); ``values`` detached without a process group. Collective: every rank must call it
    with the same shape."""
    total = values.detach().clone()
    if is_distributed():
        dist.all_reduce(total)
    return total
