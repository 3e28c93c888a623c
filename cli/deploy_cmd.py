"""Commands: verify, bench, quantize (ONNX deployment checks in onnxruntime)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import typer

from metacompress.cli.app import JSON_OPTION, SEED_OPTION, command, console, emit, table
from metacompress.errors import UserError

SPLITS = ("test", "val", "train")


def _split(data: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}': use {', '.join(SPLITS)}")
    return getattr(data, f"x_{split}"), getattr(data, f"y_{split}")


def _reference(path: Path | None, spec: str | None, data: Any, trust_pickle: bool) -> Any:
    """The PyTorch model to compare against: a compressed ``model.pt``, or a zoo model's state dict."""
    if path is None:
        if spec is not None:
            raise UserError("--reference-model needs --reference WEIGHTS.pt (its state dict)")
        return None
    if spec is None:
        from metacompress.compress.checkpoint import load_compressed

        model, _ = load_compressed(path)
        return model
    from metacompress.io import load_weights, state_dict_from
    from metacompress.zoo import build_model

    state = state_dict_from(load_weights(path, trust_pickle=trust_pickle), str(path))
    model = build_model(spec, data.input_shape, data.num_classes, data.mean, data.std)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not fit {spec}: {str(exc).splitlines()[0]}") from None
    return model


