"""``fuse``: one entry point that looks a method up, checks what it is given, merges and reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from metacompress.meta.errors import UserError
from metacompress.meta.fusion.base import FusionData, MergeContext, MergeMethod, StateDict, lookup
from metacompress.meta.fusion.checks import check_compatible, is_bn_stat, model_labels
from metacompress.meta.fusion.measure import check_fits, recompute_bn, state_dict_accuracy
from metacompress.meta.modules import has_batchnorm


def _check_inputs(cls: type[MergeMethod], state_dicts: Sequence[StateDict], labels: list[str],
                  base: StateDict | None, model: nn.Module | None, data: FusionData | None) -> None:
    """The method gets what it needs and nothing it would silently ignore; the models fit together."""
    if cls.needs_base and base is None:
        raise UserError(f"method '{cls.name}' needs a base model (the one the others were fine-tuned from)")
    if not cls.needs_base and base is not None:
        raise UserError(f"method '{cls.name}' takes no base model")
    if cls.needs_data and (data is None or model is None):
        raise UserError(f"method '{cls.name}' needs data ({cls.needs_data})")
    if len(state_dicts) == 0:
        raise UserError("no models to merge")
    if base is not None:
        check_compatible([base, *state_dicts], ["base", *labels])
    else:
        check_compatible(state_dicts, labels)
    if model is not None:
        check_fits(model, state_dicts[0], labels[0])


def fuse(
    method: str,
    state_dicts: Sequence[StateDict],
    *,
    names: Sequence[str] | None = None,
    base: StateDict | None = None,
    model: nn.Module | None = None,
    data: FusionData | None = None,
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
    **more_params: Any,
) -> tuple[dict[str, Tensor], dict]:
    """Merge ``state_dicts`` with the registered ``method``; returns (fused weights, report).

    Parameters are given by their declared names, in ``params`` or as keywords (``lambda`` is a
    Python keyword, so it goes in ``params``): ``fuse("ties", sds, base=b, params={"lambda": 0.8},
    density=0.4)``. They are checked against the method's declarations (``MergeMethod.resolve``)
    before anything is merged, as are the base (task-vector methods only) and data (for the
    methods that score or estimate). With data and a model, BatchNorm statistics of the result
    are recomputed on the training split and the report holds the validation accuracy of every
    input model and of the result.
    """
    cls = lookup(method)
    resolved = cls.resolve({**(params or {}), **more_params})
    labels = model_labels(len(state_dicts), names)
    _check_inputs(cls, state_dicts, labels, base, model, data)
    use_data = data is not None and model is not None
    has_bn = has_batchnorm(model) if model is not None else any(is_bn_stat(k) for k in state_dicts[0])
    bn = use_data and has_bn
    report: dict = {"method": method, "models": labels, "parameters": resolved,
                    "bn_stats": "recomputed" if bn else "averaged" if has_bn else "none"}

    def prepare(sd: dict[str, Tensor]) -> dict[str, Tensor]:
        return recompute_bn(model, sd, data.x_train) if bn else sd

    ctx = MergeContext(state_dicts, labels, resolved, base=base, model=model, data=data, seed=seed,
                       prepare=prepare, report=report)
    fused = cls().merge(ctx)
    if not cls.prepares:
        fused = prepare(fused)
    if use_data:
        report["val_accuracy"] = {
            "models": {label: state_dict_accuracy(model, sd, data.x_val, data.y_val)
                       for label, sd in zip(labels, state_dicts, strict=True)},
            "fused": state_dict_accuracy(model, fused, data.x_val, data.y_val),
        }
    return fused, report
