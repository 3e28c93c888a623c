"""What every merge method checks and shares: compatible state dicts and the entry rules.

Entry rules shared by every method (a state dict also holds buffers, not only weights):

- non-float entries (``num_batches_tracked``, integer buffers) are copied from the first model
  given (the base, for the task-vector methods): they are counters and indices, not weights;
- BatchNorm running statistics (keys ending in ``running_mean`` / ``running_var``) are plain
  averages of the merged models' statistics: they describe activations, not learnt directions,
  so scaling, trimming or sign-electing them as task vectors can make a variance negative.
  Averages are only an approximation of the merged network's statistics: when data is at hand,
  ``recompute_bn`` re-estimates them (``fuse`` does so whenever it gets data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from metacompress.meta.errors import UserError
from metacompress.meta.fusion.base import StateDict

BN_STATS = ("running_mean", "running_var")
_LISTED = 8  # names shown per kind of mismatch; the rest are counted


def model_labels(n: int, names: Sequence[str] | None) -> list[str]:
    """``names`` (checked to be one per model), or ``model 0``, ``model 1``, ..."""
    if names is None:
        return [f"model {i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} names for {n} state dicts")
    return list(names)


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f" (+{len(items) - _LISTED} more)" if len(items) > _LISTED else "")


def _mismatches(ref: StateDict, sd: StateDict) -> list[str]:
    """The ways ``sd`` differs from ``ref``: missing / unexpected keys, shapes, dtypes."""
    missing = [k for k in ref if k not in sd]
    extra = [k for k in sd if k not in ref]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(ref[k].shape)}"
              for k in ref if k in sd and sd[k].shape != ref[k].shape]
    dtypes = [f"{k} {sd[k].dtype} vs {ref[k].dtype}".replace("torch.", "")
              for k in ref if k in sd and sd[k].shape == ref[k].shape and sd[k].dtype != ref[k].dtype]
    kinds = (("missing keys", missing), ("unexpected keys", extra), ("shape differs for", shapes),
             ("dtype differs for", dtypes))
    return [f"{what} {_listing(items)}" for what, items in kinds if items]


def check_compatible(state_dicts: Sequence[StateDict], names: Sequence[str] | None = None) -> None:
    """Raise a one-line ``UserError`` unless all state dicts have the same keys, shapes and dtypes.

    Every model is compared with the first; the message names each offending model and its
    missing / unexpected keys and the keys whose shape or dtype differs, so that the user sees
    at once which layer does not fit (e.g. weights of a different width or a different net).
    ``names`` labels the models in the message (file names, say); default ``model i``.
    """
    if len(state_dicts) == 0:
        raise UserError("no models to merge")
    labels = model_labels(len(state_dicts), names)
    for label, sd in zip(labels, state_dicts, strict=True):
        if not isinstance(sd, Mapping):
            raise UserError(f"{label} is a {type(sd).__name__}, not a state dict (name -> tensor)")
        bad = [str(k) for k, v in sd.items() if not isinstance(v, Tensor)]
        if bad:
            raise UserError(f"{label} holds non-tensor entries: {_listing(bad)}")
    problems = [f"{label} vs {labels[0]}: " + "; ".join(parts)
                for label, sd in zip(labels[1:], state_dicts[1:], strict=True)
                if (parts := _mismatches(state_dicts[0], sd))]
    if problems:
        raise UserError("incompatible models: " + " | ".join(problems))


def is_bn_stat(key: str) -> bool:
    """A BatchNorm running statistic: averaged, never merged as a task vector."""
    return key.rsplit(".", 1)[-1] in BN_STATS


def mean(tensors: Sequence[Tensor]) -> Tensor:
    """Mean in float64, cast back: the result does not depend on summation order in float32."""
    return torch.stack([t.double() for t in tensors]).mean(0).to(tensors[0].dtype)
