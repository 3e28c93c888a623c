"""Budgets: what a user asks to keep (MACs, parameters, latency, milliseconds), as the cost model
that ``PruningSpace.project`` is handed and, for time, as a target the exported model must meet
when measured.

MACs and parameters are analytic: the projection meets them exactly. Latency is predicted by the
runtime's latency model (``deploy.latency``), and a prediction can be off: every allocation made
under a latency budget is therefore pruned, exported and timed against the dense model
(interleaved), and re-projected with the measured error until it is well within ``LATENCY_TOL``
(the exported model is timed once more at the end, by other sessions: the margin absorbs their
spread) or ``MAX_ROUNDS`` are spent. This happens on the architecture, before repair: weights do not change
the runtime's speed, so no repair is wasted on a width that misses. Where the target lies below
what width pruning reaches (per-op overhead, layers that cannot shrink), the floor is used and a
warning gives its measured value.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from torch import nn

from metacompress.compress.prune import Metric, PruningSpace
from metacompress.errors import UserError
from metacompress.progress import status

LATENCY_TOL = 0.05   # measured latency within 5 % of the target
AIM = 0.5            # the loop stops early only within AIM * LATENCY_TOL: margin for the final measurement
MAX_ROUNDS = 4       # measured re-projections per allocation
IDLE_SAVING = 1e-4   # a group whose pruning saves less (fraction of the dense latency) is left whole
METRICS = ("macs", "params", "latency", "ms")
MAX_BATCH = 4096     # latency batch sizes beyond this are input errors, not workloads to allocate
MAX_THREADS = 1024


@dataclass
class BudgetSpec:
    """The budget as asked: ``metric`` in METRICS and its value (a kept fraction, or ms)."""

    metric: str
    value: float
    batch: int = 1
    threads: int | None = None
    provider: str = "cpu"

    @property
    def is_latency(self) -> bool:
        return self.metric in ("latency", "ms")


def budget_spec(macs: float | None = None, params: float | None = None, latency: float | None = None,
                ms: float | None = None, **runtime: Any) -> BudgetSpec:
    """Check that exactly one budget is given and in range (UserError otherwise)."""
    given = {m: v for m, v in zip(METRICS, (macs, params, latency, ms)) if v is not None}
    flags = "--target-macs, --target-params, --target-latency or --target-ms"
    if len(given) != 1:
        raise UserError(f"give exactly one budget: {flags}" + (f" (got {len(given)})" if given else ""))
    metric, value = next(iter(given.items()))
    if not isinstance(value, (int, float)) or not np.isfinite(value):
        raise UserError(f"--target-{metric} must be a number, got {value!r}")
    if metric == "ms" and value <= 0:
        raise UserError(f"--target-ms must be > 0 (milliseconds), got {value:g}")
    if metric != "ms" and not 0.0 < value <= 1.0:
        raise UserError(f"--target-{metric} must be in (0, 1] (the kept fraction), got {value:g}")
    spec = BudgetSpec(metric, float(value), **runtime)
    if not 1 <= spec.batch <= MAX_BATCH:
        raise UserError(f"--latency-batch must be in 1..{MAX_BATCH}, got {spec.batch}")
    if spec.threads is not None and not 1 <= spec.threads <= MAX_THREADS:
        raise UserError(f"--threads must be in 1..{MAX_THREADS}, got {spec.threads}")
    return spec


class MACs(BudgetSpec):
    """Keep ``fraction`` of the dense model's multiply-accumulates (met exactly, in whole units)."""

    def __init__(self, fraction: float) -> None:
        super().__init__(**vars(budget_spec(macs=fraction)))


class Params(BudgetSpec):
    """Keep ``fraction`` of the dense model's parameters."""

    def __init__(self, fraction: float) -> None:
        super().__init__(**vars(budget_spec(params=fraction)))


