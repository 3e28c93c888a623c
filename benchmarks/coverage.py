"""Coverage walk: does every torchvision classifier compress? Writes docs/coverage.md.

    python benchmarks/coverage.py [--models a,b] [--timeout 180] [--max-params 100] [--out docs/coverage.md]

Each classifier of ``torchvision.models.list_models(module=torchvision.models)`` is built with
random weights at the smallest input among 64, 96 and 224 pixels that it accepts and where the
budget is reachable (synthetic data), allocated by the shipped policy (what ``compress`` does by
default; its time is a column) and pruned to 0.5 kept MACs with ``round_to=8``, BN-recalibrated on
32 samples (so that logits are not ~0 and parity means something), exported with the legacy
exporter, checked in onnxruntime and timed against the dense export (1 thread, interleaved, b1 and
b32). Status: ``ok``, ``refused: <the UserError a user sees>``,
``error: <exception>``, ``timeout`` or ``skipped`` (over ``--max-params``: too big for this
2-core machine). One subprocess per model on one thread, so a hang or a crash costs one row.
Rows are cached in a JSON-lines file next to the output: a rerun only walks missing models
(``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = (64, 96, 224)
TARGET = 0.5
ROUND_TO = 8
DATA = "synthetic:3x{s}x{s}:n=140"
# float32 implementations differ in summation order and blocking: onnxruntime's error against float64
# may be a few times PyTorch's own (efficientnet_b4: 2.9x); a wrongly pruned model is off by the logit scale
FP32_SLACK = 10.0
LATENCY_SECONDS = 4.0  # most seconds of timing per model and batch size (the speedup columns)


def candidate_sizes(name: str) -> list[int]:
    """Input sizes to try, smallest first: those at least the weights' declared minimum size."""
    import torchvision

    min_size = max(list(torchvision.models.get_model_weights(name))[0].meta.get("min_size", (1, 1)))
    return [s for s in SIZES if s >= min_size] or [min_size]


def declared_params(name: str) -> float:
    """Millions of parameters from the weights' metadata: known without building the model."""
    import torchvision

    return list(torchvision.models.get_model_weights(name))[0].meta["num_params"] / 1e6


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def walk_one(name: str) -> dict:
    """Compress one model in this process (the worker side); returns its table row."""
    import torch

    torch.set_num_threads(1)
    from metacompress.errors import UserError

    row: dict = {"model": name}
    start = time.perf_counter()
    try:
        model, data, space = _build_at_smallest_size(name, row)
        row["dense_macs"] = space.dense_macs
        row["groups"] = len(space.groups)
        row["grouped_conv_groups"] = sum(g.conv_groups > 1 for g in space.groups)
        keep = _policy_allocation(model, space, data, row)
        _prune_export_check(model, space, keep, data, row)
        row["status"] = verdict(row)
    except UserError as exc:
        row["status"] = f"refused: {str(exc).splitlines()[0][:240]}"
    except Exception as exc:  # noqa: BLE001 - the walk records every failure as a row
        row["status"] = f"error: {_first_line(exc)}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _build_at_smallest_size(name: str, row: dict):
    """(model, data, pruning space) at the smallest of SIZES where the model runs, its pools
    export, and the budget is reachable (Swin's padded attention windows are not, at 64 px)."""
    import torch

    from metacompress.compress.attention import split_self_attention
    from metacompress.compress.prune import PruningSpace
    from metacompress.compress.rules import rule_allocation
    from metacompress.data import load_dataset
    from metacompress.errors import UserError
    from metacompress.zoo import build_model, check_forward

    why = ""
    for size in candidate_sizes(name):
        data = load_dataset(DATA.format(s=size))
        torch.manual_seed(0)
        model = build_model(f"torchvision:{name}", data.input_shape, data.num_classes, data.mean, data.std).eval()
        try:
            check_forward(model, data.x_train[:2], data.num_classes, name)
        except UserError as exc:
            why = str(exc)
            continue
        if not _adaptive_pools_export(model, data.x_train[:1]):
            why = f"{name}: adaptive pooling output does not divide its input at {size} px (legacy ONNX export)"
            continue
        split_self_attention(model, data.x_train[:1])  # as ``compress`` converts it
        space = PruningSpace(model, data.x_train[:1], data.num_classes, round_to=ROUND_TO)
        try:
            space.project(rule_allocation("uniform", space, model, calib=None), TARGET, "macs")
        except UserError as exc:
            why = str(exc)
            continue
        row["input"] = size
        return model, data, space
    raise UserError(why)


