"""Per-group descriptors the policy sees: structure plus cheap data probes.

Structure: relative depth, share of MACs and parameters that scale with the group, width,
kernel area, stride, layer kind, coupled-through-a-residual. Probes: the loss increase on a
calibration batch when this group alone loses its least important 30/60/90 % of units
(``probes.loss_curves``), and how concentrated its unit importance is.

The probe features keep BatchNorm on its running statistics, while the sensitivity expert's
curves use the batch's own (``probes.batch_statistics``). Why two: the policy's embedding, and
with it the repair head, was meta-trained on the former; retraining it on batch-statistics
features moved the repair settings it predicts and lost 1.7 points of transfer to held-out
families (BENCHMARKS.md), while the expert gains from the latter. On a network without BN the
two are the same and are measured once.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from metacompress.compress.groups import KINDS
from metacompress.compress.importance import unit_scores, unit_scores_by_method
from metacompress.compress.prune import Metric, PruningSpace
from metacompress.compress.rules import RULE_SCORES, rule_allocation
from metacompress.meta.modules import has_batchnorm
from metacompress.policy.probes import (
    CURVE_RATIOS,
    loss_curves,
    probe_setup,
    removable_share,
    removable_shares,
    sensitivity_allocation,
)

PROBE_RATIOS = (0.3, 0.6, 0.9)  # points of the loss curve the network sees
FEATURE_NAMES = (
    ["depth", "mac_share", "param_share", "log_width", "kernel", "strided", "residual"]
    + [f"kind_{k}" for k in KINDS]
    + [f"probe_{int(r * 100)}" for r in PROBE_RATIOS]
    + ["probe_rank", "concentration"]
)
NUM_FEATURES = len(FEATURE_NAMES)
TAYLOR_MACS_BUDGET = 3e9  # MACs the Taylor expert's calibration pass may spend: seconds on two CPU cores
TAYLOR_MIN_SAMPLES = 8    # fewest samples it runs on, whatever the model's size


def group_features(model: nn.Module, space: PruningSpace, calib: tuple[torch.Tensor, torch.Tensor],
                   probes: np.ndarray | None = None, scores: list[torch.Tensor] | None = None) -> np.ndarray:
    """A (groups x NUM_FEATURES) array of normalised descriptors for ``model``'s groups
    (``probes`` / ``scores``: their loss increases at PROBE_RATIOS on ``calib``, BN on running
    statistics, and L2-magnitude unit scores, if already computed)."""
    groups = space.groups
    n = len(groups)
    modules = [name for name, _ in model.named_modules()]
    order = {name: i for i, name in enumerate(modules)}
    depth_pos = np.array([order.get(g.name, 0) for g in groups], dtype=float)
    depth = (depth_pos - depth_pos.min()) / max(1.0, depth_pos.max() - depth_pos.min())
    mac_share, param_share = removable_shares(space)
    if scores is None:
        scores = unit_scores(model, groups, "magnitude", example=space.example)
    if probes is None:
        probes = loss_curves(model, space, calib, scores, PROBE_RATIOS, batch_stats=False)
    probe_log = np.log1p(np.maximum(probes, 0.0))
    mid = probe_log[:, 1]
    probe_rank = (np.argsort(np.argsort(mid)) / max(1, n - 1)) if n > 1 else np.zeros(1)
    conc = []
    for s in scores:
        sq = np.sort(s.numpy() ** 2)[::-1]
        top = max(1, int(math.ceil(0.25 * len(sq))))
        conc.append(float(sq[:top].sum() / max(sq.sum(), 1e-12)))
    rows = []
    for i, g in enumerate(groups):
        kind = [1.0 if g.kind == k else 0.0 for k in KINDS]
        rows.append([depth[i], mac_share[i], param_share[i], math.log2(max(1, g.channels * g.heads)) / 10,
                     g.kernel / 9, float(g.stride > 1), float(g.residual), *kind,
                     *probe_log[i], probe_rank[i], conc[i]])
    return np.asarray(rows, dtype=np.float32)


# what an unseen kind is shown as: the closest kinds, in order (a depthwise conv is a conv; an
# attention head dimension is a linear layer's output unit)
KIND_FALLBACK = {"depthwise": ("conv", "linear"), "attention": ("linear", "conv"),
                 "conv": ("linear",), "linear": ("conv",)}


def fold_unseen_kinds(features: np.ndarray, seen: tuple[str, ...] | None) -> np.ndarray:
    """Show groups of a kind the policy never met in meta-training as the closest kind it met.

    Why: a one-hot column that is always 0 during meta-training has no effect on the reward,
    so evolution strategies random-walk its input weights; left in place, that noise would
    shift every such group's ratio arbitrarily on a new family (mobilenet's depthwise groups,
    a ViT's attention groups). ``seen`` None: fold nothing (the policy met every kind).
    """
    if seen is None:
        return features
    out = np.array(features, copy=True)
    for kind in KINDS:
        if kind in seen:
            continue
        target = next((k for k in KIND_FALLBACK[kind] if k in seen), None)
        if target is None:
            continue
        col, dst = FEATURE_NAMES.index(f"kind_{kind}"), FEATURE_NAMES.index(f"kind_{target}")
        out[:, dst] += out[:, col]
        out[:, col] = 0.0
    return out


def taylor_batch(space: PruningSpace, calib: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration batch gradient-based scores run on: a forward and a backward pass (~3
    forwards) per sample, so on a large model it shrinks to fit TAYLOR_MACS_BUDGET."""
    n = int(np.clip(TAYLOR_MACS_BUDGET / max(1, 3 * space.dense_macs), TAYLOR_MIN_SAMPLES, len(calib[0])))
    return calib[0][:n], calib[1][:n]


