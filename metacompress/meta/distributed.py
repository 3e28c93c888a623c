"""``torch.distributed`` helpers: each rank meta-trains on its own shard of the meta-batch.

Data-parallel meta-learning: all ranks hold the same weights, draw the same meta-batch from the
same seed, take their shard, compute meta-gradients locally and average them with one
all-reduce before the (identical) optimizer step. Without an initialised process group every
helper is a no-op, so single-process code needs no branches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def active() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size ((0, 1) without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence[T], rank: int | None = None, world: int | None = None) -> list[T]:
    """The strided share of ``items`` for ``rank``: every item lands on exactly one rank."""
    r, w = rank_and_world()
    rank, world = (r if rank is None else rank), (w if world is None else world)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of size {world}")
    return list(items[rank::world])


def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """All-reduce and average the ``.grad`` of every parameter the optimizer updates.

    A parameter without a gradient on this rank contributes zeros, so all ranks issue the same
    collectives in the same order (no deadlock when a shard is empty).
    """
    if not active():
        return
    world = dist.get_world_size()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world