def _policy_allocation(model, space, data, row: dict) -> list[int]:
    """The shipped policy's allocation at TARGET kept MACs (what ``compress`` uses by default),
    timed: probes, experts and the policy network on the model at this input."""
    from metacompress.budget import Budget
    from metacompress.compress.distill import RepairConfig
    from metacompress.policy.allocate import policy_allocation
    from metacompress.policy.store import load_policy

    t0 = time.perf_counter()
    keep, _ = policy_allocation(load_policy(None), model, space, data.calibration_batch(128, 0),
                                Budget("macs", TARGET, "macs"), RepairConfig(steps=0))
    row["allocate_s"] = round(time.perf_counter() - t0, 1)
    return keep


def _prune_export_check(model, space, keep: list[int], data, row: dict) -> None:
    """Prune to ``keep``, recalibrate BN as the pipeline does, export dense and compressed, and
    record the MACs ratio, ONNX parity, float64 errors and measured speedup (b1, b32)."""
    import copy

    import torch

    from metacompress.compress.distill import recalibrate_bn
    from metacompress.compress.measure import count_macs
    from metacompress.deploy.bench import benchmark_latency

    example = data.x_train[:1]
    dense = copy.deepcopy(model)  # the yardstick: same BN recalibration, so logits of the same scale
    recalibrate_bn(dense, data.x_train, 32, batch_size=32, seed=0)
    space.apply(model, keep)
    recalibrate_bn(model, data.x_train, 32, batch_size=32, seed=0)
    model.eval()
    row["macs_ratio"] = count_macs(model, example) / space.dense_macs
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": Path(tmp) / "dense.onnx", "compressed": Path(tmp) / "compressed.onnx"}
        row["dense_max_abs_diff"] = _export_parity(dense.eval(), data, paths["dense"])["max_abs_diff"]
        res = _export_parity(model, data, paths["compressed"])
        times = benchmark_latency(paths, data.input_shape, batches=(1, 32), threads=1, repeats=20, warmup=2,
                                  max_seconds=LATENCY_SECONDS)
        row.update(_float64_errors(model, data.x_test, paths["compressed"]))
    for b in ("b1", "b32"):
        row[f"speedup_{b}"] = round(times["dense"][b]["median_ms"] / times["compressed"][b]["median_ms"], 3)
    with torch.no_grad():  # parity only bites when logits are not ~0 (see tests/compress/test_torchvision.py)
        row["logit_std"] = float(model(data.x_test).std())
    row["max_abs_diff"] = res["max_abs_diff"]
    row["top1_agreement"] = res["top1_agreement"]


def _export_parity(model, data, path: Path) -> dict:
    """Legacy ONNX export to ``path``, checked in onnxruntime on the test samples. On the dense
    model the max abs diff is the runtime's own float error for this architecture, the yardstick
    for the compressed model's."""
    from metacompress.deploy import export_onnx, verify_onnx

    export_onnx(model, data.x_test[:2], path, dynamo=False)
    return verify_onnx(path, model, data.x_test, data.y_test, threads=1)


def _float64_errors(model, x, path: Path) -> dict:
    """How far PyTorch's float32 logits and onnxruntime's (``path``, exported from ``model``) are
    from the same model computed in float64: an export is as faithful as float32 allows when its
    error is of the order of PyTorch's own (an ill-conditioned random-init net, e.g. BN variances
    of 1e-6 after recalibration, differs by 1e-2 from its own float64 result in both)."""
    import copy

    import numpy as np
    import torch

    from metacompress.deploy import load_session
    from metacompress.deploy.verify import run_batched

    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double()).numpy()
        fp32 = model(x).double().numpy()
    onnx_out = run_batched(load_session(path, threads=1), x)
    return {"torch_fp64_diff": float(np.abs(fp32 - exact).max()), "onnx_fp64_diff": float(np.abs(onnx_out - exact).max())}


