"""Per-group descriptors the policy sees: structure plus cheap data probes.

Structure: relative depth, share of MACs and parameters that scale with the group, width,
kernel area, stride, layer kind, coupled-through-a-residual. Probes: the loss increase on a
calibration batch when this group alone loses its least important 30/60/90 % of units, and
how concentrated its unit importance is. Probes mask the group's units instead of pruning:
zeroing a unit at every consumer's input (and in attention, the q/k/v dims) computes exactly
what the pruned model would, with one forward pass per probe and no copies.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metacompress.compress.baselines import rule_allocation
from metacompress.compress.groups import KINDS, Group
from metacompress.compress.importance import unit_scores
from metacompress.compress.prune import PruningSpace

PROBE_RATIOS = (0.3, 0.6, 0.9)
FEATURE_NAMES = (
    ["depth", "mac_share", "param_share", "log_width", "kernel", "strided", "residual"]
    + [f"kind_{k}" for k in KINDS]
    + [f"probe_{int(r * 100)}" for r in PROBE_RATIOS]
    + ["probe_rank", "concentration"]
)
NUM_FEATURES = len(FEATURE_NAMES)
PROBE_MACS_BUDGET = 3e9  # MACs spent on probes at most: seconds on two CPU cores


@contextmanager
def _masked(model: nn.Module, group: Group, drop: torch.Tensor) -> Iterator[None]:
    """Zero the group's dropped units wherever they are consumed, for the duration of the block."""
    modules = dict(model.named_modules())
    handles = []
    if group.kind == "attention":
        qkv = modules[group.name]
        hd = group.channels
        rows = torch.tensor([p * group.heads * hd + h * hd + int(j) for p in range(3)
                             for h in range(group.heads) for j in drop])
        mask = torch.ones(qkv.out_features)
        mask[rows] = 0
        handles.append(qkv.register_forward_hook(lambda m, i, o: o * mask))
    else:
        for name in group.in_layers:
            layer = modules[name]
            width = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
            mask = torch.ones(width)
            if width != group.channels:  # e.g. flatten before a linear layer: units repeat spatially
                per = width // group.channels
                idx = (drop.view(-1, 1) * per + torch.arange(per)).flatten()
            else:
                idx = drop
            mask[idx] = 0
            shape = (1, -1, 1, 1) if isinstance(layer, nn.Conv2d) else (1, -1)

            def hook(m, inputs, mask=mask.view(*shape)):
                return (inputs[0] * mask,) + tuple(inputs[1:])

            handles.append(layer.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _shares(space: PruningSpace) -> tuple[np.ndarray, np.ndarray]:
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


@torch.no_grad()
def _probes(model: nn.Module, space: PruningSpace, scores: list[torch.Tensor], x: torch.Tensor,
            y: torch.Tensor) -> np.ndarray:
    model.eval()
    base = F.cross_entropy(model(x), y).item()
    out = np.zeros((len(space.groups), len(PROBE_RATIOS)))
    for gi, (g, s) in enumerate(zip(space.groups, scores)):
        order = torch.argsort(s)
        for ri, r in enumerate(PROBE_RATIOS):
            n = min(g.channels - 1, int(round(r * g.channels)))
            if n <= 0:
                continue
            with _masked(model, g, order[:n]):
                out[gi, ri] = F.cross_entropy(model(x), y).item() - base
    return out


def group_features(model: nn.Module, space: PruningSpace, calib: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    """A (groups x NUM_FEATURES) array of normalised descriptors for ``model``'s groups."""
    groups = space.groups
    n = len(groups)
    modules = [name for name, _ in model.named_modules()]
    order = {name: i for i, name in enumerate(modules)}
    depth_pos = np.array([order.get(g.name, 0) for g in groups], dtype=float)
    depth = (depth_pos - depth_pos.min()) / max(1.0, depth_pos.max() - depth_pos.min())
    mac_share, param_share = _shares(space)
    scores = unit_scores(model, groups, "magnitude", example=space.example)
    # probe batch: as many samples as the MACs budget allows for all probes, 16..128
    per_pass = max(1, space.dense_macs) * n * len(PROBE_RATIOS)
    n_probe = int(np.clip(PROBE_MACS_BUDGET / per_pass, 16, 128))
    x, y = calib[0][:n_probe], calib[1][:n_probe]
    probes = _probes(model, space, scores, x, y)
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


class ExpertAllocations:
    """The fixed rules' allocations for one model, at any budget (scores computed once)."""

    def __init__(self, model: nn.Module, space: PruningSpace, calib: tuple[torch.Tensor, torch.Tensor],
                 rules: tuple[str, ...]):
        self.space = space
        # gradient-based scores (Taylor) cost a forward and a backward pass (~3 forwards) per
        # sample: on a large model the calibration batch shrinks to the probes' MACs budget
        n = int(np.clip(PROBE_MACS_BUDGET / max(1, 3 * space.dense_macs), 16, len(calib[0])))
        calib = (calib[0][:n], calib[1][:n])
        self._fns = [rule_allocation(rule, space, model, calib) for rule in rules]

    def ratios(self, budget: float, metric: str = "macs") -> np.ndarray:
        """(groups x rules) pruning ratios each rule gives at ``budget``."""
        channels = np.array([g.channels for g in self.space.groups], dtype=float)
        cols = [1 - np.asarray(self.space.project(fn, budget, metric)) / channels for fn in self._fns]
        return np.stack(cols, axis=1)