class Latency(BudgetSpec):
    """Keep ``fraction`` of the dense model's latency, measured in onnxruntime on this machine at
    ``batch`` with ``threads`` (default: the cores this process may use)."""

    def __init__(self, fraction: float, batch: int = 1, threads: int | None = None, provider: str = "cpu") -> None:
        super().__init__(**vars(budget_spec(latency=fraction, batch=batch, threads=threads, provider=provider)))


class Milliseconds(BudgetSpec):
    """Run in at most ``ms`` milliseconds at ``batch``, measured as for ``Latency``."""

    def __init__(self, ms: float, batch: int = 1, threads: int | None = None, provider: str = "cpu") -> None:
        super().__init__(**vars(budget_spec(ms=ms, batch=batch, threads=threads, provider=provider)))


def as_budget(target: BudgetSpec | float) -> BudgetSpec:
    """A budget object, or a bare number read as the kept MACs fraction."""
    if isinstance(target, BudgetSpec):
        return target
    if isinstance(target, (int, float)) and not isinstance(target, bool):
        return MACs(float(target))
    raise UserError(f"target must be a kept MACs fraction or one of MACs(f), Params(f), Latency(f), "
                    f"Milliseconds(ms); got {type(target).__name__}")


@dataclass
class Budget:
    """A resolved budget: the kept fraction ``target`` of the cost ``cost``."""

    metric: str            # macs, params or latency
    target: float
    cost: Metric
    latency: "LatencyTarget | None" = None

    def project(self, space: PruningSpace, ratio_fn: Callable[[float], Sequence[float]]) -> list[int]:
        """Kept units per group that meet the budget (measured, for latency)."""
        if self.latency is not None:
            return self.latency.project(ratio_fn)
        return space.project(ratio_fn, self.target, self.cost)

    def predicted(self, space: PruningSpace, ratio_fn: Callable[[float], Sequence[float]]) -> list[int]:
        """Kept units per group that meet the budget as predicted: for latency, by the latency
        model alone, without the measured correction (for a screen that only ranks allocations)."""
        if self.latency is not None:
            return self.latency.predicted_keep(ratio_fn)
        return space.project(ratio_fn, self.target, self.cost)

    @property
    def feasible_target(self) -> float:
        """The target, raised to the latency floor where it lies below (what allocation rules and
        the policy are asked for: a budget they can meet)."""
        return self.target if self.latency is None else self.latency.feasible_target


@dataclass
class Round:
    keep: list[int]
    goal: float            # the predicted fraction projected onto
    predicted: float
    measured: float


def next_goal(rounds: Sequence[Round], target: float) -> float:
    """The predicted fraction to project onto next, from the rounds measured so far.

    Once two rounds straddle the target (one measured faster, one slower), the next goal lies
    between their goals, interpolated linearly: latency is not smooth in the widths (a layer
    that leaves the runtime's blocked layout jumps), and scaling the last goal by the last error
    alone steps back and forth across such a jump. The interpolation runs over the predicted
    fractions the rounds' allocations have (what a goal projects to). Before that, the last goal
    is scaled by the last measured error."""
    last = rounds[-1]
    faster = [r for r in rounds if r.measured < target]
    slower = [r for r in rounds if r.measured > target]
    if faster and slower:
        lo = max(faster, key=lambda r: r.predicted)
        hi = min(slower, key=lambda r: r.predicted)
        if lo.predicted < hi.predicted:
            return lo.predicted + (target - lo.measured) / (hi.measured - lo.measured) * (hi.predicted - lo.predicted)
    return last.goal * target / last.measured


def miss_warning(measured: float, target: float, rounds: int) -> str:
    """What a user should know when the correction loop ended off the target: which way (a model
    faster than asked is not a failure, but it gave up accuracy for speed nobody asked for) and by
    how much."""
    way = "faster" if measured < target else "slower"
    return (f"measured latency {measured:.3f} is {abs(measured / target - 1):.1%} {way} than the target {target:.3f} "
            f"(tolerance {LATENCY_TOL:.0%}) after {rounds} rounds: the channel grid is too coarse here or the machine "
            f"too noisy")


