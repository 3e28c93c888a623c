"""Fisher merging (Matena & Raffel 2022): a per-entry average weighted by each model's diagonal Fisher."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from metacompress.meta.errors import UserError
from metacompress.meta.fusion.base import MergeContext, MergeMethod, Param, StateDict, register
from metacompress.meta.fusion.checks import check_compatible, is_bn_stat, mean
from metacompress.meta.fusion.measure import estimate_fisher

EPS = Param("eps", float, 1e-8, "Fisher floor: entries no model cares about stay at the average", gt=0.0)
WEIGHT = Param("model weight", float, 1.0, "per-model scale of its Fisher")


def _check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise UserError(f"{len(weights)} model weights for {n} models")
    checked = [WEIGHT.check(w) for w in weights]
    if min(checked) < 0 or sum(checked) <= 0:
        raise UserError(f"model weights must be non-negative and not all zero, got {checked}")
    return checked


def _check_fishers(state_dicts: Sequence[StateDict], fishers: Sequence[Mapping[str, Tensor]]) -> set[str]:
    """The entries the Fisher estimates cover, checked to be float weights of the models, alike for all."""
    if len(fishers) != len(state_dicts):
        raise UserError(f"{len(fishers)} Fisher estimates for {len(state_dicts)} models")
    first = state_dicts[0]
    keys = set(fishers[0])
    for i, f in enumerate(fishers):
        if set(f) != keys:
            raise UserError(f"Fisher estimates cover different entries (model {i} vs model 0)")
        for k, v in f.items():
            if k not in first or not first[k].is_floating_point() or is_bn_stat(k):
                raise UserError(f"Fisher of model {i} has entry '{k}', "
                                "which is not a float weight of the models")
            if v.shape != first[k].shape:
                raise UserError(f"Fisher of model {i} for '{k}' has shape {tuple(v.shape)}, "
                                f"the weight {tuple(first[k].shape)}")
            if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
                raise UserError(f"Fisher of model {i} for '{k}' has negative or non-finite values")
    return keys


def fisher_merge(state_dicts: Sequence[StateDict], fishers: Sequence[Mapping[str, Tensor]],
                 eps: float = 1e-8, weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Fisher-weighted average: ``sum_i w_i (F_i + eps) theta_i / sum_i w_i (F_i + eps)`` per entry.

    An entry a model is confident about (high Fisher: the loss is sharp there) keeps that
    model's value; ``eps`` keeps entries no model cares about at the (``w``-weighted) average.
    ``weights`` are Matena & Raffel's per-model scalars (default all 1): Fisher magnitudes of
    different models are not on one scale (a model that fits its data well has small gradients
    everywhere), so tuning them on held-out data can matter. Entries without a Fisher (buffers:
    Fisher is defined for parameters only) and BN statistics are plain averages; non-float
    entries come from the first model.
    """
    check_compatible(state_dicts)
    eps = EPS.check(eps)
    weights = _check_weights(weights, len(state_dicts))
    keys = _check_fishers(state_dicts, fishers)
    out: dict[str, Tensor] = {}
    for k, v in state_dicts[0].items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif k not in keys:
            out[k] = mean([sd[k] for sd in state_dicts])
        else:
            w = torch.stack([wi * (f[k].double() + eps) for wi, f in zip(weights, fishers, strict=True)])
            w = w / w.sum(0)
            out[k] = (w * torch.stack([sd[k].double() for sd in state_dicts])).sum(0).to(v.dtype)
    return out


@register
class FisherMerge(MergeMethod):
    name = "fisher"
    summary = "Per-entry average weighted by each model's diagonal Fisher, estimated on the training split."
    params = (Param("fisher_samples", int, 512, "training samples the Fisher is estimated on", ge=1), EPS)
    needs_data = "Fisher estimates"

    def merge(self, ctx: MergeContext) -> dict[str, Tensor]:
        d = ctx.data
        fishers = [estimate_fisher(ctx.model, sd, d.x_train, d.y_train, max_samples=ctx.params["fisher_samples"])
                   for sd in ctx.state_dicts]
        return fisher_merge(ctx.state_dicts, fishers, eps=ctx.params["eps"])
