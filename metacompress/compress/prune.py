"""How channels are removed: an exact, budget-meeting executor over prunable groups.

``PruningSpace`` knows a model's groups and an analytic cost model (MACs and parameters as a
function of the channels kept per group), so that budget search costs microseconds per
candidate. Any other cost (a runtime's latency model, say) plugs in as a ``CostModel``: the
space describes every layer's widths (``layers``) and the projection only asks the cost model
for the kept fraction of an allocation. ``apply`` then removes the least important units of
each group with torch-pruning; the allocation (how much per group) comes from elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, Union

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from metacompress.compress.groups import (
    CHANNEL_LAYERS,
    MISMAPPED,
    WIDTH_LAYERS,
    Group,
    attention_blocks,
    build_graph,
    discover_groups,
    in_width,
    is_depthwise,
    kernel_area,
    norm_width,
    out_channel_pruner,
    out_width,
    prune_group,
    pruning_error,
    run_one,
)
from metacompress.compress.importance import unit_scores
from metacompress.compress.measure import count_macs, count_params, module_macs
from metacompress.errors import UserError, first_line

MAX_RATIO = 0.9  # never remove more than 90 % of a group: whole layers are never removed
POLISH_CANDIDATES = 5000  # allocations a round of the off-target fallback of the budget projection may price
BUDGET_TOL = 0.02  # project meets the target within this relative tolerance wherever whole units allow


class CostModel(Protocol):
    """A cost of the pruned model as a function of the units kept per group."""

    name: str

    def fraction(self, keep: Sequence[int]) -> float:
        """Kept fraction of the dense model's cost when group i keeps ``keep[i]`` units."""
        ...


Metric = Union[str, CostModel]  # "macs", "params" (analytic, built in) or a CostModel


