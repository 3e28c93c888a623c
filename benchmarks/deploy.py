"""Deployment benchmark: dense vs compressed (0.5 MACs) vs compressed + int8 in onnxruntime.

For each model: build it (seeded random weights: latency does not depend on weight values),
prune a copy to 0.5 of the dense MACs with the toolkit's exact-budget executor
(``PruningSpace``, uniform allocation, channels rounded to 8), export both with the dynamo
exporter + onnxslim, check ONNX-vs-PyTorch parity, quantize the compressed model to static QDQ
int8 (calibrated on 64 random inputs: a latency/size measurement, not an accuracy one), then
time all three interleaved (round-robin per repeat) on ``--threads`` onnxruntime threads.

    .venv/bin/python benchmarks/deploy.py [--quick] [--threads 2] [--out benchmarks/deploy.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from metacompress.compress.measure import count_macs
from metacompress.compress.prune import PruningSpace
from metacompress.compress.rules import rule_allocation
from metacompress.deploy import export_onnx, verify_onnx
from metacompress.deploy.bench import benchmark_latency, speedups
from metacompress.deploy.quantize import quantize_onnx
from metacompress.deploy.simplify import simplify_onnx
from metacompress.io import write_json
from metacompress.zoo import build_model

# (name, zoo spec, sample shape, classes, build kwargs): vit-tiny is ViT-Ti/16 (dim 192, 12 blocks,
# 3 heads, 14x14 patches of 16 px), built from the zoo's ViT with those settings.
CASES = [
    ("resnet18", "torchvision:resnet18", (3, 224, 224), 1000, {}),
    ("mobilenet_v2", "torchvision:mobilenet_v2", (3, 224, 224), 1000, {}),
    ("vit-tiny", "vit-tiny", (3, 224, 224), 1000, {"dim": 192, "depth": 12, "num_heads": 3, "mlp_ratio": 4.0, "grid": 14}),
]
TARGET = 0.5


def compress(model: torch.nn.Module, example: torch.Tensor, num_classes: int) -> torch.nn.Module:
    """Prune ``model`` in place to TARGET of its MACs with a uniform allocation (exact budget)."""
    space = PruningSpace(model, example, num_classes, round_to=8)
    keep = space.project(rule_allocation("uniform", space, model, calib=None), TARGET)
    return space.apply(model, keep)


def run_case(name: str, spec: str, shape: tuple, classes: int, kwargs: dict, work: Path,
             threads: int, repeats: int) -> dict:
    torch.manual_seed(0)
    dense = build_model(spec, shape, classes, **kwargs).eval()
    example = torch.randn(2, *shape)
    pruned = build_model(spec, shape, classes, **kwargs).eval()
    pruned.load_state_dict(dense.state_dict())
    pruned = compress(pruned, example[:1], classes).eval()
    macs = count_macs(pruned, example[:1]) / count_macs(dense, example[:1])
    paths = {k: work / f"{name}.{k}.onnx" for k in ("dense", "compressed", "compressed_int8")}
    check = {}
    for key, model in (("dense", dense), ("compressed", pruned)):
        t = time.perf_counter()
        export_onnx(model, example, paths[key])
        simplify_onnx(paths[key], paths[key])
        r = verify_onnx(paths[key], model, torch.randn(8, *shape), None, threads=threads)
        check[key] = {"max_abs_diff": r["max_abs_diff"], "bytes": r["bytes"],
                      "export_s": round(time.perf_counter() - t, 2)}
    q = quantize_onnx(paths["compressed"], paths["compressed_int8"], "static", torch.randn(64, *shape).numpy())
    r = verify_onnx(paths["compressed_int8"], pruned, torch.randn(8, *shape), None, threads=threads)
    check["compressed_int8"] = {"max_abs_diff": r["max_abs_diff"], "top1_agreement_random_inputs": r["top1_agreement"],
                                "bytes": q["bytes"]}
    lat = benchmark_latency({k: str(p) for k, p in paths.items()}, shape, batches=(1, 32), threads=threads,
                            repeats=repeats, warmup=2)
    return {"model": name, "spec": spec, "input_shape": list(shape), "macs_ratio": macs, "files": check,
            "latency": lat, "speedup_vs_dense": speedups(lat, "dense")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 repeats instead of 10")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated case names")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    repeats = 3 if args.quick else 10
    chosen = [c for c in CASES if args.only is None or c[0] in args.only.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="mc-deploy-bench-") as work:
        for case in chosen:
            t = time.perf_counter()
            res = run_case(*case, Path(work), args.threads, repeats)
            res["wall_s"] = round(time.perf_counter() - t, 1)
            results.append(res)
            print(json.dumps(res), file=sys.stderr)
    print("| model | MACs kept | dense b1 / b32 ms | compressed b1 / b32 ms (speedup) | "
          "int8 b1 / b32 ms (speedup) | sizes dense / comp / int8 MB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        lat, sp, f = r["latency"], r["speedup_vs_dense"], r["files"]

        def ms(k: str, lat: dict = lat) -> str:
            return f"{lat[k]['b1']['median_ms']:.1f} / {lat[k]['b32']['median_ms']:.0f}"

        def x(k: str, sp: dict = sp) -> str:
            return f"{sp[k]['b1']:.2f}x / {sp[k]['b32']:.2f}x"

        print(f"| {r['model']} | {r['macs_ratio']:.3f} | {ms('dense')} | {ms('compressed')} ({x('compressed')}) | "
              f"{ms('compressed_int8')} ({x('compressed_int8')}) | "
              f"{f['dense']['bytes'] / 1e6:.1f} / {f['compressed']['bytes'] / 1e6:.1f} / "
              f"{f['compressed_int8']['bytes'] / 1e6:.1f} |")
    if args.out is not None:
        write_json(args.out, {"threads": args.threads, "repeats": repeats, "results": results})


if __name__ == "__main__":
    main()
