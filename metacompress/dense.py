"""Dense-model jobs behind ``metacompress train``, ``inspect`` and ``robustify``."""

from __future__ import annotations

from typing import Any, Sequence

from metacompress.allocation import budget_allocation
from metacompress.compress.attention import split_self_attention
from metacompress.compress.measure import count_params, module_macs
from metacompress.compress.prune import PruningSpace
from metacompress.compress.robust import RobustConfig, robustify
from metacompress.errors import UserError
from metacompress.io import save_torch
from metacompress.meta import data_parallel, distributed
from metacompress.pipeline import CompressConfig, load_data, load_dense, prepare
from metacompress.training import accuracy


def train_and_save(spec: str, data_spec: str, out: str, epochs: int = 30, seed: int = 0) -> dict[str, Any] | None:
    """Train ``spec`` on ``data_spec`` and save its state dict (loadable with weights_only=True).
    Under torchrun the ranks train data-parallel and rank 0 saves (the others return None)."""
    data = load_data(data_spec, spec)
    with data_parallel.data_parallel():
        model = load_dense(spec, data, None, seed=seed, epochs=epochs)
    if not distributed.is_main():
        return None
    acc = accuracy(model, data.x_test, data.y_test)
    save_torch(model.state_dict(), out)
    return {"model": spec, "data": data_spec, "accuracy": acc, "val_accuracy": accuracy(model, data.x_val, data.y_val),
            "epochs": epochs, "seed": seed, "out": out}


def robustify_and_save(spec: str, data_spec: str, weights: str | None, out: str, rc: RobustConfig,
                       allocations: Sequence[str] = ("meta", "uniform"), policy: str | None = None,
                       round_to: int | str = "auto", seed: int = 0, trust_pickle: bool = False) -> dict[str, Any]:
    """Make a dense model prune-robust over ``rc.budgets`` (kept MACs) and save its state dict.

    The tasks' allocations are the named ones (the meta-learned policy's and fixed rules'), each
    drawn with equal probability; every input is checked before any data is loaded.
    """
    rc.validate()
    if not allocations:
        raise UserError("give at least one --allocation")
    cfg = CompressConfig(model=spec, data=data_spec, weights=weights, target_macs=rc.budgets[0], policy=policy,
                         round_to=round_to, seed=seed, trust_pickle=trust_pickle)
    prep = prepare(cfg)
    allocs = [budget_allocation(name, prep, seed, policy) for name in dict.fromkeys(allocations)]
    result = robustify(prep.dense, prep.data, prep.space, allocs, rc, "macs", seed=seed)
    acc = accuracy(prep.dense, prep.data.x_test, prep.data.y_test)
    save_torch(prep.dense.state_dict(), out)
    return {"model": spec, "data": data_spec, "out": out, "budgets": list(rc.budgets), "allocations": list(allocations),
            "dense_test_accuracy_before": prep.dense_accuracy, "dense_test_accuracy_after": acc,
            **result.to_dict()}


def inspect_model(spec: str, data_spec: str, weights: str | None = "none", round_to: int | str = "auto",
                  latency: bool = False, batch: int = 1, threads: int | None = None,
                  provider: str = "cpu", trust_pickle: bool = False) -> dict[str, Any]:
    """Prunable groups and per-layer cost of a model sized for the data; with ``latency``, the
    runtime's latency model too (built on this machine, or read from its cache)."""
    from metacompress.deploy.runtime import resolve_round_to

    round_to = resolve_round_to(round_to, provider)
    data = load_data(data_spec, spec)
    model = load_dense(spec, data, weights, trust_pickle=trust_pickle)
    example = data.x_train[:1]
    split_self_attention(model, example)  # as ``compress`` sees it: attention heads are groups
    macs = module_macs(model, example)
    layers = [
        {"name": name, "type": type(m).__name__, "macs": macs.get(name, 0), "params": count_params(m)}
        for name, m in model.named_modules()
        if not list(m.children()) and (count_params(m) or macs.get(name, 0))
    ]
    space = PruningSpace(model, example, data.num_classes, round_to)  # its groups, found once for both parts
    groups = space.groups
    out = {
        "model": spec, "data": data_spec, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
        "macs": macs.get("", 0), "params": count_params(model), "round_to": round_to,
        "groups": [{"name": g.name, "kind": g.kind, "channels": g.channels, "step": g.step, "heads": g.heads,
                    "residual": g.residual, "out_layers": g.out_layers, "in_layers": g.in_layers,
                    "kept_whole": g.unsafe} for g in groups],
        "layers": layers,
    }
    if latency:
        out["latency"] = _latency_model_info(model, data, space, batch, threads, provider)
    return out


def _latency_model_info(model, data, space: PruningSpace, batch: int, threads: int | None,
                        provider: str) -> dict[str, Any]:
    """The latency model's fit and what each group's pruning saves, as predicted (ms)."""
    from metacompress.budget import budget_spec, resolve_budget

    spec = budget_spec(latency=0.5, batch=batch, threads=threads, provider=provider)
    lm = resolve_budget(spec, model, space, data.input_shape).cost
    saved = lm.per_group_ms(batch)
    floor = space.floor_keep()
    return lm.describe() | {
        "batch": batch,
        "floor_fraction": round(lm.fraction(floor), 4),
        "groups": [{"name": g.name, "channels": g.channels, "step": g.step, "floor": f, "saved_ms_at_floor": round(ms, 4)}
                   for g, f, ms in zip(space.groups, floor, saved)],
    }


__all__ = ["inspect_model", "robustify_and_save", "train_and_save"]
