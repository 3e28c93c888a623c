"""Command: sweep — one dense model compressed to every budget x allocation; CSV, table, plot."""

from __future__ import annotations

from typing import Optional

import typer
from rich import box

from metacompress.cli.app import JSON_OPTION, SEED_OPTION, command, console, emit, table
from metacompress.cli.compress_cmd import DATA_HELP, MODEL_HELP
from metacompress.compress.distill import RepairConfig
from metacompress.sweep import ALLOCATIONS


@command("sweep")
def sweep(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: str = typer.Option("digits", "--data",
                             help=DATA_HELP),
    weights: Optional[str] = typer.Option(
        None, "--weights", help="Dense state dict (.pt). Omit to train once first; 'none' for untrained weights."),
    budgets: str = typer.Option("0.8,0.6,0.4,0.3,0.2", "--budgets", help="Kept fractions of the metric, comma-separated."),
    allocations: str = typer.Option(",".join(ALLOCATIONS), "--allocations",
                                    help=f"Allocations to compare, comma-separated: {', '.join(ALLOCATIONS)}."),
    metric: str = typer.Option("macs", "--metric", help="What the budgets keep: macs, or latency (measured at --latency-batch)."),
    latency_batch: int = typer.Option(1, "--latency-batch", help="Batch size a latency budget holds at."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime threads (default: the cores available)."),
    round_to: str = typer.Option("auto", "--round-to",
                                 help="Keep channel counts multiples of this; auto: the runtime's channel block."),
    repair_steps: int = typer.Option(RepairConfig.steps, "--repair-steps",
                                     help="Distillation steps per point (0: BN recalibration only)."),
    guard: bool = typer.Option(True, "--guard/--no-guard",
                               help="meta: also try the default repair, uniform and the best-screened other rule; "
                                    "keep the best on validation."),
    epochs: int = typer.Option(30, "--train-epochs", min=1, help="Epochs when the dense model is trained first."),
    latency_seconds: float = typer.Option(3.0, "--latency-seconds", min=0.0,
                                          help="Time each batch size for at least this long per point (interleaved with dense)."),
    out: str = typer.Option(..., "--out", help="Output folder for sweep.csv, sweep.json and sweep.png."),
    seed: int = SEED_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Compress MODEL to every budget x allocation: accuracy, measured latency, size and MACs as a CSV, a table and a plot."""
    from metacompress.pipeline import CompressConfig
    from metacompress.sweep import SweepConfig, parse_list, run_sweep

    base = CompressConfig(model=model, data=data, weights=weights, latency_batch=latency_batch, threads=threads,
                          round_to=round_to, repair=RepairConfig(steps=repair_steps), guard=guard, train_epochs=epochs,
                          latency_seconds=latency_seconds, seed=seed, out=out)
    cfg = SweepConfig(base, budgets=parse_list(budgets, "budgets", number=True),
                      allocations=parse_list(allocations, "allocations"), metric=metric, out=out)
    emit(run_sweep(cfg), as_json, render_sweep)


def render_sweep(r: dict) -> None:
    """The sweep as one table, points grouped by budget."""
    d = r["dense"]
    t = table(title=f"{r['model']} on {r['data']}: kept {r['metric']} x allocation (dense accuracy {d['accuracy']:.4f}, "
                    f"{d['macs']:,} MACs) -> {r['out']}")
    t.box, t.pad_edge, t.collapse_padding = box.SIMPLE_HEAD, False, True
    for col in ("kept", "allocation", "acc", "Δ pts", "MACs", "b1 ms", "b32 ms", "x b1", "x b32", "size"):
        t.add_column(col, justify="left" if col == "allocation" else "right", no_wrap=True)
    for i, row in enumerate(r["rows"]):
        new_budget = i == 0 or row["budget"] != r["rows"][i - 1]["budget"]
        t.add_row(f"{row['budget']:g}" if new_budget else "", row["allocation"], f"{row['accuracy']:.4f}",
                  f"{100 * row['accuracy_delta']:+.1f}", f"{row['macs_ratio']:.3f}",
                  f"{row['latency_b1_ms']:.3f}", f"{row['latency_b32_ms']:.3f}", f"{row['speedup_b1']:.2f}",
                  f"{row['speedup_b32']:.2f}", f"{row['size_ratio']:.2f}")
    console.print(t)
    console.print("MACs and size (ONNX bytes): kept fractions of the dense model's; x b1, x b32: measured speedups")
    console.print(f"written: {r['out']}/sweep.csv, sweep.json, sweep.png")