@dataclass(frozen=True)
class LayerTerm:
    """One conv or linear layer (or an attention block's own matmuls) of the dense model, with
    the groups that set its output and input widths (-1: not pruned)."""

    name: str
    kind: str          # conv (k x k), pointwise (1 x 1 conv), depthwise, linear, attention
    macs: int          # at batch 1, dense
    out_elems: int     # output activations at batch 1, dense
    out_channels: int
    in_channels: int
    out_group: int
    in_group: int      # the group that sets its input width; -1: none, or several (``in_shares``)
    in_shares: tuple[tuple[int, float], ...] = ()  # input fed by several groups (a concat): (group, share)
    out_shares: tuple[tuple[int, float], ...] = ()  # output set by several groups, or by one in part; out_group -1


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
        out_of: dict[str, list[int]] = {}
        in_of: dict[str, list[int]] = {}
        norm_of: dict[str, list[int]] = {}
        for gi, g in enumerate(self.groups):
            if g.whole:  # never narrower; an untrusted group may list layers that another group sets
                continue
            for name in g.out_layers:
                out_of.setdefault(name, []).append(gi)
            for name in g.in_layers:
                in_of.setdefault(name, []).append(gi)
            for name in g.norm_layers:
                norm_of.setdefault(name, []).append(gi)

        terms = []  # (macs, params, output, input): each a group index or (shares, rest)
        layers: list[LayerTerm] = []
        covered = 0
        for name, mod in modules.items():
            if not isinstance(mod, WIDTH_LAYERS):
                continue
            macs = per_module.get(name, 0)
            covered += macs
            # a residual stream that concatenates several groups' channels is one layer's output (Inception-ResNet)
            output = self._width_source(out_of.get(name, []), out_width(mod), f"out:{name}")
            source = -1 if is_depthwise(mod) else self._width_source(in_of.get(name, []), in_width(mod), f"in:{name}")
            terms.append((macs, mod.weight.numel(), output, source))
            layers.append(_layer_term(name, mod, macs, output, source))
            if mod.bias is not None:
                terms.append((0, mod.bias.numel(), output, -1))
        for name, gis in norm_of.items():  # a norm over a concat is shared by the groups that feed it
            norm = modules[name]
            terms.append((0, count_params(norm), -1, self._width_source(gis, norm_width(norm), f"norm:{name}")))
        # attention score/value matmuls scale with the head dims kept
        for qkv, _, _ in attention_blocks(model):
            name = next(n for n, m in modules.items() if m is qkv)
            parent = name.rsplit(".", 1)[0] if "." in name else ""  # "": qkv is an attribute of the model itself
            own = per_module.get(parent, 0) - sum(per_module.get(f"{parent}.{c}".lstrip("."), 0) for c, _ in
                                                  modules[parent].named_children())
            gi = out_of[name][0] if len(out_of.get(name, [])) == 1 else -1
            terms.append((own, 0, gi, -1))
            layers.append(LayerTerm(parent, "attention", own, 0, qkv.out_features // 3, qkv.out_features // 3, gi, -1))
            covered += own
        self._term_macs = np.array([t[0] for t in terms], dtype=np.float64)
        self._term_params = np.array([t[1] for t in terms], dtype=np.float64)
        self._term_out = self._input_matrix([t[2] for t in terms])
        self._term_in = self._input_matrix([t[3] for t in terms])
        self.layers = layers
        self._fixed_macs = self.dense_macs - covered
        self._fixed_params = self.dense_params - sum(t[1] for t in terms)

    def _width_source(self, gis: list[int], width: int, key: str) -> int | tuple[tuple[tuple[int, float], ...], float]:
        """What sets a member layer's width (input, output or norm; ``key`` as in ``Group.partial``):
        one group (its index; -1 for none) where it reaches all of the width, else each group's
        share of the width (a concatenation, a zero-padded residual) and the unpruned rest."""
        if not gis:
            return -1
        shares = [(gi, self.groups[gi].partial.get(key, 1.0 if len(gis) == 1 else self.groups[gi].channels / max(1, width)))
                  for gi in gis]
        if len(shares) == 1 and shares[0][1] >= 1.0:
            return shares[0][0]
        total = sum(s for _, s in shares)
        if total > 1.0:
            shares = [(gi, s / total) for gi, s in shares]
        return tuple(shares), max(0.0, 1.0 - total)

    def _input_matrix(self, sources: list) -> np.ndarray:
        """(terms x groups+1): row t times the kept fractions ``f`` (``fractions``) is the kept
        fraction of term t's input (or output) width; one matrix product prices every layer at once."""
        rows = np.zeros((len(sources), len(self.groups) + 1))
        for t, source in enumerate(sources):
            if isinstance(source, (int, np.integer)):
                rows[t, source] = 1.0
                continue
            shares, rest = source
            for gi, share in shares:
                rows[t, gi] += share
            rows[t, -1] += rest
        return rows

    def fractions(self, keep: Sequence[int]) -> np.ndarray:
        return np.array([k / g.channels for k, g in zip(keep, self.groups)] + [1.0])

    def estimate(self, keep: Sequence[int]) -> tuple[float, float]:
        """Estimated (MACs, params) when group i keeps ``keep[i]`` units."""
        f = self.fractions(keep)
        scale = (self._term_out @ f) * (self._term_in @ f)
        return (float(self._fixed_macs + self._term_macs @ scale),
                float(self._fixed_params + self._term_params @ scale))

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

    def kept_fraction(self, keep: Sequence[int], metric: Metric = "macs") -> float:
        """Fraction of the dense MACs, params or a ``CostModel``'s cost that ``keep`` keeps."""
        if not isinstance(metric, str):
            return float(metric.fraction(keep))
        if metric not in ("macs", "params"):
            raise ValueError(f"unknown analytic metric '{metric}'")
        idx = 0 if metric == "macs" else 1
        return self.estimate(keep)[idx] / (self.dense_macs, self.dense_params)[idx]

    def off_grid(self, keep: Sequence[int]) -> list[str]:
        """Groups whose kept width is not a multiple of their rounding step, because ``project``
        fell back to single units to meet the budget. Runtimes pad such widths to their channel
        block, so these groups cost speed the MACs do not show (BENCHMARKS.md, round_to=1)."""
        return [g.name for g, k in zip(self.groups, keep) if k != g.channels and k % g.step]

    def floor(self, metric: Metric = "macs") -> float:
        """The smallest kept fraction of MACs (or params) reachable without removing whole layers."""
        return self.kept_fraction([self.min_keep(g, fine=True) for g in self.groups], metric)

    def group_savings(self, metric: Metric = "macs") -> list[float]:
        """Kept fraction of ``metric`` that each group saves when it alone goes to its smallest width."""
        full = [g.channels for g in self.groups]
        base = self.kept_fraction(full, metric)
        out = []
        for i, g in enumerate(self.groups):
            keep = list(full)
            keep[i] = self.min_keep(g)
            out.append(base - self.kept_fraction(keep, metric))
        return out

    def floor_keep(self, fine: bool = False) -> list[int]:
        """Every group at its smallest width (on its rounding grid unless ``fine``)."""
        return [self.min_keep(g, fine) for g in self.groups]

    # ----- budget projection ------------------------------------------------------------
    def project(self, ratio_fn: Callable[[float], Sequence[float]], target: float, metric: Metric = "macs",
                tol: float = BUDGET_TOL, grid_only: bool = False) -> list[int]:
        """Find kept units that meet ``target`` (kept fraction of ``metric``) within ``tol``.

        ``ratio_fn(scale)`` is the allocation: per-group pruning ratios, non-decreasing in
        ``scale`` in [0, 1]. Bisection on ``scale`` keeps the allocation's shape; a greedy pass
        then adds or removes single rounding steps, where the continuous allocation was
        rounded hardest, until the estimate is within half the tolerance. Off-grid widths (single
        units) are a fallback when the grid cannot meet the budget, unless ``grid_only``: a
        runtime that pads them gains nothing from them (a latency budget), so the nearest grid
        allocation is returned instead. Where single units cannot meet it either, units are
        traded between groups (``_polish``), away from the allocation's shape.
        """
        if not 0.0 < target <= 1.0:
            raise UserError(f"target must be in (0, 1], got {target}")
        cost = lambda keep: self.kept_fraction(keep, metric)  # noqa: E731
        if target >= 1.0:
            return [g.channels for g in self.groups]
        # rounded channel counts unless the budget is only reachable with finer ones
        fine = not grid_only and cost([self.min_keep(g) for g in self.groups]) > target * (1 + tol)
        floor = cost([self.min_keep(g, fine) for g in self.groups])
        if floor > target * (1 + tol):
            raise self._unreachable(target, floor, metric, fine)
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
        if abs(cost(keep) - target) > tol * target and not grid_only:
            # the rounding step is too coarse for this budget: refine with single units
            keep = self._greedy_fix(keep, want, cost, target, tol, fine=True, polish=True)
        return keep

    def _unreachable(self, target: float, floor: float, metric: Metric, fine: bool) -> UserError:
        """The error for a target below the floor, naming what holds the floor up: layers in no
        group, and the groups that cannot shrink at all (the largest first), with the reason."""
        name = metric if isinstance(metric, str) else metric.name
        fixed = self.kept_fraction([0] * len(self.groups), metric)
        whole = [i for i, g in enumerate(self.groups) if self.min_keep(g, fine) >= g.channels]
        share = {i: self.kept_fraction(_with([0] * len(self.groups), (i, self.groups[i].channels)), metric) - fixed
                 for i in whole}
        named = [f"'{self.groups[i].name}' ({_why_whole(self.groups[i])}, {share[i]:.3f})"
                 for i in sorted(whole, key=share.get, reverse=True)[:3]]
        kept_whole = f"; groups that cannot shrink: {', '.join(named)}{', ...' if len(whole) > 3 else ''}" if whole else ""
        return UserError(f"target {name} {target:g} is unreachable without removing whole layers: pruning every group "
                         f"to its limit keeps {floor:.3f} of the {name} ({fixed:.3f} in layers no group prunes"
                         f"{kept_whole}); ask for >= {floor:.2f}")

    def _greedy_fix(self, keep, want, cost, target, tol, fine: bool = False, polish: bool = False) -> list[int]:
        """Step single groups towards the target (aiming within tol/2, never overshooting tol),
        where the allocation was rounded hardest; then, if that ends outside tol and ``polish``
        (the last resort: it departs from the allocation's shape), ``_polish``. Returns the
        allocation nearest the target met on the way: the steps can cycle between two
        allocations on either side of it, and the last one is not the better."""
        keep = list(keep)
        now = cost(keep)
        err = abs(now - target)
        best, best_err, seen = list(keep), err, {tuple(keep)}
        for _ in range(10 * len(keep) + 100):
            if err <= tol / 2 * target:
                break
            move = self._step_towards_want(keep, want, cost, target, tol, fine, grow=now < target)
            if move is None:
                break
            keep[move[0]] = move[1]
            if tuple(keep) in seen:
                break
            seen.add(tuple(keep))
            now = cost(keep)
            err = abs(now - target)
            if err < best_err:
                best, best_err = list(keep), err
        return self._polish(best, cost, target, fine) if polish and best_err > tol * target else best

    def _step_towards_want(self, keep, want, cost, target, tol, fine: bool, grow: bool) -> tuple[int, int] | None:
        """(group, new width): one rounding step up (``grow``) or down in the group whose width is
        furthest from the continuous allocation ``want`` on that side; a step up may not overshoot
        the target by more than ``tol``."""
        best, best_gap = None, None
        for i, g in enumerate(self.groups):
            step = self.unit_step(g, fine)
            new = min(g.channels, keep[i] + step) if grow else max(self.min_keep(g, fine), keep[i] - step)
            if new == keep[i] or (grow and cost(keep[:i] + [new] + keep[i + 1:]) > target * (1 + tol)):
                continue
            gap = (want[i] - keep[i]) if grow else (keep[i] - want[i])
            if best_gap is None or gap > best_gap:
                best, best_gap = (i, new), gap
        return best

    def _polish(self, keep, cost, target, fine: bool, rounds: int = 5) -> list[int]:
        """Local search on the distance to the target alone, for budgets that steps along the
        allocation cannot meet: one group set to any of its widths, or one group a rounding step
        up or down while another takes any of its widths (a trade between two groups: a narrow
        model's widths come in few, coarse sizes). At most POLISH_CANDIDATES allocations a round."""
        keep = list(keep)
        err = abs(cost(keep) - target)
        for _ in range(rounds):
            widths = [(i, w) for i, g in enumerate(self.groups) for w in self._widths(g, fine) if w != keep[i]]
            if len(widths) > POLISH_CANDIDATES:  # wide models: single steps only
                widths = self._moves(keep, fine)
            candidates = [_with(keep, a) for a in widths]
            pairs = [(a, b) for a in self._moves(keep, fine) for b in widths if a[0] != b[0]]
            if len(candidates) + len(pairs) <= POLISH_CANDIDATES:
                candidates += [_with(keep, a, b) for a, b in pairs]
            if not candidates:
                break
            trial = min(candidates, key=lambda k: abs(cost(k) - target))
            trial_err = abs(cost(trial) - target)
            if trial_err >= err:
                break
            keep, err = trial, trial_err
        return keep

    def _widths(self, g: Group, fine: bool) -> range:
        """Every width group ``g`` may keep (its rounding steps, from its smallest to all)."""
        step = self.unit_step(g, fine)
        return range(self.min_keep(g, fine), g.channels + 1, step)

    def _moves(self, keep, fine: bool) -> list[tuple[int, int]]:
        """(group, width) for every single rounding step up or down that stays within bounds."""
        out = []
        for i, g in enumerate(self.groups):
            step = self.unit_step(g, fine)
            out += [(i, w) for w in (keep[i] + step, keep[i] - step) if self.min_keep(g, fine) <= w <= g.channels]
        return out

    # ----- execution --------------------------------------------------------------------
    def apply(self, model: nn.Module, keep: Sequence[int], importance: str = "magnitude",
              calib: tuple[torch.Tensor, torch.Tensor] | None = None,
              scores: Sequence[torch.Tensor] | None = None) -> nn.Module:
        """Prune ``model`` in place so that group i keeps ``keep[i]`` units (the most important).

        ``scores`` (per-unit, per group, from ``unit_scores`` on an unpruned copy) skip scoring:
        many pruned variants of one model, e.g. to time them, need the scores once.
        """
        if len(keep) != len(self.groups):
            raise ValueError(f"{len(keep)} keep counts for {len(self.groups)} groups")
        dg = build_graph(model, self.example)
        modules = dict(model.named_modules())
        if scores is None:
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
            group = dg.get_pruning_group(root, out_channel_pruner(root), idxs=sorted(drop))
            if not dg.check_pruning_group(group):
                raise UserError(f"pruning group '{g.name}' would remove a whole layer; lower the target")
            try:
                prune_group(group)
            except Exception as exc:  # torch-pruning's index mapping of a construct it does not follow
                raise pruning_error(f"cannot prune group '{g.name}'", exc, MISMAPPED) from None
        _check_runs(model, self.example)
        return model


def _check_runs(model: nn.Module, example: torch.Tensor) -> None:
    """One sample through the pruned model: a width torch-pruning cut wrongly (through a construct
    whose channel mapping it does not follow) shows here as a one-line error, not later."""
    try:
        run_one(model, example)
    except Exception as exc:
        msg = first_line(exc)
        raise UserError(f"pruning gave a model that cannot run ({msg}): torch-pruning does not follow how some layers "
                        "of this model share channels (e.g. a per-channel buffer or constant, a width read from a tensor's "
                        "shape in forward, a concatenation flattened into a linear layer)") from None


def _layer_term(name: str, mod: nn.Module, macs: int, output, source) -> LayerTerm:
    """A conv or linear layer's term; its output size is read off its MACs (no second pass).
    ``output`` and ``source``: a group index or (shares, rest), as ``PruningSpace._width_source``."""
    in_group, in_shares = (source, ()) if isinstance(source, int) else (-1, source[0])
    out_group, out_shares = (output, ()) if isinstance(output, int) else (-1, output[0])
    if isinstance(mod, CHANNEL_LAYERS):
        k = kernel_area(mod)
        kind = "depthwise" if is_depthwise(mod) else "pointwise" if k == 1 else "conv"
        per_output = k * mod.in_channels // mod.groups
        return LayerTerm(name, kind, macs, macs // max(1, per_output), mod.out_channels, mod.in_channels,
                         out_group, in_group, in_shares, out_shares)
    return LayerTerm(name, "linear", macs, macs // max(1, mod.in_features), mod.out_features, mod.in_features,
                     out_group, in_group, in_shares, out_shares)


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


def _with(keep: list[int], *changes: tuple[int, int]) -> list[int]:
    """``keep`` with (group, width) changes."""
    out = list(keep)
    for i, w in changes:
        out[i] = w
    return out


def _why_whole(g: Group) -> str:
    """Why group ``g`` is never pruned, in a few words."""
    if g.unsafe:
        return g.unsafe
    if g.channels == 1:
        return "1 unit"
    if g.quantum >= g.channels:
        return "its units are coupled to each other"
    return f"{g.channels} units, too few to prune"