def _parse_batches(text: str) -> tuple[int, ...]:
    from metacompress.budget import MAX_BATCH

    try:
        batches = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1 or max(batches) > MAX_BATCH:
        raise UserError(f"--batch takes integers 1..{MAX_BATCH} separated by commas (e.g. 1,32), got '{text}'")
    return batches


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@command("verify")
def verify(
    model: Path = typer.Argument(..., help="The ONNX model to check."),
    data: str = typer.Option(..., "--data", help="Dataset spec (digits, digits@32, npz:PATH, ...)."),
    reference: Path | None = typer.Option(None, "--reference", help="model.pt written by compress (or a "
                                             "state dict with --reference-model) to compare outputs with."),
    reference_model: str | None = typer.Option(None, "--reference-model",
                                                  help="Zoo spec whose state dict --reference holds."),
    split: str = typer.Option("test", "--split", help="Data split to run on: test, val or train."),
    batch_size: int = typer.Option(256, "--batch-size", help="Samples per onnxruntime call."),
    threads: int | None = typer.Option(None, "--threads", help="onnxruntime intra-op threads."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow unpickling --reference."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Accuracy, max abs diff and top-1 agreement vs the PyTorch reference, ops, opset and file size."""
    from metacompress.data import load_dataset
    from metacompress.deploy import verify_onnx
    from metacompress.deploy.verify import check_onnx, declared_image_size

    check_onnx(model)  # bad ONNX fails before the data and reference are loaded
    ds = load_dataset(data, image_size=declared_image_size(model))
    x, y = _split(ds, split)
    ref = _reference(reference, reference_model, ds, trust_pickle)
    result = verify_onnx(model, ref, x, y, batch_size=batch_size, threads=threads)
    result["model"] = str(model)

    def render(r: dict) -> None:
        console.print(f"[bold]{r['model']}[/bold]: opset {r['opset']}, {r['bytes']:,} bytes, "
                      f"{sum(r['ops'].values())} nodes")
        console.print(f"accuracy {_fmt(r['accuracy'], '.4f')} on {r['samples']} {split} samples; "
                      f"max abs diff {_fmt(r['max_abs_diff'], '.3g')} "
                      f"(relative {_fmt(r['max_rel_diff'], '.1e')}); "
                      f"top-1 agreement {_fmt(r['top1_agreement'], '.4f')}")
        console.print("ops: " + ", ".join(f"{k} {v}" for k, v in r["ops"].items()), highlight=False)

    emit(result, as_json, render)


@command("bench")
def bench(
    model: Path = typer.Argument(..., help="The ONNX model to time."),
    baseline: Path | None = typer.Option(None, "--baseline", help="Another ONNX model to compare with."),
    batch: str = typer.Option("1,32", "--batch", help="Batch sizes, comma-separated."),
    threads: int | None = typer.Option(None, "--threads", help="onnxruntime intra-op threads."),
    repeats: int = typer.Option(20, "--repeats", min=1, max=100_000, help="Timed runs per model and batch size."),
    warmup: int = typer.Option(3, "--warmup", min=0, max=100_000,
                               help="Untimed runs first (where every pass takes 1 s or more, the last is timed)."),
    input_shape: str | None = typer.Option(None, "--input-shape",
                                              help="One sample's shape, e.g. 3x224x224 (when the model's is symbolic)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Median latency (with min/max) in onnxruntime, interleaved with --baseline, and the speedup."""
    from metacompress.deploy import load_session
    from metacompress.deploy.bench import benchmark_latency, speedups
    from metacompress.deploy.verify import check_onnx

    batches = _parse_batches(batch)
    sessions = {"model": load_session(check_onnx(model), threads)}
    if baseline is not None:
        sessions["baseline"] = load_session(check_onnx(baseline), threads)
    shape = _input_shape(sessions["model"], input_shape)
    result: dict[str, Any] = {"latency": benchmark_latency(sessions, shape, batches, threads=threads,
                                                           repeats=repeats, warmup=warmup)}
    result.update({"model": str(model), "baseline": None if baseline is None else str(baseline),
                   "threads": threads, "repeats": repeats, "input_shape": list(shape)})
    result["speedup"] = speedups(result["latency"], "baseline")["model"] if baseline is not None else None

    def render(r: dict) -> None:
        t = table(title=f"onnxruntime latency, {threads or 'default'} thread(s), median of {repeats} "
                            "(min-max), interleaved")
        t.add_column("model")
        for b in batches:
            t.add_column(f"batch {b} ms", justify="right")
        for key, name in (("model", r["model"]), ("baseline", r["baseline"])):
            if name is not None:
                t.add_row(Path(name).name, *(f"{s['median_ms']:.3f} ({s['min_ms']:.3f}-{s['max_ms']:.3f})"
                                      for s in r["latency"][key].values()))
        if r["speedup"] is not None:
            t.add_row("speedup (baseline / model)", *(f"{v:.2f}x" for v in r["speedup"].values()))
        console.print(t)

    emit(result, as_json, render)


def _input_shape(session: Any, text: str | None) -> tuple[int, ...]:
    """One sample's shape: from --input-shape, else from the model's declared (fixed) input dims."""
    from metacompress.data.datasets import MAX_SAMPLE_ELEMENTS

    if text is not None:
        try:
            shape = tuple(int(d) for d in text.lower().split("x"))
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1 or math.prod(shape) > MAX_SAMPLE_ELEMENTS:
            raise UserError(f"--input-shape takes positive sizes joined by x (e.g. 3x224x224), at most "
                            f"{MAX_SAMPLE_ELEMENTS:,} values, got '{text}'")
        return shape
    dims = session.get_inputs()[0].shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise UserError(f"the model's input shape {dims} is not fixed: give --input-shape")
    return tuple(dims)


@command("quantize")
def quantize(
    model: Path = typer.Argument(..., help="The float ONNX model."),
    out: Path = typer.Option(..., "--out", help="Where to write the int8 ONNX model."),
    data: str | None = typer.Option(None, "--data", help="Dataset spec: calibration data (static) and "
                                       "the accuracy check."),
    mode: str = typer.Option("auto", "--mode", "--quantize",
                             help="auto (by op mix), static (QDQ, for convs) or dynamic (Linear-only)."),
    samples: int = typer.Option(256, "--calibration-samples", help="Training samples to calibrate on."),
    seed: int = SEED_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """int8 quantization; with --data, also the accuracy of both files and their top-1 agreement."""
    import numpy as np

    from metacompress.data import load_dataset
    from metacompress.deploy import load_session
    from metacompress.deploy.quantize import quantize_onnx
    from metacompress.deploy.verify import check_input, check_onnx, declared_image_size, run_batched
    from metacompress.io import refuse_output_over_inputs

    if samples < 1:
        raise UserError(f"--calibration-samples must be at least 1, got {samples}")
    refuse_output_over_inputs(out, [model])
    src = load_session(check_onnx(model), threads=1)
    ds = load_dataset(data, image_size=declared_image_size(model)) if data is not None else None
    if ds is not None:
        check_input(src, ds.input_shape)  # before anything is written
    calibration = None if ds is None else ds.calibration_batch(samples, seed)[0].numpy()
    result: dict[str, Any] = quantize_onnx(model, out, mode, calibration)
    result.update({"model": str(model), "out": str(out)})
    if ds is not None:
        x, y = ds.x_test, ds.y_test.numpy()  # run_batched reads lazy samples batch by batch
        before, after = run_batched(src, x).argmax(1), run_batched(load_session(out, threads=1), x).argmax(1)
        result.update({"accuracy_fp32": float((before == y).mean()), "accuracy": float((after == y).mean()),
                       "top1_agreement": float(np.mean(before == after))})
    result.pop("ops")

    def render(r: dict) -> None:
        console.print(f"[bold]{r['out']}[/bold]: {r['mode']} int8, {r['bytes']:,} bytes "
                      f"({r['size_ratio']:.2f}x of {r['src_bytes']:,})")
        if "accuracy" in r:
            console.print(f"test accuracy {r['accuracy_fp32']:.4f} -> {r['accuracy']:.4f}, "
                          f"top-1 agreement {r['top1_agreement']:.4f}")

    emit(result, as_json, render)
