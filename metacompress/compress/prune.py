"""How channels are removed: an exact, budget-meeting executor over prunable groups.

``PruningSpace`` knows a model's groups and an analytic cost model (MACs and parameters as a
function of the channels kept per group), so that budget search costs microseconds per
candidate. ``apply`` then removes the least important units of each group with torch-pruning
and the real cost is measured; the allocation (how much per group) comes from elsewhere.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from metacompress.compress.groups import Group, attention_blocks, build_graph, discover_groups
from metacompress.compress.importance import unit_scores
from metacompress.compress.measure import count_macs, count_params, module_macs
from metacompress.errors import UserError

MAX_RATIO = 0.9  # never remove more than 90 % of a group: whole layers are never removed
BUDGET_TOL = 0.02  # project meets the target within this relative tolerance wherever whole units allow


class PruningSpace:
    """The prunable groups of one dense model plus a cost model over per-group kept units."""

    def __init__(self, model: nn.Module, example: torch.Tensor, num_classes: int, round_to: int = 8):
        if round_to < 1:
            raise UserError(f"round_to must be >= 1, got {round_to}")
        self.example = example[:1]
        self.num_classes = num_classes
        self.round_to = round_to
        self.groups: list[Group] = discover_groups(model, self.example, num_classes, round_to)
        self.dense_macs = count_macs(model, self.example)
        self.dense_params = count_params(model)
        self._build_cost_model(model)

    # ----- cost model -------------------------------------------------------------------
    def _build_cost_model(self, model: nn.Module) -> None:
        per_module = module_macs(model, self.example)
        modules = dict(model.named_modules())
        out_of: dict[str, int] = {}
        in_of: dict[str, int] = {}
        for gi, g in enumerate(self.groups):
            for name in g.out_layers:
                out_of[name] = gi
            for name in g.in_layers:
                in_of[name] = gi
        terms = []  # (macs, params, out_group, in_group, depthwise)
        covered = 0
        for name, mod in modules.items():
            if not isinstance(mod, (nn.Conv2d, nn.Linear)):
                continue
            macs = per_module.get(name, 0)
            covered += macs
            depthwise = isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels
            params = mod.weight.numel()
            terms.append((macs, params, out_of.get(name, -1), -1 if depthwise else in_of.get(name, -1), depthwise))
            if mod.bias is not None:
                terms.append((0, mod.bias.numel(), out_of.get(name, -1), -1, False))
        for gi, g in enumerate(self.groups):
            for name in g.norm_layers:
                terms.append((0, count_params(modules[name]), gi, -1, False))
        # attention score/value matmuls scale with the head dims kept
        for qkv, _, _ in attention_blocks(model):
            name = next(n for n, m in modules.items() if m is qkv)
            parent = name.rsplit(".", 1)[0]
            own = per_module.get(parent, 0) - sum(per_module.get(f"{parent}.{c}", 0) for c, _ in
                                                  modules[parent].named_children())
            gi = out_of.get(name, -1)
            terms.append((own, 0, gi, -1, False))
            covered += own
        self._terms = terms
        self._fixed_macs = self.dense_macs - covered
        self._fixed_params = self.dense_params - sum(t[1] for t in terms)

    def fractions(self, keep: Sequence[int]) -> np.ndarray:
        return np.array([k / g.channels for k, g in zip(keep, self.groups)] + [1.0])

    def estimate(self, keep: Sequence[int]) -> tuple[float, float]:
        """Estimated (MACs, params) when group i keeps ``keep[i]`` units."""
        f = self.fractions(keep)
        macs, params = float(self._fixed_macs), float(self._fixed_params)
        for m, p, go, gi, _ in self._terms:
            scale = f[go] * f[gi]
            macs += m * scale
            params += p * scale
        return macs, params

    # ----- rounding ---------------------------------------------------------------------
    @staticmethod
    def unit_step(g: Group, fine: bool = False) -> int:
        """Rounding step of ``g``: its step, or its quantum (single units unless a grouped conv
        needs whole multiples of its conv groups) when ``fine``."""
        return g.quantum if fine else g.step

    def min_keep(self, g: Group, fine: bool = False) -> int:
        step = self.unit_step(g, fine)
        floor = max(1, math.ceil(g.channels * (1 - MAX_RATIO)))
        return min(g.channels, step * math.ceil(floor / step))

    def keep_counts(self, ratios: Sequence[float], fine: bool = False) -> list[int]:
        """Units kept per group for pruning ratios, rounded to each group's step (or to 1: ``fine``)."""
        keep = []
        for r, g in zip(ratios, self.groups):
            step = self.unit_step(g, fine)
            r = float(np.clip(r, 0.0, MAX_RATIO))
            k = step * round(g.channels * (1 - r) / step)
            keep.append(int(min(g.channels, max(self.min_keep(g, fine), k))))
        return keep

    def kept_fraction(self, keep: Sequence[int], metric: str = "macs") -> float:
        """Fraction of the dense MACs (or params) that ``keep`` keeps."""
        idx = 0 if metric == "macs" else 1
        return self.estimate(keep)[idx] / (self.dense_macs, self.dense_params)[idx]

    def off_grid(self, keep: Sequence[int]) -> list[str]:
        """Groups whose kept width is not a multiple of their rounding step, because ``project``
        fell back to single units to meet the budget. Runtimes pad such widths to their channel
        block, so these groups cost speed the MACs do not show (BENCHMARKS.md, round_to=1)."""
        return [g.name for g, k in zip(self.groups, keep) if k != g.channels and k % g.step]

    def floor(self, metric: str = "macs") -> float:
        """The smallest kept fraction of MACs (or params) reachable without removing whole layers."""
        return self.kept_fraction([self.min_keep(g, fine=True) for g in self.groups], metric)

    # ----- budget projection ------------------------------------------------------------
    def project(self, ratio_fn: Callable[[float], Sequence[float]], target: float, metric: str = "macs",
                tol: float = BUDGET_TOL) -> list[int]:
        """Find kept units that meet ``target`` (kept fraction of MACs or params) within ``tol``.

        ``ratio_fn(scale)`` is the allocation: per-group pruning ratios, non-decreasing in
        ``scale`` in [0, 1]. Bisection on ``scale`` keeps the allocation's shape; a greedy pass
        then adds or removes single rounding steps, where the continuous allocation was
        rounded hardest, until the estimate is within half the tolerance.
        """
        if not 0.0 < target <= 1.0:
            raise UserError(f"target must be in (0, 1], got {target}")
        cost = lambda keep: self.kept_fraction(keep, metric)  # noqa: E731
        if target >= 1.0:
            return [g.channels for g in self.groups]
        # rounded channel counts unless the budget is only reachable with finer ones
        fine = cost([self.min_keep(g) for g in self.groups]) > target * (1 + tol)
        floor = cost([self.min_keep(g, fine) for g in self.groups])
        if floor > target * (1 + tol):
            raise UserError(f"target {metric} {target:g} is unreachable without removing whole layers: pruning "
                            f"every group to its limit keeps {floor:.3f} of the {metric}; ask for >= {floor:.2f}")
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if cost(self.keep_counts(ratio_fn(mid), fine)) > target:
                lo = mid
            else:
                hi = mid
        keep = self.keep_counts(ratio_fn(hi), fine)
        want = [g.channels * (1 - float(np.clip(r, 0, MAX_RATIO))) for r, g in zip(ratio_fn(hi), self.groups)]
        keep = self._greedy_fix(keep, want, cost, target, tol, fine)
        if abs(cost(keep) - target) > tol * target:
            # the rounding step is too coarse for this budget: refine with single units
            keep = self._greedy_fix(keep, want, cost, target, tol, fine=True)
        return keep

    def _greedy_fix(self, keep, want, cost, target, tol, fine: bool = False) -> list[int]:
        """Step single groups towards the target (aiming within tol/2, never overshooting tol)."""
        keep = list(keep)
        for _ in range(10 * len(keep) + 100):
            c = cost(keep)
            if abs(c - target) <= tol / 2 * target:
                break
            grow = c < target
            best, best_gap = None, None
            for i, g in enumerate(self.groups):
                step = self.unit_step(g, fine)
                new = keep[i] + (step if grow else -step)
                new = min(g.channels, new) if grow else max(self.min_keep(g, fine), new)
                if new == keep[i]:
                    continue
                trial = keep[:i] + [new] + keep[i + 1:]
                if grow and cost(trial) > target * (1 + tol):
                    continue
                gap = (want[i] - keep[i]) if grow else (keep[i] - want[i])
                if best_gap is None or gap > best_gap:
                    best, best_gap = (i, new), gap
            if best is None:
                break
            keep[best[0]] = best[1]
        return keep

    # ----- execution --------------------------------------------------------------------
    def apply(self, model: nn.Module, keep: Sequence[int], importance: str = "magnitude",
              calib: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
        """Prune ``model`` in place so that group i keeps ``keep[i]`` units (the most important)."""
        if len(keep) != len(self.groups):
            raise ValueError(f"{len(keep)} keep counts for {len(self.groups)} groups")
        dg = build_graph(model, self.example)
        modules = dict(model.named_modules())
        scores = unit_scores(model, self.groups, importance, calib=calib, dg=dg, example=self.example)
        attn = {id(qkv): (proj, heads) for qkv, proj, heads in attention_blocks(model)}
        for g, k, s in zip(self.groups, keep, scores):
            n_remove = g.channels - int(k)
            if n_remove <= 0:
                continue
            drop = drop_indices(s, n_remove, g.conv_groups)
            root = modules[g.name]
            if g.kind == "attention":
                proj, heads = attn[id(root)]
                _prune_head_dims(root, proj, heads, drop)
                continue
            fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
            group = dg.get_pruning_group(root, fn, idxs=sorted(drop))
            if not dg.check_pruning_group(group):
                raise UserError(f"pruning group '{g.name}' would remove a whole layer; lower the target")
            group.prune()
        return model


def drop_indices(scores: torch.Tensor, n_remove: int, conv_groups: int = 1) -> list[int]:
    """The ``n_remove`` least important units; with G conv groups, the same offsets in each.

    torch-pruning's ``ConvPruner.prune_in_channels`` keeps the first ``kept // groups`` kept
    indices as the in-group offsets of every conv group, so a grouped conv is only pruned right
    when each conv group loses the same offsets; the offsets are ranked by their score averaged
    over the G conv groups (as torch-pruning's own ``BasePruner`` does with ``in_channel_groups``).
    """
    if conv_groups <= 1:
        return sorted(torch.argsort(scores)[:n_remove].tolist())
    if n_remove % conv_groups or len(scores) % conv_groups:
        raise ValueError(f"cannot remove {n_remove} of {len(scores)} units evenly from {conv_groups} conv groups")
    width = len(scores) // conv_groups
    offsets = torch.argsort(scores.view(conv_groups, width).mean(0))[:n_remove // conv_groups].tolist()
    return sorted(b * width + o for b in range(conv_groups) for o in offsets)


def _prune_head_dims(qkv: nn.Linear, proj: nn.Linear, heads: int, drop: list[int]) -> None:
    """Remove the same head dims from q, k and v of every head, and the matching proj inputs."""
    head_dim = qkv.out_features // 3 // heads
    rows = [p * heads * head_dim + h * head_dim + j for p in range(3) for h in range(heads) for j in drop]
    cols = [h * head_dim + j for h in range(heads) for j in drop]
    tp.prune_linear_out_channels(qkv, sorted(rows))
    tp.prune_linear_in_channels(proj, sorted(cols))
