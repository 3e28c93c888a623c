"""Does removing half the MACs make onnxruntime (CPU) half as slow? Measured speedup vs MACs reduction.

For each model: build it with seeded random weights (latency does not depend on weight values; no
accuracy is measured here), prune a copy to 0.5 of the dense MACs with the toolkit's exact-budget
executor (``PruningSpace``, **uniform** allocation, channels rounded to ``round_to``), export both
(dynamo exporter + onnxslim, as ``metacompress compress`` does), check ONNX-vs-PyTorch parity, then
time dense and compressed side by side in onnxruntime on ``--threads`` threads.

The MACs ratio predicts a speedup of 1 / ratio; the question is how much of it the runtime delivers.
Target (issue "foundation"): measured speedup >= 0.8 x (dense MACs / compressed MACs) at batch 32
for the CNNs.

Measurement (the machine is 2 shared cores, so noise is large and drifts): ``rounds`` rounds; each
round times every model of a case interleaved round-robin (``benchmark_latency``) for
``repeats`` runs at batch 1, then at batch 32, and takes each model's median. A round's speedup is
dense median / compressed median of that same round; the table gives the median over rounds and
the min-max over rounds. ``repeats`` is sized per case so that a round lasts about 3 s (0.5 s with
``--quick``; ``--smoke`` runs one short round of resnet20 only, to check the script runs).

Where the pruned models come from (the toolkit's own pruning; only deploy.py's 3-line helper is
generalised here):
- resnet20 on digits@32 (1x32x32) and the zoo's default vit-tiny on synthetic 3x32x32 go through
  the real pipeline stages (``prepare`` -> ``allocate`` -> ``prune_to`` with ``--weights none``,
  ``--allocation uniform``); resnet20 is also pruned with ``round_to=1`` for comparison;
- torchvision resnet18 / mobilenet_v2 and ViT-Ti/16 (the zoo's vit-tiny at 3x224x224, dim 192,
  12 blocks, 1000 classes) are ``benchmarks/deploy.py``'s cases, pruned the same way (its
  ``compress`` with ``round_to`` as a parameter); resnet18 is also pruned with ``round_to=16``.

    .venv/bin/python benchmarks/compress_latency.py [--quick | --smoke] [--threads 2] [--only resnet20,resnet18]
        [--no-spin] [--exporter dynamo|legacy] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch
from torch import nn

from metacompress.allocation import allocate
from metacompress.compress.measure import count_macs
from metacompress.compress.prune import PruningSpace
from metacompress.compress.rules import rule_allocation
from metacompress.deploy import export_onnx, load_session, verify_onnx
from metacompress.deploy.bench import benchmark_latency
from metacompress.deploy.simplify import simplify_onnx
from metacompress.io import write_json
from metacompress.pipeline import CompressConfig, prepare
from metacompress.students import prune_to
from metacompress.zoo import build_model

BATCHES = (1, 32)
TARGET_FRACTION_OF_IDEAL = 0.8  # measured b32 speedup must reach this share of 1 / MACs ratio (CNNs)


def _load_deploy_benchmark() -> ModuleType:
    """``benchmarks/deploy.py`` by path (benchmarks/ is not a package): its CASES and compress helper."""
    spec = importlib.util.spec_from_file_location("metacompress_bench_deploy", Path(__file__).with_name("deploy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEPLOY = _load_deploy_benchmark()
TARGET: float = DEPLOY.TARGET  # 0.5 kept MACs, the same budget as the deployment benchmark


@dataclass
class Case:
    """One table row group: a dense model and its compressed variants, timed together."""

    name: str
    input_label: str
    shape: tuple[int, ...]
    cnn: bool
    build: Callable[[], tuple[nn.Module, dict[int, nn.Module]]]  # -> dense, {round_to: compressed}
    variants: dict[int, nn.Module] = field(default_factory=dict)


def pipeline_models(spec: str, data: str, round_tos: tuple[int, ...]) -> tuple[nn.Module, dict[int, nn.Module]]:
    """Dense (seeded random weights) and uniform-pruned models through the pipeline's own stages.

    The same calls ``metacompress compress SPEC --data DATA --weights none --allocation uniform
    --target-macs 0.5 --round-to R`` makes before repair (repair does not change the architecture).
    """
    dense, out = None, {}
    for r in round_tos:
        cfg = CompressConfig(model=spec, data=data, weights="none", target_macs=TARGET, allocation="uniform",
                             round_to=r, seed=0)
        prep = prepare(cfg)
        keep, importance, _ = allocate(cfg, prep)
        out[r] = prune_to(prep, keep, importance, cfg.seed).eval()
        dense = prep.dense if dense is None else dense  # seeded: the same dense model every time
    return dense.eval(), out


def compress(model: nn.Module, example: torch.Tensor, num_classes: int, round_to: int) -> nn.Module:
    """``benchmarks/deploy.py``'s ``compress`` (uniform allocation, exact TARGET budget) with ``round_to`` open.

    deploy.py fixes ``round_to=8``; the comparison rows here need 16 as well (this CPU has AVX-512,
    whose convolution kernels work on blocks of 16 channels).
    """
    space = PruningSpace(model, example, num_classes, round_to=round_to)
    keep = space.project(rule_allocation("uniform", space, model, calib=None), TARGET)
    return space.apply(model, keep)


def deploy_models(name: str, round_tos: tuple[int, ...] = (8,)) -> tuple[nn.Module, dict[int, nn.Module]]:
    """Dense and 0.5-MACs models of one ``benchmarks/deploy.py`` case, built as that benchmark does."""
    _, spec, shape, classes, kwargs = next(c for c in DEPLOY.CASES if c[0] == name)
    torch.manual_seed(0)
    dense = build_model(spec, shape, classes, **kwargs).eval()
    example = torch.randn(1, *shape)
    return dense, {r: compress(copy.deepcopy(dense), example, classes, r).eval() for r in round_tos}


CASES: list[Case] = [
    Case("resnet20", "digits@32, 1x32x32", (1, 32, 32), True,
         lambda: pipeline_models("resnet20", "digits@32", (8, 1))),
    Case("resnet18", "torchvision, 3x224x224", (3, 224, 224), True, lambda: deploy_models("resnet18", (8, 16))),
    Case("mobilenet_v2", "torchvision, 3x224x224", (3, 224, 224), True, lambda: deploy_models("mobilenet_v2")),
    Case("vit-tiny-32", "zoo default (dim 64, 4 blocks), 3x32x32", (3, 32, 32), False,
         lambda: pipeline_models("vit-tiny", "synthetic:3x32x32", (8,))),
    Case("vit-tiny-224", "ViT-Ti/16 (dim 192, 12 blocks), 3x224x224", (3, 224, 224), False,
         lambda: deploy_models("vit-tiny")),
]


def export_checked(model: nn.Module, shape: tuple[int, ...], path: Path, dynamo: bool, threads: int) -> dict[str, Any]:
    """Export + simplify like the pipeline, then prove the file computes the model (parity on 4 inputs)."""
    info = export_onnx(model, torch.randn(2, *shape), path, dynamo=dynamo)
    simplify_onnx(path, path)
    check = verify_onnx(path, model, torch.randn(4, *shape), None, threads=threads)
    return {"exporter": info["exporter"], "bytes": check["bytes"], "max_abs_diff": check["max_abs_diff"]}


def nchwc_block() -> int | None:
    """Channel block of onnxruntime's (MLAS) NCHWc convolutions on this CPU: 16 with AVX-512, 8 with AVX2.

    Read from /proc/cpuinfo (Linux x86); None where unknown. onnxruntime rounds a convolution's
    output channels up to this block: a layer that keeps 88 channels costs what 96 cost (block 16).
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    return 16 if "avx512f" in flags else 8 if "avx2" in flags else None


