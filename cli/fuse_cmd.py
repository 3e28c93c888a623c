"""Command: fuse — merge several trained models of one architecture (``metacompress.meta.fusion``).

Options come from the command line, from a YAML file (``--config``, in the spirit of mergekit),
or both: an option given on the command line overrides the file's value. Paths in the file are
relative to the current directory, as on the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from metacompress.cli.app import JSON_OPTION, SEED_OPTION, command, console, emit, table
from metacompress.errors import UserError
from metacompress.io import load_weights, refuse_output_over_inputs, save_torch, state_dict_from
from metacompress.meta.fusion import DARE_MERGES, FusionData, fuse, lookup, method_names
from metacompress.pipeline import load_data
from metacompress.recipes import load_recipe
from metacompress.zoo import build_model

# Config-file keys at the top level; ``parameters`` holds the method's own, checked against its declarations.
_TOP_KEYS = ("method", "model", "weights", "base", "data", "out", "seed", "parameters")


def _read_config(path: Path) -> dict[str, Any]:
    """The config file as option name -> value, validated: a typo fails loudly, not silently.

    ``parameters`` stays a mapping: its names and values are checked against the method's
    declarations once the method is known (the command line may override it).
    """
    raw = load_recipe(path)
    unknown = [str(k) for k in raw if k not in _TOP_KEYS]
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(_TOP_KEYS)})")
    params = raw.pop("parameters", None) or {}
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise UserError(f"{path}: 'parameters' must be a mapping of parameter name -> value")
    cfg: dict[str, Any] = {"model_spec" if k == "model" else k: v for k, v in raw.items()}
    cfg["parameters"] = params
    weights = cfg.get("weights")
    if isinstance(weights, list):
        if not all(isinstance(w, str) for w in weights):
            raise UserError(f"{path}: 'weights' must be a list of file paths")
        cfg["weights"] = ",".join(weights)
    for key in ("method", "model_spec", "weights", "base", "data", "out"):
        if key in cfg and not isinstance(cfg[key], str):
            raise UserError(f"{path}: '{key}' must be a string, got {cfg[key]!r}")
    if "seed" in cfg and (isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int)):
        raise UserError(f"{path}: 'seed' must be an integer, got {cfg['seed']!r}")
    return cfg


def _method_params(method: str, from_config: dict[str, Any], from_flags: dict[str, Any]) -> dict[str, Any]:
    """The method's parameters (flags over the config file), checked against its declarations."""
    return lookup(method).resolve({**from_config, **{k: v for k, v in from_flags.items() if v is not None}})


def _load_state_dict(path: str, trust_pickle: bool) -> dict:
    """A state dict from a checkpoint: a plain state dict, ``{"state_dict": ...}`` or a trusted module."""
    return state_dict_from(load_weights(path, trust_pickle=trust_pickle), path)


@command("fuse", help="Merge trained models of one architecture: soups, task arithmetic, TIES, DARE, Fisher.")
def fuse_command(
    ctx: typer.Context,
    model_spec: str | None = typer.Argument(
        None, help="Model the weights belong to (zoo name, torchvision:NAME, file.py:factory, which runs that file); built "
                   "with --data to recompute BN statistics, estimate Fisher and score the soup."),
    method: str | None = typer.Option(None, "--method", "-m", help=f"One of: {', '.join(method_names())}."),
    weights: str | None = typer.Option(None, "--weights", "-w", help="Comma-separated state-dict files."),
    base: str | None = typer.Option(None, "--base", help="Base model (task-arithmetic, ties, dare)."),
    data: str | None = typer.Option(None, "--data", help="Data spec (needed by greedy and fisher)."),
    out: str | None = typer.Option(None, "--out", "-o", help="Where to write the fused state dict."),
    lam: float | None = typer.Option(None, "--lambda", help="Task-vector scale (default 1)."),
    density: float | None = typer.Option(None, "--density", help="TIES: fraction of each task vector kept."),
    p: float | None = typer.Option(None, "--p", help="DARE: drop probability."),
    dare_merge: str | None = typer.Option(None, "--dare-merge", help=f"DARE: {' or '.join(DARE_MERGES)}."),
    config: str | None = typer.Option(None, "--config", help="YAML file with these options."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow pickled whole modules (unsafe)."),
    seed: int = SEED_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    opts: dict[str, Any] = _read_config(Path(config)) if config is not None else {}
    given = {"model_spec": model_spec, "method": method, "weights": weights, "base": base, "data": data, "out": out}
    opts.update({k: v for k, v in given.items() if v is not None})
    seed_source = ctx.get_parameter_source("seed")  # --seed has a default: was it typed?
    if "seed" not in opts or (seed_source is not None and seed_source.name != "DEFAULT"):
        opts["seed"] = seed
    for key, what in (("model_spec", "a MODEL_SPEC"), ("method", "--method"), ("weights", "--weights"),
                      ("out", "--out")):
        if not opts.get(key):
            raise UserError(f"fuse needs {what} (on the command line or in --config)")
    flags = {"lambda": lam, "density": density, "p": p, "dare_merge": dare_merge}
    params = _method_params(opts["method"], opts.pop("parameters", {}), flags)
    paths = [w.strip() for w in opts["weights"].split(",")]
    if any(not w for w in paths):
        raise UserError(f"empty file name in weights list '{opts['weights']}'")

    refuse_output_over_inputs(opts["out"], paths + ([opts["base"]] if opts.get("base") else []))
    state_dicts = [_load_state_dict(w, trust_pickle) for w in paths]
    base_sd = _load_state_dict(opts["base"], trust_pickle) if opts.get("base") else None
    model = fusion_data = None
    if opts.get("data"):
        ds = load_data(opts["data"], opts["model_spec"])
        model = build_model(opts["model_spec"], ds.input_shape, ds.num_classes, ds.mean, ds.std)
        fusion_data = FusionData(ds.x_train, ds.y_train, ds.x_val, ds.y_val)
    fused, report = fuse(opts["method"], state_dicts, names=paths, base=base_sd, model=model, data=fusion_data,
                         seed=opts["seed"], params=params)
    save_torch(fused, opts["out"])
    result = {"model": opts["model_spec"], "out": str(opts["out"]), "seed": opts["seed"], **report}
    emit(result, as_json, _render)


def _render(result: dict) -> None:
    console.print(f"fused {len(result['models'])} models with [bold]{result['method']}[/bold] "
                  f"(BN statistics: {result['bn_stats']}) -> {result['out']}")
    if "ingredients" in result:
        console.print(f"greedy soup ingredients: {', '.join(result['ingredients'])}")
    if "val_accuracy" in result:
        t = table("model", "val accuracy")
        for name, acc in result["val_accuracy"]["models"].items():
            t.add_row(name, f"{acc:.4f}")
        t.add_row("[bold]fused[/bold]", f"[bold]{result['val_accuracy']['fused']:.4f}[/bold]")
        console.print(t)
