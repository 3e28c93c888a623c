"""How much goes where, by fixed rules: the allocations other toolkits ship.

Each allocation is a function ``scale -> per-group pruning ratios`` (non-decreasing in
``scale``); ``PruningSpace.project`` turns it into kept channels that meet the budget.

- ``uniform``: the same ratio everywhere (L2 magnitude picks the channels);
- ``global-magnitude`` / ``global-taylor`` / ``lamp``: one threshold over all groups' unit
  scores (mean-normalised magnitude, Taylor, LAMP); a group's ratio is the share of its
  units below the threshold.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from metacompress.compress.importance import unit_scores
from metacompress.compress.prune import MAX_RATIO, PruningSpace

RULES = ("uniform", "global-magnitude", "global-taylor", "lamp")

# which unit scores pick the channels once an allocation has decided how many
CHANNEL_IMPORTANCE = {"uniform": "magnitude", "global-magnitude": "magnitude",
                      "global-taylor": "taylor", "lamp": "magnitude"}
# which unit scores a ranking rule thresholds to decide how many
RULE_SCORES = {"global-magnitude": "magnitude", "global-taylor": "taylor", "lamp": "lamp"}


def rule_allocation(rule: str, space: PruningSpace, model: nn.Module, calib: tuple[torch.Tensor, torch.Tensor],
                    scores: list[torch.Tensor] | None = None) -> Callable[[float], Sequence[float]]:
    """The allocation function of a fixed rule, for ``space`` built on ``model`` (``scores``: the
    rule's ``RULE_SCORES`` unit scores, if already computed)."""
    n = len(space.groups)
    if rule == "uniform":
        return lambda s: [s * MAX_RATIO] * n
    if scores is None:
        scores = unit_scores(model, space.groups, RULE_SCORES[rule], calib=calib, example=space.example)
    scores = [s.numpy() for s in scores]
    pooled = np.sort(np.concatenate(scores))

    def ratios(scale: float) -> list[float]:
        if scale <= 0:
            return [0.0] * n
        t = pooled[min(len(pooled) - 1, int(scale * len(pooled)))]
        return [float(np.mean(s < t)) if scale < 1 else 1.0 for s in scores]

    return ratios
