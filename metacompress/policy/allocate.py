"""The policy's allocation of one model: group features -> scores and repair settings -> kept
units per group on the budget."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from torch import nn

from metacompress.compress.distill import RepairConfig
from metacompress.compress.prune import PruningSpace
from metacompress.policy.features import policy_inputs
from metacompress.policy.network import EXPERT_RULES, decide

MACS_EQUIVALENT_ROUNDS = 5   # fixed-point rounds of ``macs_equivalent``
MACS_EQUIVALENT_TOL = 0.005  # kept MACs fractions closer than this agree

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
    target = budget.feasible_target
    expert_ratios = experts.ratios(target, budget.cost)
    context = target if budget.latency is None else macs_equivalent(
        lambda b: decide(theta, features, b, repair, expert_ratios, policy.kinds_seen).ratio_fn(), space, budget)
    decision = decide(theta, features, context, repair, expert_ratios, policy.kinds_seen)
    return budget.project(space, decision.ratio_fn()), decision.repair


def macs_equivalent(ratio_fn_at: Callable[[float], Callable[[float], Sequence[float]]], space: PruningSpace,
                    budget: "Budget", rounds: int = MACS_EQUIVALENT_ROUNDS) -> float:
    """The kept MACs fraction of the policy's allocation on a latency budget, as a fixed point.

    The policy reads its budget as a kept MACs fraction (what it was meta-trained on), and both
    its allocation and its repair settings depend on it: a latency target of 0.5 can keep 0.2 of
    the MACs, and posed as "0.5" the policy would allocate and repair for a far milder
    compression than it gets. ``ratio_fn_at(b)`` is the policy's allocation told budget ``b``;
    its predicted projection onto the latency target keeps some MACs fraction, which is told to
    the policy again until the two agree.
    """
    b = budget.feasible_target
    for _ in range(rounds):
        kept = space.kept_fraction(budget.latency.predicted_keep(ratio_fn_at(b)), "macs")
        if abs(kept - b) < MACS_EQUIVALENT_TOL:
            return kept
        b = kept
    return b
