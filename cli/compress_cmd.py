"""Commands: train, compress, inspect."""

from __future__ import annotations

from typing import Optional

import typer

from metacompress.cli.app import JSON_OPTION, SEED_OPTION, command, console, emit, table
from metacompress.compress.distill import RepairConfig
from metacompress.compress.robust import RobustConfig

MODEL_HELP = ("Model spec: a zoo name, torchvision:NAME, or file.py:factory / package.module:factory "
              "(imports and runs that file or module: use only code you trust).")
DATA_HELP = ("Data spec: digits, digits@32, synthetic:SHAPE, npz:PATH[:tokens] (:tokens: integer N x L token ids), "
             "imagefolder:DIR[:size=S], idx:DIR.")
TRUST_PICKLE_HELP = "Allow --weights files that unpickle objects, e.g. whole modules (runs code in the file: trusted files only)."


@command("train")
def train(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: str = typer.Option("digits", "--data", help=DATA_HELP),
    out: str = typer.Option(..., "--out", help="Where to write the dense state dict (.pt)."),
    epochs: int = typer.Option(30, "--epochs", min=1, help="Training epochs."),
    seed: int = SEED_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Train the dense model (seeded) and save its state dict.

    Under ``torchrun`` the ranks train data-parallel (each its share of every batch); rank 0 writes."""
    from metacompress.dense import train_and_save

    _join_ranks()
    result = train_and_save(model, data, out, epochs=epochs, seed=seed)
    if result is None:  # not rank 0
        return
    emit(result, as_json, lambda r: console.print(
        f"trained [bold]{r['model']}[/bold] on {r['data']}: test accuracy {r['accuracy']:.4f} -> {r['out']}"))


@command("compress")
def compress(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: str = typer.Option("digits", "--data", help=DATA_HELP),
    weights: Optional[str] = typer.Option(
        None, "--weights", help="Dense state dict (.pt). Omit to train first; 'none' for untrained weights."),
    target_macs: Optional[float] = typer.Option(None, "--target-macs", help="Kept fraction of MACs, in (0, 1]."),
    target_params: Optional[float] = typer.Option(None, "--target-params", help="Kept fraction of parameters."),
    target_latency: Optional[float] = typer.Option(
        None, "--target-latency", help="Kept fraction of the dense model's latency, measured on this machine, in (0, 1]."),
    target_ms: Optional[float] = typer.Option(None, "--target-ms", help="Latency in milliseconds at --latency-batch."),
    latency_batch: int = typer.Option(1, "--latency-batch", help="Batch size the latency budget holds at."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime threads (default: the cores available)."),
    provider: str = typer.Option("cpu", "--provider", help="onnxruntime execution provider: cpu, cuda, ..."),
    allocation: str = typer.Option(
        "meta", "--allocation",
        help="How much to prune where: meta (the meta-learned policy), uniform, global-magnitude, global-taylor, lamp."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Policy folder for --allocation meta (default: shipped)."),
    adapt_steps: int = typer.Option(0, "--adapt-steps", min=0, help="ES-MAML steps on this task before deciding (0: zero-shot)."),
    guard: bool = typer.Option(True, "--guard/--no-guard",
                               help="meta: also try the default repair, uniform and the best-screened other rule; "
                                    "keep the best on validation."),
    round_to: str = typer.Option(
        "auto", "--round-to", help="Keep channel counts multiples of this; auto: the runtime's channel block."),
    repair_steps: int = typer.Option(RepairConfig.steps, "--repair-steps", help="Distillation steps (0: BN recalibration only)."),
    repair_lr: Optional[float] = typer.Option(None, "--repair-lr", help="Distillation learning rate (default: the policy's; "
                                                "unguarded, a repair whose loss rises is rerun at a tenth of it)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Distillation temperature (default: the policy's)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Weight of the teacher's soft targets (default: the policy's)."),
    samples_per_class: Optional[int] = typer.Option(
        None, "--repair-samples-per-class", help="Repair with only K labelled samples per class."),
    students: int = typer.Option(1, "--students", help="Repair K students and greedy-soup them (model fusion)."),
    quantize: str = typer.Option("none", "--quantize", help="Also write int8 model.int8.onnx: auto, static, dynamic, none."),
    out: str = typer.Option(..., "--out", help="Output folder for model.onnx, model.pt and report.json."),
    epochs: int = typer.Option(30, "--train-epochs", min=1, help="Epochs when the dense model is trained first."),
    test_samples: Optional[int] = typer.Option(
        None, "--test-samples", help="Report test accuracies on N test samples spread evenly over the test split "
                                     "(default: all; on a big split of large images evaluation is most of a run)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help=TRUST_PICKLE_HELP),
    robustify: bool = typer.Option(False, "--robustify", help="First make the dense model prune-robust (see "
                                   "robustify); its repair then also runs at a tenth of the learning rate and the "
                                   "better on validation is kept (unless --repair-lr is given)."),
    robustify_steps: int = typer.Option(RobustConfig.steps, "--robustify-steps", help="Outer steps of --robustify."),
    seed: int = SEED_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Prune MODEL to a MACs, parameter or latency budget, repair it, export ONNX and verify it."""
    from metacompress.pipeline import CompressConfig, run_compress

    given = {"lr": repair_lr, "temperature": temperature, "alpha": alpha}
    overrides = {k: v for k, v in given.items() if v is not None}
    cfg = CompressConfig(
        model=model, data=data, weights=weights, target_macs=target_macs, target_params=target_params,
        target_latency=target_latency, target_ms=target_ms, latency_batch=latency_batch, threads=threads,
        provider=provider, allocation=allocation, policy=policy, adapt_steps=adapt_steps, guard=guard, round_to=round_to,
        repair=RepairConfig(steps=repair_steps, samples_per_class=samples_per_class, **overrides),
        repair_overrides=tuple(overrides),
        students=students, quantize=quantize, train_epochs=epochs, trust_pickle=trust_pickle, seed=seed, out=out,
        test_samples=test_samples,
        robustify=RobustConfig(steps=robustify_steps) if robustify else None,
    )
    _join_ranks()
    report = run_compress(cfg)
    if report is not None:  # rank 0, or the only process
        emit(report, as_json, _render_report)


def _join_ranks() -> None:
    """Join the process group when launched by torchrun; only rank 0 shows progress."""
    import os

    from metacompress.meta import distributed

    distributed.init_from_env()
    if not distributed.is_main():
        os.environ["METACOMPRESS_PROGRESS"] = "0"


def _render_report(r: dict) -> None:
    t = table(title=f"{r['model']} on {r['data']} ({r['policy']}) -> {r.get('out', '')}")
    for col in ("", "dense", "compressed", "ratio"):
        t.add_column(col, justify="right")
    d, c = r["dense"], r["compressed"]
    for b in r["speedup"]:
        t.add_row(f"latency {b} (ms, measured)", f"{d['latency_ms'][b]:.3f}", f"{c['latency_ms'][b]:.3f}",
                  f"[bold]{r['speedup'][b]:.2f}x faster[/bold]")
    t.add_row("MACs", f"{d['macs']:,}", f"{c['macs']:,}", f"{c['macs'] / d['macs']:.3f}")
    t.add_row("params", f"{d['params']:,}", f"{c['params']:,}", f"{c['params'] / d['params']:.3f}")
    t.add_row("accuracy", f"{d['accuracy']:.4f}", f"{c['accuracy']:.4f}", f"{c['accuracy'] - d['accuracy']:+.4f}")
    t.add_row("ONNX bytes", f"{d['onnx_bytes']:,}", f"{c['onnx_bytes']:,}", f"{c['onnx_bytes'] / d['onnx_bytes']:.3f}")
    console.print(t)
    if "latency" in r:
        lat = r["latency"]
        b = f"b{lat['batch']}"
        console.print(f"latency budget {lat['target_fraction']:.3f} of dense at batch {lat['batch']} "
                      f"({lat['threads']} threads, {lat['provider']}): measured {lat['measured_fraction'][b]:.3f}, "
                      f"predicted {lat['predicted_fraction'].get(b, float('nan')):.3f}; round_to {r['round_to']}; "
                      f"latency model {lat['model']['source']} ({lat['model']['build_s']:.1f} s)")
    for w in r.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}")
    o = r["onnx"]
    if "int8" in r:
        q = r["int8"]
        console.print(f"int8 ({q['mode']}): accuracy {q['accuracy']:.4f}, {q['onnx_bytes']:,} bytes "
                      f"({q['size_ratio']:.2f}x), latency b1 {q['latency_ms']['b1']:.3f} ms, b32 {q['latency_ms']['b32']:.3f} ms")
    if "soup" in r:
        accs = ", ".join(f"{s['test_accuracy']:.4f}" for s in r["students"])
        console.print(f"students (test accuracy): {accs}; greedy soup of {len(r['soup']['ingredients'])}: "
                      f"{r['soup']['test_accuracy']:.4f}")
    console.print(f"ONNX check on {o['parity_samples']} test samples: max abs diff {o['max_abs_diff']:.2e} "
                  f"({o['max_rel_diff']:.1e} of the largest logit), top-1 agreement {o['top1_agreement']:.4f}, "
                  f"opset {o['opset']} ({o['exporter']} exporter)")


