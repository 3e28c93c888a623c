"""``torch.distributed`` helpers: every rank does its share of an iteration, all take the same step.

Two kinds of work are split across ranks, and both keep every rank's weights identical:

- gradient-based meta-learning (MAML family, Reptile): all ranks draw the same meta-batch from
  the same seed, each computes the meta-gradient of its shard (summed, divided by the *whole*
  batch size) and one all-reduce (sum) gives every rank the full meta-gradient;
- evolution strategies: all ranks regenerate the same perturbations from the shared seed,
  each evaluates its share of the (member x task) jobs, and only the scalar rewards are
  exchanged (``sharded_map``), so an iteration's traffic is one float per job (Salimans et al.,
  2017);
- data-parallel training (``meta.data_parallel``): all ranks draw the same batch, each computes
  the loss of its share with BatchNorm statistics of the whole batch and the gradients are summed.

Ranks come from ``torchrun`` (``init_from_env``) or from ``launch_local``, which runs the same
code on N processes of this machine. Without an initialised process group every helper is a
no-op and every shard is the whole batch, so single-process code needs no branches.

A rank that dies makes the others' next collective fail; the survivors raise ``WorkerLost``
(naming themselves and, where known, the dead rank) instead of hanging or printing a gloo stack.
"""

from __future__ import annotations

import atexit
import datetime
import multiprocessing as mp
import os
import pickle
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from metacompress.meta.errors import first_line

T = TypeVar("T")

TIMEOUT_ENV = "METACOMPRESS_DIST_TIMEOUT"  # seconds a collective may wait for a silent rank


class WorkerLost(RuntimeError):
    """A collective failed because another rank died, was killed or stopped answering."""


def active() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size ((0, 1) without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes files and prints: rank 0, or the only process.

    Before the process group exists (e.g. argument errors under torchrun) the launcher's
    ``RANK`` variable decides, so that only one rank reports.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))


def init_from_env() -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    gloo, because the exchanged data are CPU tensors (rewards, or gradients of small
    meta-models); a no-op when not launched by torchrun or when the group already exists.
    """
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo", timeout=_timeout())
        atexit.register(_leave_group)
    return rank_and_world()


def exit_rank(code: int) -> None:
    """End a process that joined a torchrun group: leave the group, flush, and exit without the
    interpreter's teardown, in which gloo's threads can still abort a rank that finished its work
    ("terminate called without an active exception"; torchrun then reports the run as failed).
    Returns without exiting where no group was joined."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    _leave_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _leave_group() -> None:
    """Leave the process group before the interpreter exits: a gloo group left to its destructor
    at shutdown can abort the process ("terminate called without an active exception"), and
    torchrun then reports a rank that had finished its work as failed."""
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], rank: int | None = None, world: int | None = None) -> list[T]:
    """The strided share of ``items`` for ``rank``: every item lands on exactly one rank."""
    r, w = rank_and_world()
    rank, world = (r if rank is None else rank), (w if world is None else world)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of size {world}")
    return list(items[rank::world])


def collective(what: str, fn: Callable[[], Any]) -> Any:
    """Run one collective; a failure (a peer died or timed out) becomes ``WorkerLost``."""
    try:
        return fn()
    except (RuntimeError, OSError) as exc:
        rank, world = rank_and_world()
        first = first_line(exc)
        raise WorkerLost(f"rank {rank} of {world}: {what} failed because another rank died or stopped "
                         f"answering ({first[:160]}); the launcher's summary names the failed rank; "
                         "restart to continue from the last checkpoint") from None


def all_reduce_sum(t: torch.Tensor, what: str = "all-reduce") -> torch.Tensor:
    """Sum ``t`` over all ranks in place (a no-op for one process)."""
    if active():
        collective(what, lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM))
    return t


def sum_gradients(optimizer: torch.optim.Optimizer) -> None:
    """All-reduce (sum) the ``.grad`` of every parameter the optimizer updates.

    Each rank's gradient must already be divided by the *global* batch size, so the sum is the
    gradient of the whole batch whatever the shards' sizes. A parameter without a gradient on
    this rank contributes zeros, so all ranks issue the same collectives in the same order (no
    deadlock when a shard is empty). The gradients travel as one flat buffer (one collective).
    """
    if not active():
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    all_reduce_sum(flat, "meta-gradient all-reduce")
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """All-reduce and average ``.grad`` (for per-rank *mean* gradients over equal shards)."""
    if not active():
        return
    sum_gradients(optimizer)
    world = dist.get_world_size()
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad /= world


