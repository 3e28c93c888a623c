"""Which channels go: per-unit importance scores for each prunable group.

- ``magnitude``: L2 norm of all weights tied to the unit across the group (torch-pruning's
  group magnitude, mean-normalised so that scores compare across groups);
- ``taylor``: |weight x gradient| on a calibration batch (first-order loss change);
- ``lamp``: layer-adaptive magnitude (Lee et al. 2021), comparable across groups by design.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from metacompress.compress.groups import MISMAPPED, Group, out_channel_pruner, pruning_error
from metacompress.errors import UserError

METHODS = ("magnitude", "taylor", "lamp")


def _importance(method: str) -> tp.importance.Importance:
    if method == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if method == "taylor":
        return tp.importance.GroupTaylorImportance()
    if method == "lamp":
        return tp.importance.LAMPImportance(p=2)
    raise UserError(f"unknown importance '{method}': use one of {', '.join(METHODS)}")


def _attention_scores(qkv: nn.Linear, proj: nn.Linear, heads: int, method: str) -> torch.Tensor:
    """Per head-dim score: summed over q, k, v and every head (the dims pruned together)."""
    head_dim = qkv.out_features // 3 // heads
    w = qkv.weight
    if method == "taylor" and w.grad is not None:
        w = w * w.grad
    rows = w.detach().pow(2).sum(1).view(3, heads, head_dim).sum((0, 1))
    pw = proj.weight if not (method == "taylor" and proj.weight.grad is not None) else proj.weight * proj.weight.grad
    cols = pw.detach().pow(2).sum(0).view(heads, head_dim).sum(0)
    s = (rows + cols).sqrt()
    if method == "lamp":
        order = torch.argsort(s)
        sq = s[order].pow(2)
        lamp = sq / sq.flip(0).cumsum(0).flip(0)
        out = torch.empty_like(s)
        out[order] = lamp
        return out
    return s / s.mean().clamp_min(1e-12)


def unit_scores(model: nn.Module, groups: list[Group], method: str, calib=None, dg=None, example=None
                ) -> list[torch.Tensor]:
    """One score per prunable unit of each group (higher = more important)."""
    return unit_scores_by_method(model, groups, (method,), calib, dg, example)[method]


def unit_scores_by_method(model: nn.Module, groups: list[Group], methods: tuple[str, ...], calib=None, dg=None,
                          example=None) -> dict[str, list[torch.Tensor]]:
    """``unit_scores`` for several methods at once: the dependency graph is traced and each group's
    coupled layers are collected once (on a DenseNet's 120 groups that is most of the cost)."""
    from metacompress.compress.groups import attention_blocks, build_graph

    imps = {m: _importance(m) for m in methods}
    if "taylor" in methods:
        if calib is None:
            raise UserError("taylor importance needs calibration data")
        model.zero_grad(set_to_none=True)
        model.eval()
        F.cross_entropy(model(calib[0]), calib[1]).backward()
    dg = dg or build_graph(model, example)
    modules = dict(model.named_modules())
    attn = {id(q): (p, h) for q, p, h in attention_blocks(model)}
    out: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    for g in groups:
        root = modules[g.name]
        if g.whole:  # its units are never ranked against each other
            for m in methods:
                out[m].append(torch.ones(g.channels))
            continue
        if g.kind == "attention":
            proj, heads = attn[id(root)]
            for m in methods:
                out[m].append(_attention_scores(root, proj, heads, m).float())
            continue
        group = dg.get_pruning_group(root, out_channel_pruner(root), idxs=list(range(g.channels)))
        for m, imp in imps.items():
            with torch.no_grad():
                s = _scored(imp, group, g.name)
            if s is None or len(s) != g.channels:
                s = torch.ones(g.channels)
            out[m].append(torch.nan_to_num(s.detach().float().cpu(), nan=0.0))
    if "taylor" in methods:
        model.zero_grad(set_to_none=True)
    return out


def _scored(imp: tp.importance.Importance, group, name: str) -> torch.Tensor | None:
    try:
        return imp(group)
    except Exception as exc:  # torch-pruning's index mapping of a construct it does not follow
        raise pruning_error(f"cannot rank the units of group '{name}'", exc, MISMAPPED) from None