@dataclass
class LatencyTarget:
    """Projection onto a latency target, checked by measuring the exported architecture."""

    model: Any             # deploy.latency.LatencyModel
    dense: nn.Module
    space: PruningSpace
    target: float
    input_shape: tuple[int, ...]
    threads: int
    provider: str = "cpu"
    dynamo: bool = True    # the exporter of the deployed file, which each measurement times
    history: list[list[Round]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)       # about the target itself (the floor)
    misses: dict[tuple[int, ...], str] = field(default_factory=dict)  # per projected allocation
    _workdir: tempfile.TemporaryDirectory | None = None
    _scores: list | None = None
    _floor_measured: float | None = None  # the floor is the same architecture for every projection

    @property
    def floor_fraction(self) -> float:
        """Predicted latency with every group at its smallest width."""
        return self.model.fraction(self.space.floor_keep())

    def project(self, ratio_fn: Callable[[float], Sequence[float]]) -> list[int]:
        full = [g.channels for g in self.space.groups]
        if self.target >= 1.0:
            return full
        idle = self.idle_groups()
        ratio_fn = _freeze(ratio_fn, idle)
        floor_keep = [k if i not in idle else c for i, (k, c) in enumerate(zip(self.space.floor_keep(), full))]
        floor = self.model.fraction(floor_keep)
        target = self._reachable_target(floor_keep, floor)
        goal, rounds = target, []
        for _ in range(MAX_ROUNDS):
            keep = floor_keep if goal <= floor else self.space.project(ratio_fn, goal, self.model, grid_only=True)
            if any(keep == r.keep for r in rounds):  # measured already: the grid has nothing in between
                break
            rounds.append(Round(keep, goal, self.model.fraction(keep), self.measure(keep)))
            status(f"latency: predicted {rounds[-1].predicted:.3f}, measured {rounds[-1].measured:.3f} "
                   f"of the dense model (target {target:.3f})")
            if abs(rounds[-1].measured / target - 1) <= AIM * LATENCY_TOL:
                break
            goal = float(np.clip(next_goal(rounds, target), floor, 1.0))
        self.history.append(rounds)
        best = min(rounds, key=lambda r: (abs(r.measured / target - 1), r.measured))
        self.misses.pop(tuple(best.keep), None)  # an earlier projection to the same widths may have missed
        if abs(best.measured / target - 1) > LATENCY_TOL:
            self.misses[tuple(best.keep)] = miss_warning(best.measured, target, len(rounds))
        return best.keep

    def miss(self, keep: Sequence[int]) -> str | None:
        """The warning of the projection that ended at ``keep``, if it missed the target."""
        return self.misses.get(tuple(keep))

    def warnings_for(self, keep: Sequence[int]) -> list[str]:
        """What a user of the allocation ``keep`` (one this target projected) should know: the
        target's own warnings and, if its projection missed, by how much (the guard projects
        allocations it then drops: their misses are not the deployed model's)."""
        miss = self.miss(keep)
        return self.warnings + ([miss] if miss else [])

    @property
    def feasible_target(self) -> float:
        """The target, raised to the predicted floor (+ the tolerance) where it lies below."""
        return max(self.target, self.floor_fraction * (1 + LATENCY_TOL))

    def predicted_keep(self, ratio_fn: Callable[[float], Sequence[float]]) -> list[int]:
        """The projection onto the feasible target as the latency model predicts it, with no
        measurement: cheap enough to call inside a search over allocations."""
        goal = min(1.0, self.feasible_target)
        if goal >= 1.0:
            return [g.channels for g in self.space.groups]
        return self.space.project(_freeze(ratio_fn, self.idle_groups()), goal, self.model, grid_only=True)

    def idle_groups(self) -> set[int]:
        """Groups whose pruning saves no predicted time (a width the runtime pads back up to its
        block): pruning them would cost accuracy for nothing, so a latency budget leaves them."""
        return {i for i, saved in enumerate(self.space.group_savings(self.model)) if saved <= IDLE_SAVING}

    def _reachable_target(self, floor_keep: list[int], floor: float) -> float:
        """The target, or where it lies below the floor (every group at its smallest width, as
        measured) the floor plus the tolerance: latency is flat near the floor, so an allocation
        that keeps far more units runs about as fast as the floor and is far more accurate."""
        if self.target >= floor * (1 + LATENCY_TOL):
            return self.target
        if self._floor_measured is None:
            self._floor_measured = self.measure(floor_keep)
        measured = self._floor_measured
        if self.target >= measured * (1 + LATENCY_TOL):
            return self.target
        reachable = min(1.0, measured * (1 + LATENCY_TOL))
        self._warn(f"target latency {self.target:.3f} is below what width pruning reaches here: the floor "
                   f"(every group at its smallest width) measures {measured:.3f} of the dense latency; "
                   f"compressed to {reachable:.3f} (the floor + {LATENCY_TOL:.0%}) instead")
        return reachable

    def _warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)

    def measure(self, keep: Sequence[int]) -> float:
        """The pruned architecture's latency over the dense model's, timed interleaved."""
        from metacompress.compress.importance import unit_scores
        from metacompress.deploy.latency import measure_ratio
        from metacompress.deploy.simplify import export_simplified

        if self._workdir is None:
            self._workdir = tempfile.TemporaryDirectory(prefix="mc-budget-")
            export_simplified(self.dense, self.space.example, self._path("dense"), dynamo=self.dynamo)
            self._scores = unit_scores(self.dense, self.space.groups, "magnitude", example=self.space.example)
        variant = self.space.apply(copy.deepcopy(self.dense), keep, scores=self._scores)
        export_simplified(variant, self.space.example, self._path("variant"), dynamo=self.dynamo)
        ratio, _ = measure_ratio(self._path("dense"), self._path("variant"), self.input_shape, self.model.batch,
                                 self.threads, self.provider)
        return ratio

    def _path(self, name: str) -> Path:
        return Path(self._workdir.name) / f"{name}.onnx"

    def close(self) -> None:
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def report(self) -> list[list[dict[str, Any]]]:
        return [[{"goal": round(r.goal, 4), "predicted": round(r.predicted, 4), "measured": round(r.measured, 4)}
                 for r in rounds] for rounds in self.history]


