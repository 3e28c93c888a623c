"""Task-vector merges: a base plus the merged differences (task vectors) of models fine-tuned from it.

- ``task_arithmetic``: ``base + lam * sum_i (theta_i - base)`` (Ilharco et al. 2023).
- ``ties_merge``: trim each task vector to its largest-magnitude ``density`` fraction, elect a
  sign per entry by total mass, average only the entries that agree with it (Yadav et al. 2023).
- ``dare``: drop each task-vector entry with probability ``p`` and rescale the rest by
  ``1 / (1 - p)`` (Yu et al. 2024), then average or TIES-merge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from metacompress.meta.errors import UserError
from metacompress.meta.fusion.base import MergeContext, MergeMethod, Param, StateDict, register
from metacompress.meta.fusion.checks import check_compatible, is_bn_stat, mean

DARE_MERGES = ("average", "ties")
LAMBDA = Param("lambda", float, 1.0, "scale of the merged task vector")
DENSITY = Param("density", float, None, "fraction of each task vector kept", gt=0.0, lt=1.0)
P = Param("p", float, None, "drop probability of each task-vector entry", gt=0.0, lt=1.0)
DARE_MERGE = Param("dare_merge", str, "average", "how the dropped task vectors are merged", choices=DARE_MERGES)


def _task_vector_setup(base: StateDict, finetuned: Sequence[StateDict]) -> None:
    if len(finetuned) == 0:
        raise UserError("no fine-tuned models to merge into the base")
    check_compatible([base, *finetuned], ["base"] + [f"model {i}" for i in range(len(finetuned))])


def _merge_task_vectors(
    base: StateDict,
    finetuned: Sequence[StateDict],
    combine: Callable[[str, Tensor, Tensor], Tensor],
    lam: float,
) -> dict[str, Tensor]:
    """``base + lam * combine(task vectors)`` per float entry, in float64, cast back.

    ``combine(key, deltas, base)`` gets the stacked task vectors (models x entry shape) of one
    entry and returns their merged task vector. BN statistics are averaged, non-float entries
    come from the base (``checks``' entry rules).
    """
    out: dict[str, Tensor] = {}
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = b.clone()
        elif is_bn_stat(k):
            out[k] = mean([sd[k] for sd in finetuned])
        else:
            b64 = b.double()
            deltas = torch.stack([sd[k].double() - b64 for sd in finetuned])
            out[k] = (b64 + lam * combine(k, deltas, b64)).to(b.dtype)
    return out


def task_arithmetic(base: StateDict, finetuned: Sequence[StateDict], lam: float) -> dict[str, Tensor]:
    """``base + lam * sum_i (finetuned_i - base)``: adds every model's task vector, scaled."""
    lam = LAMBDA.check(lam)
    _task_vector_setup(base, finetuned)
    return _merge_task_vectors(base, finetuned, lambda _k, d, _b: d.sum(0), lam)


def trim(delta: Tensor, density: float) -> Tensor:
    """Keep the ``round(density * n)`` (at least one) largest-magnitude entries, zero the rest.

    The sort is stable, so among equal magnitudes the earlier entries (flattened order) win:
    the result is deterministic and keeps exactly that many entries.
    """
    density = DENSITY.check(density)
    flat = delta.flatten()
    keep = max(1, round(density * flat.numel()))
    idx = torch.sort(flat.abs(), descending=True, stable=True).indices[:keep]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[idx] = True
    return torch.where(mask, flat, torch.zeros_like(flat)).view_as(delta)


def elect_and_merge(deltas: Tensor) -> Tensor:
    """TIES' sign election and disjoint mean over stacked task vectors (models x entry shape).

    The elected sign of an entry is the sign of the sum of its values over models (the sign
    with the larger total mass); the merged value is the mean of the non-zero values having
    that sign, and 0 where none does. Disagreeing values are dropped, not averaged in, which is
    what keeps one task from cancelling another.
    """
    elected = torch.sign(deltas.sum(0))
    agree = (torch.sign(deltas) == elected) & (deltas != 0)
    count = agree.sum(0)
    total = torch.where(agree, deltas, torch.zeros_like(deltas)).sum(0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def ties_merge(base: StateDict, finetuned: Sequence[StateDict], density: float,
               lam: float = 1.0) -> dict[str, Tensor]:
    """TIES-merging: trim each task vector to ``density``, elect signs, disjoint mean, scale by ``lam``."""
    density = DENSITY.check(density)
    lam = LAMBDA.check(lam)
    _task_vector_setup(base, finetuned)

    def combine(_k: str, deltas: Tensor, _b: Tensor) -> Tensor:
        return elect_and_merge(torch.stack([trim(d, density) for d in deltas]))

    return _merge_task_vectors(base, finetuned, combine, lam)


def dare(
    base: StateDict,
    finetuned: Sequence[StateDict],
    p: float,
    seed: int = 0,
    merge: str = "average",
    density: float | None = None,
    lam: float = 1.0,
) -> dict[str, Tensor]:
    """DARE: drop task-vector entries with probability ``p``, rescale survivors by ``1/(1-p)``, merge.

    Rescaling keeps each task vector's expected value, which is why even a large ``p`` costs a
    fine-tuned model little while the sparser task vectors interfere less. ``merge="average"``
    gives ``base + lam * mean_i(dropped task vector_i)``; ``merge="ties"`` elects signs and takes
    the disjoint mean of the dropped task vectors (mergekit's ``dare_ties``), after trimming them
    to ``density`` when that is given. Masks come from a generator seeded with ``seed``, drawn
    model by model in the base's key order: the same seed gives the same merge.
    """
    p = P.check(p)
    lam = LAMBDA.check(lam)
    if merge not in DARE_MERGES:
        raise UserError(f"DARE merge must be one of {', '.join(DARE_MERGES)}, got '{merge}'")
    if density is not None:
        if merge != "ties":
            raise UserError("density applies to DARE only with merge 'ties'")
        density = DENSITY.check(density)
    _task_vector_setup(base, finetuned)
    gen = torch.Generator().manual_seed(int(seed))
    masks: list[dict[str, Tensor]] = [
        {k: torch.rand(b.shape, generator=gen, dtype=torch.float64) >= p
         for k, b in base.items() if b.is_floating_point() and not is_bn_stat(k)}
        for _ in finetuned
    ]

    def combine(k: str, deltas: Tensor, _b: Tensor) -> Tensor:
        kept = torch.stack([torch.where(m[k], d / (1.0 - p), torch.zeros_like(d))
                            for m, d in zip(masks, deltas, strict=True)])
        if merge == "average":
            return kept.mean(0)
        if density is not None:
            kept = torch.stack([trim(d, density) for d in kept])
        return elect_and_merge(kept)

    return _merge_task_vectors(base, finetuned, combine, lam)


@register
class TaskArithmetic(MergeMethod):
    name = "task-arithmetic"
    summary = "base + lambda * the sum of the task vectors."
    params = (LAMBDA,)
    needs_base = True

    def merge(self, ctx: MergeContext) -> dict[str, Tensor]:
        return task_arithmetic(ctx.base, ctx.state_dicts, ctx.params["lambda"])


@register
class Ties(MergeMethod):
    name = "ties"
    summary = "TIES: trim task vectors to density, elect signs, disjoint mean, scale by lambda."
    params = (replace(DENSITY, required=True), LAMBDA)
    needs_base = True

    def merge(self, ctx: MergeContext) -> dict[str, Tensor]:
        return ties_merge(ctx.base, ctx.state_dicts, ctx.params["density"], ctx.params["lambda"])


@register
class Dare(MergeMethod):
    name = "dare"
    summary = "DARE: drop task-vector entries with probability p, rescale, then average or TIES-merge."
    params = (replace(P, required=True), DARE_MERGE, LAMBDA,
              replace(DENSITY, only_with=("dare_merge", "ties")))
    needs_base = True

    def merge(self, ctx: MergeContext) -> dict[str, Tensor]:
        q = ctx.params
        return dare(ctx.base, ctx.state_dicts, q["p"], seed=ctx.seed, merge=q["dare_merge"], density=q["density"],
                    lam=q["lambda"])