def sharded_map(fn: Callable[[T], float], jobs: Sequence[T]) -> list[float]:
    """``[fn(j) for j in jobs]`` with the jobs split across ranks; every rank gets every result.

    Each rank evaluates ``jobs[rank::world]``; the scalar results meet in one float64
    all-reduce of ``len(jobs)`` numbers (zeros elsewhere, so the sum is exact). All ranks must
    pass the same job list.
    """
    rank, world = rank_and_world()
    local = [float(fn(j)) for j in jobs[rank::world]]
    if world == 1:
        return local
    out = torch.zeros(len(jobs), dtype=torch.float64)
    out[rank::world] = torch.tensor(local, dtype=torch.float64)
    return all_reduce_sum(out, "reward exchange").tolist()


def barrier() -> None:
    """Wait for every rank (a no-op for one process)."""
    if active():
        collective("barrier", dist.barrier)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, address: str, fn: Callable[..., Any], args: tuple, report: Any) -> None:
    """A child rank: join the group, run ``fn``, leave without running the parent's atexit code.

    A failure is sent to rank 0 through ``report`` (rank 0 names it if the run stops because of
    it) rather than printed, so an error every rank meets is reported once, by rank 0.
    """
    code = 0
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world, timeout=_timeout())
        fn(*args)
        dist.destroy_process_group()
    except BaseException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        report.send(f"{type(exc).__name__}: {first}" if first else type(exc).__name__)
        code = 1
    os._exit(code)


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def launch_local(fn: Callable[..., T], world: int, *args: Any) -> T:
    """Run ``fn(*args)`` on ``world`` ranks of this machine and return rank 0's result.

    This process is rank 0; ranks 1.. are child processes (one thread each), started as
    ``start_method`` says. The same code runs under ``torchrun``; this is its single-machine case
    for users who do not launch one. A child that dies makes rank 0 raise ``WorkerLost`` naming
    that child's rank and how it ended.
    """
    if world <= 1 or dist.is_initialized():
        return fn(*args)
    address = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context(start_method(fn, args))
    pipes = [ctx.Pipe(duplex=False) for _ in range(1, world)]
    children = [ctx.Process(target=_child, args=(r, world, address, fn, args, pipes[r - 1][1]), daemon=True)
                for r in range(1, world)]
    for c in children:
        c.start()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        try:
            collective("joining the process group", lambda: dist.init_process_group(
                "gloo", init_method=address, rank=0, world_size=world, timeout=_timeout()))
            result = fn(*args)
        except WorkerLost as exc:
            dead = _dead_children(children, [recv for recv, _ in pipes])
            raise WorkerLost(f"{dead}; {exc}" if dead else str(exc)) from None
        for c in children:
            c.join()
        return result
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()
        for c in children:
            if c.is_alive():
                c.kill()
            c.join()


def start_method(fn: Callable[..., Any], args: tuple) -> str:
    """``spawn`` when ``fn`` and ``args`` can be pickled, else ``fork``.

    A forked child cannot run autograd once the parent's autograd engine has started its worker
    threads (PyTorch's "Autograd and Fork" note): a process that has already trained something can
    fork ranks whose first backward pass fails. Spawned ranks start clean, at the cost of importing
    torch again (seconds); closures cannot be sent to them, so those are forked (and must not need
    autograd in a process that has used it)."""
    try:
        pickle.dumps((fn, args))
    except Exception:  # noqa: BLE001 - lambdas, local functions, unpicklable state
        return "fork"
    return "spawn"


def _dead_children(children: list, reports: list) -> str:
    """'rank 1 (pid 42) was killed by SIGKILL' for every child that has ended with a failure."""
    dead = []
    for rank, (c, report) in enumerate(zip(children, reports), start=1):
        c.join(timeout=2)
        if c.exitcode not in (None, 0):
            why = f": {report.recv()}" if report.poll() else ""
            dead.append(f"rank {rank} (pid {c.pid}) {_describe_exit(c.exitcode)}{why}")
    return "; ".join(dead)
