"""Pruning as channel masks: the sub-network ``PruningSpace.apply`` would cut out, without cutting.

Training many sub-networks of one dense model (``compress.robust``) cannot remove channels
physically at every step: each task prunes differently and the dense weights must stay whole.
A mask zeroes, for every unit a group drops, every parameter entry that physical pruning would
remove: the producing layers' output rows and biases, the BatchNorm scale and shift after them,
and the consuming layers' input columns (through torch-pruning's index mapping, so a flatten or
a residual addition maps each unit to the right entries). The masked model then computes exactly
what the physically pruned model computes (tests/compress/test_robust.py): dropped channels carry zeros
(zero rows, zero BN scale and shift) and are ignored by their consumers (zero columns) even where
an activation does not map zero to zero. Attention groups mask the same head dims of q, k and v in
every head and the matching proj inputs, as ``_prune_head_dims`` removes them; the attention scale
is fixed at construction (zoo ``Attention``), so it does not change either way.

Gradients flow through ``param * mask`` to the dense parameters: masked entries get none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch_pruning as tp
from torch import nn

from metacompress.compress.groups import PRUNABLE_LAYERS, Group, attention_blocks, build_graph, is_conv, out_channel_pruner
from metacompress.compress.prune import PruningSpace, drop_indices
from metacompress.errors import UserError

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MaskSite:
    """Entries of one parameter that belong to a group's units: ``param[..., idx[j], ...]`` along
    ``dim`` goes when unit ``root[j]`` goes."""

    param: str
    dim: int
    idx: torch.Tensor
    root: torch.Tensor


class ChannelMasks:
    """Where each group of ``space`` lives in ``model``'s parameters, and masks built from that."""

    def __init__(self, model: nn.Module, space: PruningSpace):
        self.space = space
        self.shapes = {n: p.shape for n, p in model.named_parameters()}
        dg = build_graph(model, space.example)
        modules = dict(model.named_modules())
        attn = {id(qkv): (proj, heads) for qkv, proj, heads in attention_blocks(model)}
        names = {id(m): n for n, m in modules.items()}
        self.sites: list[list[MaskSite]] = []
        for g in space.groups:
            root = modules[g.name]
            if g.unsafe:  # kept whole: never masked
                self.sites.append([])
            elif g.kind == "attention":
                proj, heads = attn[id(root)]
                self.sites.append(_attention_sites(g, names[id(proj)], heads))
            else:
                self.sites.append(_group_sites(g, root, dg, names))

    def unit_masks(self, keep: Sequence[int], scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per group, 1 for each kept unit and 0 for each dropped one: the units ``apply`` would
        drop for the same ``keep`` and ``scores`` (the least important, ``drop_indices``)."""
        out = []
        for g, k, s in zip(self.space.groups, keep, scores):
            m = torch.ones(g.channels)
            n_remove = g.channels - int(k)
            if n_remove > 0:
                m[drop_indices(s, n_remove, g.conv_groups)] = 0.0
            out.append(m)
        return out

    def param_masks(self, units: Sequence[torch.Tensor]) -> Params:
        """Multiplicative masks (broadcastable to each parameter) for the given unit masks."""
        masks: Params = {}
        for sites, unit in zip(self.sites, units):
            if bool(unit.all()):
                continue
            for s in sites:
                shape = self.shapes[s.param]
                vec = torch.ones(shape[s.dim])
                vec[s.idx] = vec[s.idx] * unit[s.root]
                view = [1] * len(shape)
                view[s.dim] = shape[s.dim]
                vec = vec.view(view)
                masks[s.param] = masks[s.param] * vec if s.param in masks else vec
        return masks


def masked(params: Params, masks: Params) -> Params:
    """The parameters with the masks applied (differentiable in ``params``)."""
    return {n: p * masks[n] if n in masks else p for n, p in params.items()}


def _attention_sites(g: Group, proj: str, heads: int) -> list[MaskSite]:
    """Head dim j of q, k and v in every head (qkv rows) and of every head's proj input."""
    hd = g.channels
    j = torch.arange(hd)
    rows = torch.cat([p * heads * hd + h * hd + j for p in range(3) for h in range(heads)])
    cols = torch.cat([h * hd + j for h in range(heads)])
    rows_root, cols_root = j.repeat(3 * heads), j.repeat(heads)
    return [MaskSite(f"{g.name}.weight", 0, rows, rows_root), MaskSite(f"{g.name}.bias", 0, rows, rows_root),
            MaskSite(f"{proj}.weight", 1, cols, cols_root)]


def _group_sites(g: Group, root: nn.Module, dg: tp.DependencyGraph, names: dict[int, str]) -> list[MaskSite]:
    """Mask sites of a conv/linear-rooted group, read off torch-pruning's group over all units."""
    group = dg.get_pruning_group(root, out_channel_pruner(root), idxs=list(range(g.channels)))
    sites = []
    for item in group:
        mod = item.dep.target.module
        if isinstance(mod, nn.Parameter):
            raise UserError(f"cannot mask group '{g.name}': it prunes an unwrapped parameter")
        if id(mod) not in names or not any(True for _ in mod.parameters(recurse=False)):
            continue  # torch-pruning's stand-ins for flatten, add, concat; activations, pooling
        idx = torch.as_tensor(list(item.idxs), dtype=torch.long)
        root_idx = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
        sites += _module_sites(g, names[id(mod)], mod, dg.is_out_channel_pruning_fn(item.dep.handler), idx, root_idx)
    return sites


def _module_sites(g: Group, name: str, mod: nn.Module, out: bool, idx: torch.Tensor, root: torch.Tensor
                  ) -> list[MaskSite]:
    """The entries of one member layer that physical pruning removes along its pruned axis."""
    def rows_and_bias() -> list[MaskSite]:
        return [MaskSite(f"{name}.{p}", 0, idx, root) for p in ("weight", "bias") if getattr(mod, p, None) is not None]

    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        if not mod.affine:
            raise UserError(f"cannot mask group '{g.name}': BatchNorm '{name}' has no affine scale to zero")
        return rows_and_bias()
    if isinstance(mod, PRUNABLE_LAYERS):
        if out:
            return rows_and_bias()
        if is_conv(mod) and mod.groups > 1:
            return []  # depthwise/grouped: its own outputs are in the group and masked as rows
        return [MaskSite(f"{name}.weight", 1, idx, root)]
    raise UserError(f"cannot mask group '{g.name}': masking does not reproduce pruning through "
                    f"{type(mod).__name__} '{name}' (it normalises across channels or is unknown)")
