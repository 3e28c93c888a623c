"""Data-parallel training on ``torch.distributed`` ranks: the step one process would take.

Inside ``data_parallel()``, all ranks draw the same batch; each computes the loss of its share
(``batch_shard``), with BatchNorm statistics of the whole batch (``synced_batchnorm``: torch's
``SyncBatchNorm`` needs CUDA, this works on gloo), scaled so that the summed gradients
(``sum_gradients_if_data_parallel``) are the whole batch's. Every rank then takes the identical
step, equal to one process's up to float summation order. Work done once (a choice that times the
machine) runs on rank 0 and is broadcast (``main_decides``); rows of an evaluation are split and
gathered (``gather_rows``). Outside the block, or without a process group, every helper leaves the
work as it is.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from metacompress.meta.distributed import active, all_reduce_sum, collective, rank_and_world, sum_gradients

T = TypeVar("T")

_data_parallel = False


@contextmanager
def data_parallel(on: bool = True) -> Iterator[None]:
    """Within this block, training helpers that support it (``batch_shard``, ``synced_batchnorm``,
    ``sum_gradients_if_data_parallel``) split every batch across the ranks (``on=False``: they
    do not). Only code that runs the same steps on every rank may enter it (not ES jobs, which
    differ per rank)."""
    global _data_parallel
    before, _data_parallel = _data_parallel, on
    try:
        yield
    finally:
        _data_parallel = before


def data_parallel_active() -> bool:
    return _data_parallel and active()


def batch_shard(index: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """This rank's strided share of a batch, the share's weight in the summed gradient (its
    fraction of the batch), and whether the batch was split (BatchNorm then needs the whole
    batch's statistics). Outside data parallelism: the whole batch, 1, False. A batch smaller
    than the number of ranks is computed whole on every rank, each with weight 1 / ranks."""
    if not data_parallel_active():
        return index, 1.0, False
    rank, world = rank_and_world()
    if len(index) < world:
        return index, 1.0 / world, False
    share = index[rank::world]
    return share, len(share) / len(index), True


def sum_gradients_if_data_parallel(optimizer: torch.optim.Optimizer) -> None:
    """``sum_gradients`` inside ``data_parallel()``; nothing otherwise."""
    if data_parallel_active():
        sum_gradients(optimizer)


def gather_rows(compute: Callable[[int, int], torch.Tensor], n: int) -> torch.Tensor:
    """``compute(0, n)`` with its rows split across ranks inside ``data_parallel()``: each rank
    computes rows ``[lo, hi)`` of a contiguous share and every rank receives all ``n`` rows."""
    if not data_parallel_active():
        return compute(0, n)
    rank, world = rank_and_world()
    if n < world:
        return compute(0, n)
    lo, hi = n * rank // world, n * (rank + 1) // world
    part = compute(lo, hi)
    out = torch.zeros((n, *part.shape[1:]), dtype=part.dtype)
    out[lo:hi] = part
    return all_reduce_sum(out, "row exchange")  # the other ranks' rows are zeros: the sum is exact


def main_decides(decide: Callable[[], T]) -> T:
    """Inside ``data_parallel()``: ``decide()`` on rank 0 only (e.g. a choice that times the
    machine), its result sent to every rank; an exception on rank 0 is raised on every rank, so
    none waits for the others. Outside it, every process decides for itself."""
    if not data_parallel_active():
        return decide()
    box: list[Any] = [None]
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            with data_parallel(on=False):  # the other ranks wait: nothing inside may need them
                box[0] = ("ok", decide())
        except Exception as exc:  # noqa: BLE001 - raised below, after the others are told
            error = exc
            box[0] = ("error", exc if _picklable(exc) else RuntimeError(f"{type(exc).__name__}: {exc}"))
    collective("broadcast from rank 0", lambda: dist.broadcast_object_list(box, src=0))
    status, value = box[0]
    if status == "error":
        raise error or value
    return value


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - any failure means no
        return False
    return True


@contextmanager
def synced_batchnorm(model: nn.Module, split: bool = True) -> Iterator[None]:
    """Inside ``data_parallel()``, for a batch ``split`` across ranks: the model's BatchNorm layers
    in training mode normalise with the statistics of the whole batch over all ranks (two
    all-reduces per layer, differentiable), and update their running statistics with them, as one
    process on the whole batch would. Otherwise nothing changes."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not split or not data_parallel_active() or not bns:
        yield
        return
    for m in bns:
        m.forward = _synced_forward.__get__(m)  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for m in bns:
            del m.forward


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: every rank's loss depends on
    every rank's input through the sum."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(x.clone(), "batch-norm statistics")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(grad.clone(), "batch-norm gradients")


def _synced_forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    all_reduce = _SumOverRanks.apply
    if not bn.training:
        return type(bn).forward(bn, x)
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    sums = all_reduce(torch.cat([x.sum(dims), x.new_tensor([x.numel() // x.shape[1]])]))  # values, count
    count = float(sums[-1].detach())
    mean = sums[:-1] / count
    centred = x - mean.view(shape)
    var = all_reduce((centred * centred).sum(dims)) / count
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked += 1
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(var.detach() * count / max(count - 1.0, 1.0), alpha=factor)
    out = centred / torch.sqrt(var + bn.eps).view(shape)
    return out * bn.weight.view(shape) + bn.bias.view(shape) if bn.affine else out
