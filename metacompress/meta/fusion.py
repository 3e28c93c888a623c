"""Model fusion: merge the weights of several models of one architecture into one model.

Methods, all on state dicts (name -> tensor):

- ``uniform_soup``: the element-wise mean (Wortsman et al. 2022, "model soups").
- ``greedy_soup``: visit models from best to worst held-out score and keep one in the soup only
  if the soup's held-out score does not drop.
- ``task_arithmetic``: ``base + lam * sum_i (theta_i - base)`` (Ilharco et al. 2023).
- ``ties_merge``: trim each task vector to its largest-magnitude ``density`` fraction, elect a
  sign per entry by total mass, average only the entries that agree with it (Yadav et al. 2023).
- ``dare``: drop each task-vector entry with probability ``p`` and rescale the rest by
  ``1 / (1 - p)`` (Yu et al. 2024), then average or TIES-merge.
- ``fisher_merge``: per-entry average weighted by each model's diagonal Fisher information
  (Matena & Raffel 2022); ``estimate_fisher`` estimates it from data.

Entry rules shared by every method (a state dict also holds buffers, not only weights):

- non-float entries (``num_batches_tracked``, integer buffers) are copied from the first model
  given (the base, for the task-vector methods): they are counters and indices, not weights;
- BatchNorm running statistics (keys ending in ``running_mean`` / ``running_var``) are plain
  averages of the merged models' statistics: they describe activations, not learnt directions,
  so scaling, trimming or sign-electing them as task vectors can make a variance negative.
  Averages are only an approximation of the merged network's statistics: when data is at hand,
  ``recompute_bn`` re-estimates them (``fuse`` does so whenever it gets data).

This module is part of the reusable meta-learning core: it depends on torch only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from metacompress.meta.errors import UserError
from metacompress.meta.modules import batchnorm_layers, has_batchnorm

StateDict = Mapping[str, Tensor]

METHODS = ("uniform", "greedy", "task-arithmetic", "ties", "dare", "fisher")
DARE_MERGES = ("average", "ties")
_BN_STATS = ("running_mean", "running_var")
_LISTED = 8  # names shown per kind of mismatch; the rest are counted


# --------------------------------------------------------------------------- checks


def _names(n: int, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [f"model {i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} names for {n} state dicts")
    return list(names)


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f" (+{len(items) - _LISTED} more)" if len(items) > _LISTED else "")


def check_compatible(state_dicts: Sequence[StateDict], names: Sequence[str] | None = None) -> None:
    """Raise a one-line ``UserError`` unless all state dicts have the same keys, shapes and dtypes.

    Every model is compared with the first; the message names each offending model and its
    missing / unexpected keys and the keys whose shape or dtype differs, so that the user sees
    at once which layer does not fit (e.g. weights of a different width or a different net).
    ``names`` labels the models in the message (file names, say); default ``model i``.
    """
    if len(state_dicts) == 0:
        raise UserError("no models to merge")
    labels = _names(len(state_dicts), names)
    for label, sd in zip(labels, state_dicts, strict=True):
        if not isinstance(sd, Mapping):
            raise UserError(f"{label} is a {type(sd).__name__}, not a state dict (name -> tensor)")
        bad = [str(k) for k, v in sd.items() if not isinstance(v, Tensor)]
        if bad:
            raise UserError(f"{label} holds non-tensor entries: {_listing(bad)}")
    ref = state_dicts[0]
    problems: list[str] = []
    for label, sd in zip(labels[1:], state_dicts[1:], strict=True):
        parts: list[str] = []
        missing = [k for k in ref if k not in sd]
        extra = [k for k in sd if k not in ref]
        shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(ref[k].shape)}"
                  for k in ref if k in sd and sd[k].shape != ref[k].shape]
        dtypes = [f"{k} {sd[k].dtype} vs {ref[k].dtype}".replace("torch.", "")
                  for k in ref if k in sd and sd[k].shape == ref[k].shape and sd[k].dtype != ref[k].dtype]
        if missing:
            parts.append(f"missing keys {_listing(missing)}")
        if extra:
            parts.append(f"unexpected keys {_listing(extra)}")
        if shapes:
            parts.append(f"shape differs for {_listing(shapes)}")
        if dtypes:
            parts.append(f"dtype differs for {_listing(dtypes)}")
        if parts:
            problems.append(f"{label} vs {labels[0]}: " + "; ".join(parts))
    if problems:
        raise UserError("incompatible models: " + " | ".join(problems))


def _check_fraction(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < float(value) < 1.0:
        raise UserError(f"{name} must be in (0, 1), got {value}")
    return float(value)


def _check_finite(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}")
    return float(value)


def _is_bn_stat(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in _BN_STATS


def _mean(tensors: Sequence[Tensor]) -> Tensor:
    """Mean in float64, cast back: the result does not depend on summation order in float32."""
    return torch.stack([t.double() for t in tensors]).mean(0).to(tensors[0].dtype)


# --------------------------------------------------------------------------- soups


def uniform_soup(state_dicts: Sequence[StateDict]) -> dict[str, Tensor]:
    """The element-wise mean of the float entries; non-float entries from the first model."""
    check_compatible(state_dicts)
    first = state_dicts[0]
    return {k: _mean([sd[k] for sd in state_dicts]) if v.is_floating_point() else v.clone()
            for k, v in first.items()}


Score = float | tuple[float, ...]


def greedy_soup(
    state_dicts: Sequence[StateDict],
    evaluate: Callable[[dict[str, Tensor]], Score],
    *,
    prepare: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
) -> tuple[dict[str, Tensor], list[int]]:
    """Greedy soup (Wortsman et al. 2022): returns the soup and the indices of its ingredients.

    Models are ranked by their own held-out score (``evaluate``, higher is better; ties keep the
    given order); starting from the best, each next model joins only if the uniform soup with it
    scores at least as well as the soup without it. So the soup never scores below the best
    single model on the held-out data, and models that would hurt (e.g. from another basin) stay
    out. A score may be a tuple, compared in order: ``fuse`` uses (accuracy, -loss), so that on a
    small held-out set, where accuracies tie often, a tie admits a model only if the loss does
    not get worse. ``prepare`` transforms every candidate before it is scored, and the returned
    soup too; typically it recomputes BatchNorm statistics, which averaging leaves stale.
    """
    check_compatible(state_dicts)

    def prepared(sd: dict[str, Tensor]) -> dict[str, Tensor]:
        return prepare(sd) if prepare is not None else sd

    def scored(sd: dict[str, Tensor]) -> Score:
        v = evaluate(sd)
        return tuple(float(x) for x in v) if isinstance(v, tuple) else float(v)

    candidates = [prepared(dict(sd)) for sd in state_dicts]
    scores = [scored(c) for c in candidates]
    order = sorted(range(len(state_dicts)), key=lambda i: scores[i], reverse=True)  # stable: ties keep order
    ingredients = [order[0]]
    soup, best = candidates[order[0]], scores[order[0]]
    for i in order[1:]:
        trial = prepared(uniform_soup([state_dicts[j] for j in [*ingredients, i]]))
        score = scored(trial)
        if score >= best:
            ingredients.append(i)
            soup, best = trial, score
    return soup, ingredients


# --------------------------------------------------------------------------- task vectors


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
    come from the base (see the module docstring).
    """
    out: dict[str, Tensor] = {}
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = b.clone()
        elif _is_bn_stat(k):
            out[k] = _mean([sd[k] for sd in finetuned])
        else:
            b64 = b.double()
            deltas = torch.stack([sd[k].double() - b64 for sd in finetuned])
            out[k] = (b64 + lam * combine(k, deltas, b64)).to(b.dtype)
    return out