def _freeze(ratio_fn: Callable[[float], Sequence[float]], idle: set[int]) -> Callable[[float], list[float]]:
    """``ratio_fn`` with the ``idle`` groups never pruned."""
    return lambda scale: [0.0 if i in idle else float(r) for i, r in enumerate(ratio_fn(scale))]


def resolve_budget(spec: BudgetSpec, dense: nn.Module, space: PruningSpace, input_shape: Sequence[int],
                   cache: bool = True, dynamo: bool = True) -> Budget:
    """The budget as a cost model on ``space``: analytic, or the runtime's latency model (built here
    or read from the cache) with the measured projection."""
    if not spec.is_latency:
        return Budget(spec.metric, spec.value, spec.metric)
    from metacompress.deploy.latency import build_latency_model
    from metacompress.deploy.runtime import default_threads

    threads = spec.threads or default_threads()
    model = build_latency_model(dense, space, input_shape, batch=spec.batch, threads=threads,
                                provider=spec.provider, cache=cache)
    target = spec.value if spec.metric == "latency" else spec.value / model.dense_ms(spec.batch)
    latency = LatencyTarget(model, dense, space, min(1.0, target), tuple(input_shape), threads, spec.provider,
                            dynamo=dynamo)
    if target >= 1.0:
        latency.warnings.append(f"the dense model already runs in {model.dense_ms(spec.batch):.3f} ms at batch "
                                f"{spec.batch}, within --target-ms {spec.value:g}: nothing to prune")
    return Budget("latency", min(1.0, target), model, latency)