def expert_scores(model: nn.Module, space: PruningSpace, calib: tuple[torch.Tensor, torch.Tensor],
                  rules: tuple[str, ...], extra: tuple[str, ...] = ()) -> dict[str, list[torch.Tensor]]:
    """The unit scores the ranking rules among ``rules`` need, and ``extra`` methods, in one pass."""
    methods = tuple(dict.fromkeys((*extra, *(RULE_SCORES[r] for r in rules if r in RULE_SCORES))))
    return unit_scores_by_method(model, space.groups, methods, calib=taylor_batch(space, calib), example=space.example)


class ExpertAllocations:
    """The allocations the policy mixes, for one model at any budget (scores computed once): the
    fixed rules' and ``sensitivity`` (from the groups' loss curves, ``curves`` if computed;
    ``scores``: ``expert_scores`` if computed)."""

    def __init__(self, model: nn.Module, space: PruningSpace, calib: tuple[torch.Tensor, torch.Tensor],
                 rules: tuple[str, ...], curves: np.ndarray | None = None,
                 scores: dict[str, list[torch.Tensor]] | None = None):
        self.space = space
        self.rules = rules
        if "sensitivity" in rules:
            self._curves = loss_curves(model, space, calib) if curves is None else curves
            self._shares: dict[str, np.ndarray] = {}
        scores = expert_scores(model, space, calib, rules) if scores is None else scores
        self._fns = {rule: rule_allocation(rule, space, model, calib, scores.get(RULE_SCORES.get(rule, "")))
                     for rule in rules if rule != "sensitivity"}

    def allocation(self, rule: str, metric: Metric = "macs"):
        """One expert's ``scale -> ratios`` function (for ``PruningSpace.project``); the sensitivity
        expert weighs each group's loss against the share of ``metric`` it can remove."""
        if rule == "sensitivity":
            name = metric if isinstance(metric, str) else metric.name
            if name not in self._shares:
                self._shares[name] = removable_share(self.space, metric)
            return sensitivity_allocation(self._curves, self._shares[name])
        return self._fns[rule]

    def ratios(self, budget: float, metric: Metric = "macs") -> np.ndarray:
        """(groups x rules) pruning ratios each rule gives at ``budget``."""
        channels = np.array([g.channels for g in self.space.groups], dtype=float)
        cols = [1 - np.asarray(self.space.project(self.allocation(rule, metric), budget, metric)) / channels
                for rule in self.rules]
        return np.stack(cols, axis=1)


def policy_inputs(model: nn.Module, space: PruningSpace, calib: tuple[torch.Tensor, torch.Tensor],
                  rules: tuple[str, ...]) -> tuple[np.ndarray, ExpertAllocations]:
    """What the policy reads for one model: its group features and its experts' allocations.

    Both come from loss curves ranked by the same magnitude scores, computed once: they are the
    costly part of allocating on a large model. Without BN the features read their probes off
    the expert's curves; with BN they are measured again on running statistics (module doc).
    """
    by_method = expert_scores(model, space, calib, rules, extra=("magnitude",))
    scores = by_method["magnitude"]
    bn = has_batchnorm(model)
    setup = probe_setup(model, space, calib, len(CURVE_RATIOS) + (len(PROBE_RATIOS) if bn else 0))
    curves = loss_curves(model, space, calib, scores, setup=setup)
    probes = (loss_curves(model, space, calib, scores, PROBE_RATIOS, batch_stats=False, setup=setup) if bn
              else curves[:, [CURVE_RATIOS.index(r) for r in PROBE_RATIOS]])
    return (group_features(model, space, calib, probes, scores),
            ExpertAllocations(model, space, calib, rules, curves, by_method))