def task_arithmetic(base: StateDict, finetuned: Sequence[StateDict], lam: float) -> dict[str, Tensor]:
    """``base + lam * sum_i (finetuned_i - base)``: adds every model's task vector, scaled."""
    lam = _check_finite("lambda", lam)
    _task_vector_setup(base, finetuned)
    return _merge_task_vectors(base, finetuned, lambda _k, d, _b: d.sum(0), lam)


def trim(delta: Tensor, density: float) -> Tensor:
    """Keep the ``round(density * n)`` (at least one) largest-magnitude entries, zero the rest.

    The sort is stable, so among equal magnitudes the earlier entries (flattened order) win:
    the result is deterministic and keeps exactly that many entries.
    """
    density = _check_fraction("density", density)
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
    density = _check_fraction("density", density)
    lam = _check_finite("lambda", lam)
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
    p = _check_fraction("p", p)
    lam = _check_finite("lambda", lam)
    if merge not in DARE_MERGES:
        raise UserError(f"DARE merge must be one of {', '.join(DARE_MERGES)}, got '{merge}'")
    if density is not None:
        if merge != "ties":
            raise UserError("density applies to DARE only with merge 'ties'")
        density = _check_fraction("density", density)
    _task_vector_setup(base, finetuned)
    gen = torch.Generator().manual_seed(int(seed))
    masks: list[dict[str, Tensor]] = [
        {k: torch.rand(b.shape, generator=gen, dtype=torch.float64) >= p
         for k, b in base.items() if b.is_floating_point() and not _is_bn_stat(k)}
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


# --------------------------------------------------------------------------- Fisher


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
    if len(fishers) != len(state_dicts):
        raise UserError(f"{len(fishers)} Fisher estimates for {len(state_dicts)} models")
    eps = _check_finite("eps", eps)
    if eps <= 0:
        raise UserError(f"eps must be positive, got {eps}")
    if weights is None:
        weights = [1.0] * len(state_dicts)
    if len(weights) != len(state_dicts):
        raise UserError(f"{len(weights)} model weights for {len(state_dicts)} models")
    weights = [_check_finite("model weight", w) for w in weights]
    if min(weights) < 0 or sum(weights) <= 0:
        raise UserError(f"model weights must be non-negative and not all zero, got {weights}")
    first = state_dicts[0]
    keys = set(fishers[0])
    for i, f in enumerate(fishers):
        if set(f) != keys:
            raise UserError(f"Fisher estimates cover different entries (model {i} vs model 0)")
        for k, v in f.items():
            if k not in first or not first[k].is_floating_point() or _is_bn_stat(k):
                raise UserError(f"Fisher of model {i} has entry '{k}', "
                                "which is not a float weight of the models")
            if v.shape != first[k].shape:
                raise UserError(f"Fisher of model {i} for '{k}' has shape {tuple(v.shape)}, "
                                f"the weight {tuple(first[k].shape)}")
            if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
                raise UserError(f"Fisher of model {i} for '{k}' has negative or non-finite values")
    out: dict[str, Tensor] = {}
    for k, v in first.items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif k not in keys:
            out[k] = _mean([sd[k] for sd in state_dicts])
        else:
            w = torch.stack([wi * (f[k].double() + eps) for wi, f in zip(weights, fishers, strict=True)])
            w = w / w.sum(0)
            out[k] = (w * torch.stack([sd[k].double() for sd in state_dicts])).sum(0).to(v.dtype)
    return out


def _check_fits(model: nn.Module, state_dict: StateDict, label: str = "the weights") -> None:
    check_compatible([model.state_dict(), state_dict], ["the model", label])


def _check_data(x: Tensor, y: Tensor | None = None) -> None:
    if len(x) == 0:
        raise UserError("no data samples given")
    if y is not None and len(y) != len(x):
        raise UserError(f"{len(x)} samples but {len(y)} labels")


def estimate_fisher(
    model: nn.Module,
    state_dict: StateDict,
    x: Tensor,
    y: Tensor,
    batch_size: int = 64,
    max_samples: int = 512,
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher of the model with these weights: mean over samples of grad^2.

    The gradient is of the cross-entropy with the true label, per sample (``torch.func.vmap``
    over ``grad``), on the first ``max_samples`` samples, in eval mode (BN uses its running
    statistics and dropout is off: the Fisher of the deployed function). The model itself is
    left untouched. Returns one tensor per parameter, in float32.
    """
    _check_fits(model, state_dict)
    _check_data(x, y)
    if batch_size < 1 or max_samples < 1:
        raise UserError("batch size and sample count must be positive")
    param_names = [n for n, _ in model.named_parameters()]
    params = {n: state_dict[n].detach() for n in param_names}
    buffers = {n: state_dict[n] for n, _ in model.named_buffers() if n in state_dict}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    x, y = x[:max_samples], y[:max_samples]
    fisher = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in param_names}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
            grads = per_sample(params, x[start:start + batch_size], y[start:start + batch_size])
            for n in param_names:
                fisher[n] += grads[n].double().pow(2).sum(0)
    finally:
        model.train(was_training)
    return {n: (f / len(x)).float() for n, f in fisher.items()}


# --------------------------------------------------------------------------- data helpers


def recompute_bn(model: nn.Module, state_dict: StateDict, x: Tensor,
                 batch_size: int = 64) -> dict[str, Tensor]:
    """Re-estimate every BatchNorm's running statistics of these weights on data ``x``.

    A merged network's activation statistics are not the average of its parents' (the mean of
    a function of averaged weights is not the average of means), so averaged statistics can
    wreck a soup of BN networks. Statistics are a cumulative average over the batches (momentum
    None, as ``torch.optim.swa_utils.update_bn``), with the rest of the network in eval mode.
    Only BN entries change; all others are the given tensors. The model itself is untouched.
    """
    _check_fits(model, state_dict)
    _check_data(x)
    if batch_size < 2:
        raise UserError(f"BN recomputation needs batches of at least 2 samples, got {batch_size}")
    net = copy.deepcopy(model)
    net.load_state_dict(state_dict)
    prefixes = [name for name, m in net.named_modules() if isinstance(m, _BatchNorm)]
    if not prefixes:
        return dict(state_dict)
    net.eval()
    for m in batchnorm_layers(net):
        m.reset_running_stats()
        m.momentum = None
        m.train()
    batches = list(torch.split(x, batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:  # BN cannot take a batch of one sample in train mode
        batches.pop()
    with torch.no_grad():
        for xb in batches:
            net(xb)
    fresh = net.state_dict()
    bn_keys = {f"{p}.{b}" if p else b for p in prefixes for b in (*_BN_STATS, "num_batches_tracked")}
    return {k: fresh[k].detach().clone() if k in bn_keys else v for k, v in state_dict.items()}


def _logits(model: nn.Module, state_dict: StateDict, x: Tensor, batch_size: int = 256) -> Tensor:
    """Outputs of the model with these weights on ``x``, in eval mode; the model is untouched."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([functional_call(model, dict(state_dict), (x[start:start + batch_size],))
                              for start in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def state_dict_accuracy(model: nn.Module, state_dict: StateDict, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of the model with these weights, in eval mode; the model is untouched."""
    _check_data(x, y)
    return int((_logits(model, state_dict, x, batch_size).argmax(1) == y).sum()) / len(x)


def mean_loss(model: nn.Module, state_dict: StateDict, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Mean cross-entropy of the model with these weights, in eval mode; the model is untouched."""
    _check_data(x, y)
    return float(F.cross_entropy(_logits(model, state_dict, x, batch_size), y))


# --------------------------------------------------------------------------- one entry point


@dataclass(frozen=True)
class FusionData:
    """Data for the data-driven parts: train split for BN statistics and Fisher, val for scores."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor


def fuse(
    method: str,
    state_dicts: Sequence[StateDict],
    *,
    names: Sequence[str] | None = None,
    base: StateDict | None = None,
    model: nn.Module | None = None,
    data: FusionData | None = None,
    lam: float | None = None,
    density: float | None = None,
    p: float | None = None,
    dare_merge: str | None = None,
    seed: int = 0,
    fisher_samples: int = 512,
) -> tuple[dict[str, Tensor], dict]:
    """Merge ``state_dicts`` with ``method`` (one of ``METHODS``); returns (fused weights, report).

    Checks first that the method gets what it needs and nothing it would silently ignore:
    a base for task-arithmetic / ties / dare (and only for them), data and a model for greedy
    and fisher, ``density`` for ties, ``p`` for dare. With data and a model, BatchNorm
    statistics of the result are recomputed on the training split and the report holds the
    validation accuracy of every input model and of the result.
    """
    if method not in METHODS:
        raise UserError(f"unknown fusion method '{method}': use one of {', '.join(METHODS)}")
    labels = _names(len(state_dicts), names)
    task_vectors = method in ("task-arithmetic", "ties", "dare")
    given = {"lambda": lam, "density": density, "p": p, "dare merge": dare_merge}
    allowed = {
        "uniform": set(), "greedy": set(), "fisher": set(),
        "task-arithmetic": {"lambda"}, "ties": {"lambda", "density"},
        "dare": {"lambda", "p", "dare merge"} | ({"density"} if dare_merge == "ties" else set()),
    }[method]
    stray = [k for k, v in given.items() if v is not None and k not in allowed]
    if stray:
        hint = " (density needs dare merge 'ties')" if method == "dare" and "density" in stray else ""
        raise UserError(f"{', '.join(stray)} does not apply to method '{method}'{hint}")
    if task_vectors and base is None:
        raise UserError(f"method '{method}' needs a base model (the one the others were fine-tuned from)")
    if not task_vectors and base is not None:
        raise UserError(f"method '{method}' takes no base model")
    if method in ("greedy", "fisher") and (data is None or model is None):
        why = "held-out scores" if method == "greedy" else "Fisher estimates"
        raise UserError(f"method '{method}' needs data ({why})")
    if method == "ties" and density is None:
        raise UserError("method 'ties' needs a density (fraction of each task vector kept), in (0, 1)")
    if method == "dare" and p is None:
        raise UserError("method 'dare' needs a drop probability p, in (0, 1)")
    if len(state_dicts) == 0:
        raise UserError("no models to merge")
    if base is not None:
        check_compatible([base, *state_dicts], ["base", *labels])
    else:
        check_compatible(state_dicts, labels)
    if model is not None:
        _check_fits(model, state_dicts[0], labels[0])

    use_data = data is not None and model is not None
    has_bn = has_batchnorm(model) if model is not None else any(_is_bn_stat(k) for k in state_dicts[0])
    bn = use_data and has_bn
    report: dict = {"method": method, "models": labels,
                    "bn_stats": "recomputed" if bn else "averaged" if has_bn else "none"}

    def prepare(sd: dict[str, Tensor]) -> dict[str, Tensor]:
        return recompute_bn(model, sd, data.x_train) if bn else sd

    lam_ = 1.0 if lam is None else lam
    if method == "uniform":
        fused = uniform_soup(state_dicts)
    elif method == "greedy":
        fused, ingredients = greedy_soup(
            state_dicts,
            lambda sd: (state_dict_accuracy(model, sd, data.x_val, data.y_val), -mean_loss(model, sd, data.x_val, data.y_val)),
            prepare=prepare)
        report["ingredients"] = [labels[i] for i in ingredients]
    elif method == "task-arithmetic":
        fused = task_arithmetic(base, state_dicts, lam_)
    elif method == "ties":
        fused = ties_merge(base, state_dicts, density, lam_)
    elif method == "dare":
        fused = dare(base, state_dicts, p, seed=seed, merge=dare_merge or "average", density=density,
                     lam=lam_)
    else:
        fishers = [estimate_fisher(model, sd, data.x_train, data.y_train, max_samples=fisher_samples)
                   for sd in state_dicts]
        fused = fisher_merge(state_dicts, fishers)
    if method != "greedy":  # greedy's soup is already prepared
        fused = prepare(fused)
    if use_data:
        report["val_accuracy"] = {
            "models": {label: state_dict_accuracy(model, sd, data.x_val, data.y_val)
                       for label, sd in zip(labels, state_dicts, strict=True)},
            "fused": state_dict_accuracy(model, fused, data.x_val, data.y_val),
        }
    return fused, report