def _adaptive_pools_export(model, x) -> bool:
    """Whether every AdaptiveAvgPool2d's output size divides its input size at this input: the
    legacy exporter refuses the others (alexnet at 64 px pools 1x1 to 6x6), so try a larger input."""
    import torch
    from torch import nn

    fits = [True]

    def check(module, args, out) -> None:
        h, w = args[0].shape[-2:]
        if h % out.shape[-2] or w % out.shape[-1]:
            fits[0] = False

    handles = [m.register_forward_hook(check) for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return fits[0]


def verdict(row: dict) -> str:
    """ok, or which bound a compressed model missed: the MACs ratio (the cost model's estimate
    was off) or ONNX parity: at most 1e-4, or at most twice the export error of the dense model
    recalibrated the same way (deep random-init nets have large logits whose float32 sums differ
    by more than 1e-4 between PyTorch and onnxruntime before any pruning), or onnxruntime's error
    against the float64 computation within FP32_SLACK of PyTorch's float32 one (``_float64_errors``);
    the error relative to the logit scale tells float32 accumulation (relative ~1e-5) from a
    broken model (relative ~1)."""
    misses = []
    if abs(row["macs_ratio"] - TARGET) > 0.02 * TARGET:
        misses.append(f"MACs ratio {row['macs_ratio']:.4f} off by more than 2 %")
    as_exact_as_torch = row.get("onnx_fp64_diff", float("inf")) <= FP32_SLACK * row.get("torch_fp64_diff", 0.0)
    if row["max_abs_diff"] > max(1e-4, 2 * row.get("dense_max_abs_diff", 0.0)) and not as_exact_as_torch:
        rel = row["max_abs_diff"] / max(row.get("logit_std", 0.0), 1e-12)
        misses.append(f"max abs diff {row['max_abs_diff']:.1e} > 1e-4 and > twice the dense export's "
                      f"{row.get('dense_max_abs_diff', 0.0):.1e} (relative to logit std: {rel:.0e})")
    return "ok" if not misses else "error: " + "; ".join(misses)


def run_isolated(name: str, timeout: float) -> dict:
    """Run ``walk_one`` in a child process with a wall-clock limit and one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "METACOMPRESS_PROGRESS": "0"}
    start = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, __file__, "--worker", name], capture_output=True, text=True,
                             env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "status": f"timeout: over {timeout:.0f} s", "seconds": round(time.perf_counter() - start, 1)}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"model": name, "status": f"error: worker exit {res.returncode}: {tail}",
                "seconds": round(time.perf_counter() - start, 1)}
    return json.loads(lines[-1])


def _fmt(row: dict, key: str, spec: str) -> str:
    v = row.get(key)
    return "" if v is None else format(v, spec)


def render(rows: list[dict], command: str, note: str) -> str:
    """The markdown page: command, counts, then one line per model."""
    counts: dict[str, int] = {}
    for r in rows:
        k = (verdict(r) if "max_abs_diff" in r else r["status"]).split(":")[0]
        counts[k] = counts.get(k, 0) + 1
    out = ["# torchvision coverage", "",
           "Generated by `benchmarks/coverage.py`; do not edit by hand. Command:", "",
           f"    {command}", "",
           f"The shipped policy's allocation to {TARGET} kept MACs (guard off), round_to={ROUND_TO}, random weights, "
           "synthetic data, BN recalibrated on 32 samples, legacy ONNX export checked in onnxruntime on 28 test samples "
           f"and timed against the dense export (interleaved medians, at most {LATENCY_SECONDS:g} s per batch size). "
           "`ok` means achieved MACs within 2 % of the target and max abs diff <= 1e-4, or at most twice the dense "
           "model's own export error (deep random-init nets have logits large enough for float32 sums to differ by "
           "more before any pruning), or onnxruntime's error against the same model in float64 at most "
           f"{FP32_SLACK:g}x PyTorch's own float32 error (an ill-conditioned net is no more exact in PyTorch); "
           "the logit std says how much "
           "that parity means (a std near 0, e.g. squeezenet's ReLU-before-pool head at random init, makes it trivial). "
           "One thread, 2 shared cores.",
           "", note, "",
           "Counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" (of {len(rows)})", "",
           "| model | input | dense MMACs | groups (grouped-conv) | status | MACs ratio | speedup b1 | speedup b32 "
           "| allocation s | ONNX max abs diff | dense export diff | vs float64: PyTorch / ONNX | logit std | s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["model"]):
        if "max_abs_diff" in r:
            r = {**r, "status": verdict(r)}
        macs = _fmt({"m": r["dense_macs"] / 1e6} if "dense_macs" in r else {}, "m", ".1f")
        groups = f"{r['groups']} ({r.get('grouped_conv_groups', 0)})" if "groups" in r else ""
        status = r["status"].replace("|", "/")
        out.append(f"| {r['model']} | {r.get('input', '')} | {macs} | {groups} | {status} | "
                   f"{_fmt(r, 'macs_ratio', '.4f')} | {_fmt(r, 'speedup_b1', '.2f')} | {_fmt(r, 'speedup_b32', '.2f')} | "
                   f"{_fmt(r, 'allocate_s', '.1f')} | {_fmt(r, 'max_abs_diff', '.1e')} | "
                   f"{_fmt(r, 'dense_max_abs_diff', '.1e')} | {_fp64(r)} | {_fmt(r, 'logit_std', '.2g')} | "
                   f"{r['seconds']} |")
    return "\n".join(out) + "\n"


def _fp64(row: dict) -> str:
    if "onnx_fp64_diff" not in row:
        return ""
    return f"{row['torch_fp64_diff']:.1e} / {row['onnx_fp64_diff']:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", help="comma-separated subset to walk (default: every torchvision classifier); "
                                     "the page keeps the other models' cached rows")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per model")
    ap.add_argument("--max-params", type=float, default=100.0, help="skip models over this many million params")
    ap.add_argument("--out", default=str(ROOT / "docs" / "coverage.md"))
    ap.add_argument("--fresh", action="store_true", help="ignore cached rows")
    ap.add_argument("--redo", default="", help="walk again the cached rows whose status starts with this, e.g. error")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(walk_one(args.worker)))
        return
    import torchvision

    names = args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models)
    if args.models and args.fresh:
        raise SystemExit("--fresh walks every model: it cannot be combined with --models")
    cache = Path(args.out).with_suffix(".jsonl")
    cache.parent.mkdir(parents=True, exist_ok=True)
    every = torchvision.models.list_models(module=torchvision.models)
    rows = {} if args.fresh or not cache.exists() else {
        r["model"]: r for r in map(json.loads, cache.read_text().splitlines()) if r["model"] in every}
    for name in names:
        if name in rows and not (args.redo and rows[name]["status"].startswith(args.redo)):
            continue
        mparams = declared_params(name)
        if mparams > args.max_params:
            row = {"model": name, "status": f"skipped: {mparams:.0f} M params > --max-params {args.max_params:g}",
                   "seconds": 0.0}
        else:
            row = run_isolated(name, args.timeout)
        rows[name] = row
        print(f"{name}: {row['status']} ({row['seconds']} s)", flush=True)
        with cache.open("a") as f:
            f.write(json.dumps(row) + "\n")
    command = "python benchmarks/coverage.py " + " ".join(a for a in sys.argv[1:])
    note = (f"Models over {args.max_params:g} M parameters are skipped (building, pruning and exporting them "
            f"at one thread takes minutes each on this machine); each model had {args.timeout:.0f} s."
            + (" The rows of the models not named in --models come from earlier runs (the cache next to this page)."
               if args.models else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(render(list(rows.values()), command.strip(), note))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
