"""The policy's allocation of one model: group features -> scores and repair settings -> kept
units per group on the budget."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn

from metacompress.compress.distill import RepairConfig
from metacompress.compress.importance import unit_scores
from metacompress.compress.prune import PruningSpace
from metacompress.policy.features import policy_inputs
from metacompress.policy.network import EXPERT_RULES, Decision, decide
from metacompress.policy.probes import allocation_loss

LATENCY_CONTEXTS = 6  # kept MACs fractions the policy is asked at on a latency budget

if TYPE_CHECKING:
    from metacompress.budget import Budget
    from metacompress.policy.store import Policy


def policy_allocation(policy: "Policy", model: nn.Module, space: PruningSpace,
                      calib: tuple[torch.Tensor, torch.Tensor], budget: "Budget", repair: RepairConfig,
                      theta: np.ndarray | None = None, inputs: tuple | None = None
                      ) -> tuple[list[int], RepairConfig]:
    """Kept units per group meeting ``budget`` and the repair settings the policy picks for the
    regime ``repair`` describes (``theta`` overrides the policy's weights, e.g. after adaptation;
    ``inputs``: ``policy_inputs`` already computed for this model)."""
    features, experts = inputs or policy_inputs(model, space, calib, EXPERT_RULES)
    theta = policy.theta if theta is None else theta

    def told(b: float, metric="macs") -> Decision:
        return decide(theta, features, b, repair, experts.ratios(b, metric), policy.kinds_seen)

    if budget.latency is None:
        decision = told(budget.target, budget.cost)
        return budget.project(space, decision.ratio_fn()), decision.repair
    decision = latency_decision(told, model, space, calib, budget)
    keep = budget.project(space, decision.ratio_fn())
    return keep, told(space.kept_fraction(keep, "macs")).repair


def latency_decision(told: Callable[..., Decision], model: nn.Module, space: PruningSpace,
                     calib: tuple[torch.Tensor, torch.Tensor], budget: "Budget") -> Decision:
    """The policy's allocation for a latency budget: of the allocations it gives when told a
    range of kept MACs fractions (what it was meta-trained on) and the one from its experts
    projected on the latency model, the one with the lowest calibration loss at the target
    latency as predicted.

    A latency target does not say how many MACs it keeps (allocations that run equally fast can
    keep MACs fractions far apart, depending on where the pruning goes), and the policy allocates
    and picks repair settings by the MACs fraction it is told. The latency model makes each
    candidate's projection cost microseconds, and one masked forward pass ranks them.
    """
    target, lat = budget.feasible_target, budget.latency
    first = told(target, budget.cost)
    first_keep = tuple(lat.predicted_keep(first.ratio_fn()))
    kept = space.kept_fraction(first_keep, "macs")
    lowest = max(0.02, kept / 2, space.floor("macs"))  # the experts allocate no lower than pruning reaches
    contexts = np.geomspace(lowest, max(target, kept, lowest), LATENCY_CONTEXTS)
    candidates = {first_keep: first} | {tuple(lat.predicted_keep(d.ratio_fn())): d for d in map(told, contexts)}
    scores = unit_scores(model, space.groups, "magnitude", example=space.example)
    best = min(candidates, key=lambda keep: allocation_loss(model, space, keep, calib, scores))
    return candidates[best]
