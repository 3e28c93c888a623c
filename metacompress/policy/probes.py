"""Data probes: what pruning one group alone does to the loss, and the allocation that implies.

A group's loss curve is the calibration-loss increase when that group alone loses its least
important 15, 30, ..., 90 % of units. Probes mask units instead of pruning: zeroing a unit at
every consumer's input (and in attention, the q/k/v dims) computes exactly what the pruned
model would, with one forward pass per probe and no copies.

Probes run BatchNorm layers on the probe batch's own statistics (``batch_statistics``): every
repair regime starts by recalibrating BN, so the loss that matters is the recalibrated one, and
with the running statistics a pruned BN network looks far worse than it will be (on the
meta-training teachers the sensitivity allocation went from -0.8 to +1.3 points over LAMP, on
vgg-small from -5.4 to +0.3; BENCHMARKS.md). Networks without BN are unaffected.

Treating the groups' increases as additive gives the classic sensitivity-analysis allocation
(Distiller, NNI's sensitivity pruner): for a price ``lam`` on cost, each group takes the ratio
that minimises ``curve(r) - lam * share * r``; ``PruningSpace.project`` bisects the price to
meet the budget. The policy mixes it with the magnitude-based rules: it measures the loss
instead of trusting weight scales, so it carries over to families where those scales mislead
(on LayerNorm transformers LAMP and uniform are 5-30 points apart; BENCHMARKS.md).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metacompress.compress.groups import CHANNEL_LAYERS, Group, in_width
from metacompress.compress.importance import unit_scores
from metacompress.compress.prune import MAX_RATIO, Metric, PruningSpace
from metacompress.meta.modules import batchnorm_layers
from metacompress.policy.probe_plan import ForwardProfile, PrefixCache, ProbePlan, masked_modules, plan_probes, profile_forward

CURVE_RATIOS = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9)  # up to MAX_RATIO
MACS_PER_CURVE_POINT = 1e9  # MACs the probes of one curve point may spend over all groups: the whole
                            # curve takes seconds on two CPU cores
PROBE_BATCH = (8, 128)      # fewest and most calibration samples a probe runs on


@contextmanager
def masked(model: nn.Module, group: Group, drop: torch.Tensor) -> Iterator[None]:
    """Zero the group's dropped units wherever they are consumed (``masked_modules``), for the
    duration of the block: in attention, the dropped q/k/v dims at the qkv projection's output;
    otherwise the dropped input channels of every consumer."""
    modules = dict(model.named_modules())
    handles = []
    for name in masked_modules(group):
        layer = modules[name]
        if group.kind == "attention":
            hd = group.channels
            rows = torch.tensor([p * group.heads * hd + h * hd + int(j) for p in range(3)
                                 for h in range(group.heads) for j in drop])
            mask = torch.ones(layer.out_features)
            mask[rows] = 0
            handles.append(layer.register_forward_hook(lambda m, i, o, mask=mask: o * mask))
            continue
        width = in_width(layer)
        mask = torch.ones(width)
        if width != group.channels:  # e.g. flatten before a linear layer: units repeat spatially
            per = width // group.channels
            idx = (drop.view(-1, 1) * per + torch.arange(per)).flatten()
        else:
            idx = drop
        mask[idx] = 0
        shape = (1, -1) + (1,) * (layer.weight.dim() - 2) if isinstance(layer, CHANNEL_LAYERS) else (1, -1)

        def hook(m, inputs, mask=mask.view(*shape)):
            return (inputs[0] * mask,) + tuple(inputs[1:])

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Run every BatchNorm layer on the current batch's statistics for the duration of the block,
    without touching its running statistics or counters (what BN recalibration on that batch
    would give, less the unbiased-variance correction)."""
    bns = batchnorm_layers(model)
    saved = [(m.training, m.track_running_stats) for m in bns]
    for m in bns:
        m.train()
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, (training, track) in zip(bns, saved):
            m.train(training)
            m.track_running_stats = track


def probe_samples(space: PruningSpace, passes: int | None = None) -> int:
    """Calibration samples a probe runs on: what MACS_PER_CURVE_POINT allows for ``passes`` forward
    passes (default: one per group, a curve point), within PROBE_BATCH."""
    passes = len(space.groups) if passes is None else passes
    return int(np.clip(MACS_PER_CURVE_POINT / (max(1, space.dense_macs) * max(1, passes)), *PROBE_BATCH))


@dataclass(frozen=True)
class ProbeSetup:
    """What the loss-curve calls on one model share: the probe batch, its forward profile and the
    probe plan (calls that must agree on which groups they measure take the same setup)."""

    x: torch.Tensor
    y: torch.Tensor
    profile: ForwardProfile
    plan: ProbePlan