def padded_conv_macs(model: nn.Module, shape: tuple[int, ...], block: int) -> int:
    """Convolution MACs at batch 1 with every channel count rounded up to ``block`` (as NCHWc computes them).

    Inputs of fewer than ``block`` channels (the image) are not padded; depthwise convs cost per
    padded channel. Linear layers are left out: this is the CNNs' compute as the runtime sees it.
    """
    def up(c: int) -> int:
        return block * math.ceil(c / block)

    total = 0

    def hook(m: nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        per_pixel = m.kernel_size[0] * m.kernel_size[1] * out.shape[2] * out.shape[3]
        if m.groups > 1:
            total += up(m.out_channels) * (m.in_channels // m.groups) * per_pixel
        else:
            cin = m.in_channels if m.in_channels < block else up(m.in_channels)
            total += cin * up(m.out_channels) * per_pixel

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
    finally:
        for h in handles:
            h.remove()
    return total


def _round_repeats(sessions: dict[str, Any], shape: tuple[int, ...], batch: int, round_s: float,
                   min_repeats: int) -> int:
    """Repeats per round so that one interleaved round lasts about ``round_s`` (small models get more)."""
    probe = benchmark_latency(sessions, shape, batches=(batch,), repeats=1, warmup=2)
    per_repeat_s = sum(r[f"b{batch}"]["median_ms"] for r in probe.values()) / 1e3
    return max(min_repeats, min(500, round(round_s / max(per_repeat_s, 1e-6))))


def time_case(paths: dict[str, Path], shape: tuple[int, ...], threads: int, spin: bool, rounds: int,
              round_s: float, min_repeats: int) -> dict[str, Any]:
    """Interleaved latency per round for every model, and per-round speedups against ``dense``."""
    sessions = {k: load_session(p, threads, spin) for k, p in paths.items()}
    reps = {b: _round_repeats(sessions, shape, b, round_s, min_repeats) for b in BATCHES}
    per_round: dict[str, dict[str, list[float]]] = {k: {f"b{b}": [] for b in BATCHES} for k in sessions}
    for i in range(rounds):
        for b in BATCHES:
            res = benchmark_latency(sessions, shape, batches=(b,), repeats=reps[b], warmup=1, seed=i)
            for k in sessions:
                per_round[k][f"b{b}"].append(res[k][f"b{b}"]["median_ms"])
    out: dict[str, Any] = {"repeats_per_round": {f"b{b}": reps[b] for b in BATCHES}, "models": {}}
    for k in sessions:
        entry: dict[str, Any] = {}
        for b in BATCHES:
            key = f"b{b}"
            ms = per_round[k][key]
            entry[key] = {"median_ms": statistics.median(ms), "round_medians_ms": ms}
            if k != "dense":
                sp = [d / c for d, c in zip(per_round["dense"][key], ms)]
                entry[key]["speedup"] = {"median": statistics.median(sp), "min": min(sp), "max": max(sp),
                                         "rounds": sp}
        out["models"][k] = entry
    return out


def run_case(case: Case, work: Path, args: argparse.Namespace, rounds: int, round_s: float,
             min_repeats: int) -> dict[str, Any]:
    """Build, export and time one case; one table row per compressed variant, each against the same dense run."""
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    dense, variants = case.build()
    example = torch.randn(1, *case.shape)
    dense_macs = count_macs(dense, example)
    models = {"dense": dense} | {f"round_to={r}": m for r, m in variants.items()}
    paths = {k: work / f"{case.name}.{k.replace('=', '')}.onnx" for k in models}
    files = {k: export_checked(m, case.shape, paths[k], args.exporter == "dynamo", args.threads)
             for k, m in models.items()}
    build_s = time.perf_counter() - t0
    timing = time_case(paths, case.shape, args.threads, not args.no_spin, rounds, round_s, min_repeats)
    block = nchwc_block()
    dense_padded = padded_conv_macs(dense, case.shape, block) if case.cnn and block else None
    rows = []
    for k in models:
        if k == "dense":
            continue
        ratio = count_macs(models[k], example) / dense_macs
        expected = 1.0 / ratio
        t = timing["models"][k]
        row = {"model": case.name, "input": case.input_label, "variant": k, "cnn": case.cnn,
               "macs_ratio": ratio, "expected_speedup": expected,
               "dense_ms": {b: timing["models"]["dense"][b]["median_ms"] for b in ("b1", "b32")},
               "compressed_ms": {b: t[b]["median_ms"] for b in ("b1", "b32")},
               "speedup": {b: t[b]["speedup"] for b in ("b1", "b32")},
               "measured_over_expected": {b: t[b]["speedup"]["median"] / expected for b in ("b1", "b32")}}
        if dense_padded:
            row["padded_conv_macs_ratio"] = padded_conv_macs(models[k], case.shape, block) / dense_padded
            row["nchwc_block"] = block
        row["target_met_b32"] = (row["measured_over_expected"]["b32"] >= TARGET_FRACTION_OF_IDEAL) if case.cnn else None
        rows.append(row)
    return {"case": case.name, "dense_macs": dense_macs, "files": files,
            "repeats_per_round": timing["repeats_per_round"], "build_export_s": round(build_s, 1),
            "wall_s": round(time.perf_counter() - t0, 1), "rows": rows}


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | input | round_to | MACs ratio | expected speedup (1/ratio) | dense b1 / b32 ms | "
             "speedup b1: median [min-max] | speedup b32: median [min-max] | measured/expected b1 / b32 | "
             "target met (b32 >= 0.8x expected, CNNs) | conv MACs ratio, channels padded to the NCHWc block |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            s1, s32 = r["speedup"]["b1"], r["speedup"]["b32"]
            padded = (f"{r['padded_conv_macs_ratio']:.3f} (block {r['nchwc_block']})"
                      if "padded_conv_macs_ratio" in r else "n/a")
            met = "n/a (ViT)" if r["target_met_b32"] is None else ("**yes**" if r["target_met_b32"] else "**no**")
            lines.append(
                f"| {r['model']} | {r['input']} | {r['variant'].split('=')[1]} | {r['macs_ratio']:.3f} | "
                f"{r['expected_speedup']:.2f}x | {r['dense_ms']['b1']:.2f} / {r['dense_ms']['b32']:.1f} | "
                f"{s1['median']:.2f}x [{s1['min']:.2f}-{s1['max']:.2f}] | "
                f"{s32['median']:.2f}x [{s32['min']:.2f}-{s32['max']:.2f}] | "
                f"{r['measured_over_expected']['b1']:.2f} / {r['measured_over_expected']['b32']:.2f} | {met} | {padded} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds of ~0.5 s per batch size (default: 9 of ~3 s)")
    ap.add_argument("--smoke", action="store_true",
                    help="resnet20 only, 1 round of ~0.1 s: checks the script runs (tests), measures nothing")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--only", default=None, help="comma-separated case names: " + ",".join(c.name for c in CASES))
    ap.add_argument("--no-spin", action="store_true",
                    help="onnxruntime worker threads sleep instead of spin-waiting (see open_session)")
    ap.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("METACOMPRESS_PROGRESS", "0")
    rounds, round_s, min_repeats = (1, 0.1, 2) if args.smoke else (3, 0.5, 3) if args.quick else (9, 3.0, 5)
    only = "resnet20" if args.smoke and args.only is None else args.only
    chosen = [c for c in CASES if only is None or c.name in only.split(",")]
    load = {"start": os.getloadavg()}
    results = []
    with tempfile.TemporaryDirectory(prefix="mc-compress-latency-") as work:
        for case in chosen:
            res = run_case(case, Path(work), args, rounds, round_s, min_repeats)
            results.append(res)
            print(json.dumps({k: v for k, v in res.items() if k != "rows"} |
                             {"rows": [{k: v for k, v in r.items() if k != "speedup"} for r in res["rows"]]}),
                  file=sys.stderr)
    load["end"] = os.getloadavg()
    print(markdown_table(results))
    spin = "no spinning" if args.no_spin else "spinning: onnxruntime default"
    print(f"\nthreads {args.threads} ({spin}), rounds {rounds}, ~{round_s} s per round and batch size, "
          f"exporter {args.exporter}, load average (1/5/15 min) at start {load['start']}, at end {load['end']}")
    if args.out is not None:
        write_json(args.out, {"threads": args.threads, "spin": not args.no_spin, "rounds": rounds, "round_s": round_s,
                              "exporter": args.exporter, "loadavg": load, "results": results})


if __name__ == "__main__":
    main()
