"""The allocation stage: how many units each group keeps on the budget, by a fixed rule or the
meta-learned policy (optionally adapted to this task), and what the allocation warns about."""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from metacompress.budget import Budget
from metacompress.compress.distill import RepairConfig
from metacompress.compress.measure import count_macs, count_params
from metacompress.compress.prune import BUDGET_TOL, PruningSpace
from metacompress.compress.robust import Allocation, RobustConfig, robustify
from metacompress.compress.rules import CHANNEL_IMPORTANCE, RULES, rule_allocation
from metacompress.errors import UserError
from metacompress.progress import status
from metacompress.training import accuracy

if TYPE_CHECKING:
    from metacompress.pipeline import CompressConfig, Prepared


def _rounded_cache(fn: Callable[[float], list[int]]) -> Allocation:
    """``fn`` evaluated once per budget rounded to 0.01: robustify draws budgets from a continuous
    range, and the policy's allocation costs a projection per expert rule."""
    cached = functools.lru_cache(maxsize=None)(lambda b: tuple(fn(b)))
    return lambda b: list(cached(round(float(b), 2)))


def budget_allocation(name: str, prep: Prepared, seed: int = 0, policy: str | None = None) -> Allocation:
    """``budget -> units kept per group`` of a fixed rule or of the meta-learned policy (``meta``),
    under the run's cost model: the allocations ``compress.robust`` trains on (it knows no policy)."""
    space, cost = prep.space, prep.budget.cost
    calib = prep.data.calibration_batch(128, seed)
    if name in RULES:
        ratio_fn = rule_allocation(name, space, prep.dense, calib)
        return _rounded_cache(lambda b: space.project(ratio_fn, b, cost))
    if name != "meta":
        raise UserError(f"unknown allocation '{name}': use meta or one of {', '.join(RULES)}")
    from metacompress.policy.features import policy_inputs
    from metacompress.policy.network import EXPERT_RULES, decide
    from metacompress.policy.store import load_policy

    pol = load_policy(policy)
    features, experts = policy_inputs(prep.dense, space, calib, EXPERT_RULES)
    return _rounded_cache(lambda b: space.project(decide(pol.theta, features, b, RepairConfig(), experts.ratios(b, cost),
                                                         pol.kinds_seen).ratio_fn(), b, cost))


def robustify_stage(cfg: CompressConfig, prep: Prepared, rc: RobustConfig) -> list[str]:
    """Make the dense model prune-robust (in place, so it is the teacher of the repair too), over a
    budget range widened to include the run's target; returns robustify's warnings."""
    target = prep.budget.feasible_target
    lo, hi = rc.budgets
    floor = prep.space.floor(prep.budget.cost)
    rc = replace(rc, budgets=(max(min(lo, target), floor), max(hi, target)))
    alloc = budget_allocation(cfg.allocation, prep, cfg.seed, cfg.policy)
    result = robustify(prep.dense, prep.data, prep.space, [alloc], rc, prep.budget.cost, seed=cfg.seed)
    prep.dense_accuracy = accuracy(prep.dense, prep.data.x_test, prep.data.y_test)
    prep.dense_logits = None  # those of the model before robustify: the ONNX check runs the new one
    prep.robust = result.to_dict() | {"dense_test_accuracy": prep.dense_accuracy}
    status(f"robustify: dense validation accuracy {result.dense_val_before:.4f} -> {result.dense_val_after:.4f} "
           f"({result.seconds:.1f} s)")
    return result.warnings


def allocate(cfg: CompressConfig, prep: Prepared) -> tuple[list[int], str, RepairConfig]:
    """Kept units per group that meet the budget, the channel importance, and repair settings."""
    budget = prep.budget
    target = budget.feasible_target
    calib = prep.data.calibration_batch(128, cfg.seed)
    if cfg.allocation in RULES:
        ratio_fn = rule_allocation(cfg.allocation, prep.space, prep.dense, calib)
        keep = budget.project(prep.space, ratio_fn)
        return keep, CHANNEL_IMPORTANCE[cfg.allocation], cfg.repair
    if cfg.allocation != "meta":
        raise UserError(f"unknown allocation '{cfg.allocation}': use meta or one of {', '.join(RULES)}")
    from metacompress.policy.allocate import policy_allocation
    from metacompress.policy.features import policy_inputs
    from metacompress.policy.network import EXPERT_RULES, regime_of
    from metacompress.policy.store import load_policy

    policy = load_policy(cfg.policy)
    inputs = policy_inputs(prep.dense, prep.space, calib, EXPERT_RULES)
    theta = _adapt(policy, cfg, prep, target, inputs) if cfg.adapt_steps > 0 else None
    keep, chosen = policy_allocation(policy, prep.dense, prep.space, calib, budget, cfg.repair, theta, inputs)
    for name in cfg.repair_overrides:  # explicit flags beat the policy
        setattr(chosen, name, getattr(cfg.repair, name))
    status(f"policy ({regime_of(cfg.repair)} regime): repair lr {chosen.lr:.3g}, T {chosen.temperature:.3g}, "
           f"alpha {chosen.alpha:.2f}, BN samples {chosen.bn_samples}")
    return keep, "magnitude", chosen