def probe_setup(model: nn.Module, space: PruningSpace, calib: tuple[torch.Tensor, torch.Tensor],
                points: int) -> ProbeSetup:
    """The probe batch (``probe_samples``), profile and plan for ``points`` probes per group over all calls."""
    n = probe_samples(space)
    x, y = calib[0][:n], calib[1][:n]
    model.eval()
    profile = profile_forward(model, x)
    return ProbeSetup(x, y, profile, plan_probes(space.groups, profile, n, points))


def loss_curves(model: nn.Module, space: PruningSpace, calib: tuple[torch.Tensor, torch.Tensor],
                scores: list[torch.Tensor] | None = None, ratios: Sequence[float] = CURVE_RATIOS,
                batch_stats: bool = True, setup: ProbeSetup | None = None) -> np.ndarray:
    """(groups x ratios) calibration-loss increase when the group alone loses that share of its
    least important units (L2 magnitude unless ``scores`` are given), with BatchNorm on the
    batch's statistics (``batch_stats``) or on its running ones, on ``probe_samples`` samples.

    Probes reuse the unmasked pass's layers before the group, and on a model too large to probe
    every group within the budget, a spread subset is measured and shared (``probe_plan``);
    ``setup``: the batch and plan shared with the caller's other calls (default: planned for
    ``ratios`` alone)."""
    if scores is None:
        scores = unit_scores(model, space.groups, "magnitude", example=space.example)
    setup = setup or probe_setup(model, space, calib, len(ratios))
    x, y, plan = setup.x, setup.y, setup.plan
    model.eval()
    out = np.zeros((len(space.groups), len(ratios)))
    with torch.no_grad(), (batch_statistics(model) if batch_stats else nullcontext()):
        cache = PrefixCache(model, setup.profile)
        base = F.cross_entropy(cache.record(x), y).item()
        for gi in plan.probed:
            g, order = space.groups[gi], torch.argsort(scores[gi])
            for ri, r in enumerate(ratios):
                k = min(g.channels - 1, int(round(r * g.channels)))
                if k <= 0:
                    continue
                with masked(model, g, order[:k]), cache.replaying(plan.prefix[gi]):
                    out[gi, ri] = F.cross_entropy(model(x), y).item() - base
    return out[list(plan.source)]


def allocation_loss(model: nn.Module, space: PruningSpace, keep: Sequence[int],
                    calib: tuple[torch.Tensor, torch.Tensor], scores: list[torch.Tensor]) -> float:
    """Calibration loss of the whole allocation ``keep`` (every group masked at once to its least
    important units, BatchNorm on the batch's statistics as BN recalibration would give): ranks
    allocations of one model by what they cost before repair, at the probes' batch size."""
    n = probe_samples(space, passes=1)
    x, y = calib[0][:n], calib[1][:n]
    model.eval()
    with torch.no_grad(), batch_statistics(model), ExitStack() as stack:
        for g, s, k in zip(space.groups, scores, keep):
            if k < g.channels:
                stack.enter_context(masked(model, g, torch.argsort(s)[:g.channels - k]))
        return F.cross_entropy(model(x), y).item()


def removable_shares(space: PruningSpace) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of MACs / params that disappears when a group alone shrinks to nothing."""
    full = [g.channels for g in space.groups]
    macs0, params0 = space.estimate(full)
    mac_share, param_share = [], []
    for i in range(len(space.groups)):
        keep = list(full)
        keep[i] = 0
        m, p = space.estimate(keep)
        mac_share.append((macs0 - m) / macs0)
        param_share.append((params0 - p) / params0)
    return np.array(mac_share), np.array(param_share)


def removable_share(space: PruningSpace, metric: Metric = "macs") -> np.ndarray:
    """Fraction of the cost (``metric``: macs, params or a latency ``CostModel``) that disappears
    when a group alone shrinks to nothing."""
    if isinstance(metric, str):
        return removable_shares(space)[("macs", "params").index(metric)]
    full = [g.channels for g in space.groups]
    base = space.kept_fraction(full, metric)
    shares = []
    for i in range(len(space.groups)):
        keep = list(full)
        keep[i] = 0
        shares.append(base - space.kept_fraction(keep, metric))
    return np.array(shares) / base


def sensitivity_allocation(curves: np.ndarray, share: np.ndarray) -> Callable[[float], Sequence[float]]:
    """``scale -> ratios`` minimising the summed loss increase at a price on cost that rises
    with ``scale`` (1e-4 .. 1e4, log-spaced); non-decreasing in ``scale`` as project() needs."""
    grid = np.array((0.0, *CURVE_RATIOS)) * (MAX_RATIO / max(CURVE_RATIOS))
    # increases below zero are noise; a curve that dips is flattened so more pruning never looks cheaper
    cost = np.maximum.accumulate(np.maximum(np.column_stack([np.zeros(len(curves)), curves]), 0.0), axis=1)
    gain = np.asarray(share, dtype=np.float64)[:, None] * grid[None]

    def ratios(scale: float) -> list[float]:
        price = 10.0 ** (-4.0 + 8.0 * scale)
        return list(grid[np.argmin(cost - price * gain, axis=1)])

    return ratios