@command("inspect")
def inspect_model(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: str = typer.Option("digits", "--data", help="Data spec that sizes the model's input and classes."),
    weights: Optional[str] = typer.Option("none", "--weights", help="State dict to load (default: untrained)."),
    round_to: str = typer.Option("auto", "--round-to", help="Channel multiple; auto: the runtime's channel block."),
    latency: bool = typer.Option(False, "--latency", help="Also build (or read from cache) and show the latency model."),
    latency_batch: int = typer.Option(1, "--latency-batch", help="Batch size for --latency."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime threads (default: the cores available)."),
    provider: str = typer.Option("cpu", "--provider", help="onnxruntime execution provider: cpu, cuda, ..."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help=TRUST_PICKLE_HELP),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show prunable groups and per-layer MACs and parameters (and the latency model with --latency)."""
    from metacompress.dense import inspect_model as inspect_fn

    emit(inspect_fn(model, data, weights, round_to, latency, latency_batch, threads, provider, trust_pickle),
         as_json, _render_inspect)


def _render_inspect(r: dict) -> None:
    console.print(f"[bold]{r['model']}[/bold] on {r['data']}: input {tuple(r['input_shape'])}, "
                  f"{r['macs']:,} MACs, {r['params']:,} params")
    g = table(title="prunable groups")
    for col in ("#", "root layer", "kind", "channels", "step", "coupled layers"):
        g.add_column(col)
    for i, grp in enumerate(r["groups"]):
        g.add_row(str(i), grp["name"], grp["kind"], str(grp["channels"]), str(grp["step"]),
                  str(len(grp["out_layers"]) + len(grp["in_layers"])))
    console.print(g)
    for grp in r["groups"]:
        if grp["kept_whole"]:
            console.print(f"kept whole: '{grp['name']}' ({grp['kept_whole']})")
    t = table(title="layers")
    for col in ("layer", "type", "MACs", "params"):
        t.add_column(col)
    for layer in r["layers"]:
        t.add_row(layer["name"], layer["type"], f"{layer['macs']:,}", f"{layer['params']:,}")
    console.print(t)
    if "latency" in r:
        _render_latency_model(r["latency"])


def _render_latency_model(lat: dict) -> None:
    rt = lat["signature"]
    console.print(f"latency model ({lat['source']}, built in {lat['build_s']:.1f} s; key {lat['key']}): "
                  f"{rt['provider']}, {rt['threads']} threads, {rt['cpu']} ({rt['isa']}, channel block {lat['block']}), "
                  f"onnxruntime {rt['onnxruntime']}")
    f = table(title="fit per batch size: weight of each term, relative to the dense model's latency")
    f.add_column("")
    for b in lat["fits"]:
        f.add_column(b, justify="right")
    fits = list(lat["fits"].values())
    f.add_row("dense ms (measured)", *(f"{fit['dense_ms']:.3f}" for fit in fits))
    f.add_row("leave-one-out error", *(f"{fit['loo_error']:.1%}" for fit in fits))
    f.add_row("variants timed", *(str(fit["samples"]) for fit in fits))
    for name in fits[0]["coef"]:
        f.add_row(name, *(f"{fit['coef'][name]:.3f}" for fit in fits))
    console.print(f)
    g = table(title=f"predicted saving when one group alone goes to its floor (batch {lat['batch']}); "
                    f"all groups at the floor keep {lat['floor_fraction']:.3f} of the latency")
    for col in ("group", "channels", "step", "floor", "saved ms"):
        g.add_column(col, justify="right")
    for grp in lat["groups"]:
        g.add_row(grp["name"], str(grp["channels"]), str(grp["step"]), str(grp["floor"]), f"{grp['saved_ms_at_floor']:.3f}")
    console.print(g)
