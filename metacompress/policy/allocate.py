"""The policy's allocation of one model: group features -> scores and repair settings -> kept
units per group on the budget."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from metacompress.compress.distill import RepairConfig
from metacompress.compress.prune import PruningSpace
from metacompress.policy.features import policy_inputs
from metacompress.policy.network import EXPERT_RULES, decide

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
    target = budget.feasible_target
    decision = decide(policy.theta if theta is None else theta, features, target, repair,
                      experts.ratios(target, budget.cost), policy.kinds_seen)
    return budget.project(space, decision.ratio_fn()), decision.repair