def _adapt(policy, cfg: CompressConfig, prep: Prepared, target: float, inputs: tuple) -> Any:
    """ES-MAML: a few ES steps of the policy on this very task (validation split reward)."""
    from metacompress.policy.meta_train import adapt
    from metacompress.policy.network import regime_of
    from metacompress.policy.tasks import CompressionTask, Context, TaskPool, Teacher

    data = prep.data
    features, experts = inputs
    pool = TaskPool(cfg.repair, policy.kinds_seen)
    teacher = Teacher(cfg.model, cfg.data, (), cfg.seed)
    pool.register(teacher, Context(teacher, data, prep.dense, prep.space, features,
                                   accuracy(prep.dense, data.x_val, data.y_val), prep.dense_accuracy, experts))
    return adapt(policy.theta, pool, CompressionTask(teacher, target, regime_of(cfg.repair), cfg.seed), cfg.adapt_steps,
                 seed=cfg.seed)


def _kept_whole(space: PruningSpace) -> list[str]:
    """The warning that names the groups kept whole, a few per reason (a ShuffleNet has 21 for one reason)."""
    why: dict[str, list[str]] = {}
    for g in space.groups:
        if g.unsafe:
            why.setdefault(g.unsafe, []).append(f"'{g.name}'")
    if not why:
        return []
    reasons = [f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''} ({reason})" for reason, names in why.items()]
    return [f"{sum(map(len, why.values()))} group(s) kept whole, since pruning them cannot be trusted: "
            f"{'; '.join(reasons[:3])}{'; ...' if len(reasons) > 3 else ''}; the other groups meet the budget"]


def allocation_warnings(space: PruningSpace, keep: list[int], off: list[str], budget: Budget) -> list[str]:
    """What an allocation hides that a user deploying it should know: groups kept whole because
    pruning them cannot be trusted (``Group.unsafe``), a budget that whole units cannot meet within the tolerance,
    the groups ``off`` the rounding grid (which cost speed; ``space.off_grid(keep)``), and a
    latency target missed as measured or below the floor."""
    out = _kept_whole(space)
    if budget.latency is not None:
        return out + budget.latency.warnings_for(keep)
    kept = space.kept_fraction(keep, budget.cost)
    if abs(kept - budget.target) > BUDGET_TOL * budget.target:
        out.append(f"target {budget.metric} {budget.target:g} is not reachable in whole units within {BUDGET_TOL:.0%}: "
                   f"the nearest allocation keeps {kept:.3f}")
    if off:
        out.append(f"{len(off)} group(s) meet the budget only off the round_to={space.round_to} grid "
                   f"({', '.join(off[:3])}{', ...' if len(off) > 3 else ''}): runtimes pad such widths, so expect "
                   f"less speedup than the MACs suggest; a larger target avoids it")
    return out


def counted_miss(space: PruningSpace, keep: list[int], budget: Budget, pruned: nn.Module) -> list[str]:
    """A MACs or params budget checked on the pruned model itself. The projection meets it on the
    analytic cost model (``PruningSpace.estimate``); where that model prices some layer of an
    unusual construct wrongly, only the count shows it, and the user should know."""
    if budget.latency is not None or budget.metric not in ("macs", "params"):
        return []
    if budget.metric == "macs":
        counted = count_macs(pruned, space.example) / space.dense_macs
    else:
        counted = count_params(pruned) / space.dense_params
    predicted = space.kept_fraction(keep, budget.metric)
    if abs(counted - budget.target) <= BUDGET_TOL * budget.target or abs(counted - predicted) <= 1e-3 * predicted:
        return []
    return [f"the pruned model keeps {counted:.3f} of the dense {budget.metric} for a target of {budget.target:g}, where "
            f"the cost model predicted {predicted:.3f}: it prices some layer of this model wrongly; a target of "
            f"{budget.target * budget.target / counted:.3g} should land near {budget.target:g}"]
