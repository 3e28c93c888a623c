"""Latency budgets, measured: is a model compressed to ``--target-latency F`` as fast as asked, and
how good is the latency model behind it?

For each model (resnet20 on digits@32; torchvision resnet18 and mobilenet_v2 and ViT-Ti/16 at
3x224x224; random weights: latency does not depend on weight values):

1. the latency model is built (batch 1 and 32, 2 threads) into an empty cache and read back
   from it: build time, cache time, leave-one-out error;
2. its predictions are checked on 20 fresh random allocations on the grid, exported and timed
   against the dense model (interleaved): median and max absolute relative error per batch;
3. ``metacompress compress MODEL --weights none --allocation uniform --repair-steps 0
   --target-latency F --latency-batch B --threads 2`` runs for F in 0.5, 0.3 and B in 1, 32;
   the report's final interleaved measurement (model.onnx against the dense export) is
   compared with the target, or with the measured floor where the report warns of one.

    python benchmarks/latency_budget.py [--only resnet20,resnet18] [--targets 0.5,0.3] [--batches 1,32]

Prints markdown tables (BENCHMARKS.md) and writes the raw rows to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from metacompress.compress.distill import RepairConfig
from metacompress.compress.prune import PruningSpace
from metacompress.deploy.latency import build_latency_model, export_variants, sample_allocations, time_variants
from metacompress.deploy.runtime import channel_block
from metacompress.pipeline import CompressConfig, run_compress
from metacompress.zoo import build_model

HERE = Path(__file__).resolve().parent
VIT_TI16 = f"{HERE / 'models.py'}:vit_ti16"
CASES = {  # name: (model spec, data spec, input shape, classes)
    "resnet20": ("resnet20", "digits@32", (1, 32, 32), 10),
    "resnet18": ("torchvision:resnet18", "synthetic:3x224x224:n=140", (3, 224, 224), 10),
    "mobilenet_v2": ("torchvision:mobilenet_v2", "synthetic:3x224x224:n=140", (3, 224, 224), 10),
    "vit-ti16": (VIT_TI16, "synthetic:3x224x224:n=140", (3, 224, 224), 10),
}
TOL = 0.07
THREADS = 2


def dense_model(spec: str, shape, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(spec, shape, classes).eval()


def latency_model_rows(name: str, threads: int) -> dict:
    """Build, re-read and check the latency model of one case."""
    spec, _, shape, classes = CASES[name]
    model = dense_model(spec, shape, classes)
    space = PruningSpace(model, torch.randn(1, *shape), classes, channel_block())
    t0 = time.perf_counter()
    lm = build_latency_model(model, space, shape, batch=1, batches=(1, 32), threads=threads)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = build_latency_model(model, space, shape, batch=1, batches=(1, 32), threads=threads)
    cached_s = time.perf_counter() - t0
    allocations = sample_allocations(space, 24, seed=101)[4:]      # random ones only, unseen by the fit
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_variants(model, space, allocations, Path(tmp))
        measured = time_variants(paths, shape, (1, 32), threads, "cpu")
    row = {"model": name, "groups": len(space.groups), "build_s": round(build_s, 1), "cached_s": round(cached_s, 3),
           "cached": again.source == "cached", "floor": {}}
    for b in (1, 32):
        pred = np.array([lm.predict_fraction(k, b) for k in allocations])
        true = np.array(measured.ratios[b][1:])
        err = np.abs(pred - true) / true
        row[f"b{b}"] = {"dense_ms": round(lm.dense_ms(b), 3), "loo": round(lm.fits[b].loo_error, 4),
                        "median_err": round(float(np.median(err)), 4), "max_err": round(float(err.max()), 4),
                        "range": [round(float(true.min()), 3), round(float(true.max()), 3)]}
        row["floor"][f"b{b}"] = round(lm.predict_fraction(space.floor_keep(), b), 3)
    return row


def budget_row(name: str, target: float, batch: int, threads: int, out: Path) -> dict:
    """One compress run to a latency target; the verdict on its final measurement."""
    spec, data, _, _ = CASES[name]
    cfg = CompressConfig(model=spec, data=data, weights="none", target_latency=target, latency_batch=batch,
                         threads=threads, allocation="uniform", repair=RepairConfig(steps=0, bn_samples=64),
                         out=str(out), latency_seconds=6.0)
    t0 = time.perf_counter()
    report = run_compress(cfg)
    lat = report["latency"]
    measured = lat["measured_fraction"][f"b{batch}"]
    floor = next((float(m.group(1)) for w in report.get("warnings", [])
                  if (m := re.search(r"the floor .* measures ([0-9.]+)", w))), None)
    goal = floor if floor is not None else target
    return {"model": name, "target": target, "batch": batch, "measured": measured,
            "predicted": lat["predicted_fraction"][f"b{batch}"], "floor": floor,
            "rounds": len(lat["correction_rounds"][0]), "speedup": report["speedup"][f"b{batch}"],
            "macs_ratio": report["achieved_macs_ratio"], "ok": abs(measured / goal - 1) <= TOL,
            "seconds": round(time.perf_counter() - t0, 1)}


def print_tables(lm_rows: list[dict], budget_rows: list[dict]) -> None:
    if lm_rows:
        print("| model | groups | build (s) | from cache (s) | batch | dense ms | leave-one-out | median error (20 unseen) "
              "| max error | measured range | predicted floor |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in lm_rows:
            for b in ("b1", "b32"):
                x = r[b]
                print(f"| {r['model']} | {r['groups']} | {r['build_s']} | {r['cached_s']} | {b} | {x['dense_ms']} | "
                      f"{x['loo']:.1%} | **{x['median_err']:.1%}** | {x['max_err']:.1%} | "
                      f"{x['range'][0]}-{x['range'][1]} | {r['floor'][b]} |")
    if budget_rows:
        print("\n| model | target | batch | measured ratio | predicted | floor (measured) | speedup | MACs ratio "
              "| rounds | within 7 % | s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in budget_rows:
            floor = f"{r['floor']:.3f}" if r["floor"] is not None else ""
            print(f"| {r['model']} | {r['target']} | {r['batch']} | **{r['measured']:.3f}** | {r['predicted']:.3f} | "
                  f"{floor} | {r['speedup']:.2f}x | {r['macs_ratio']:.3f} | {r['rounds']} | "
                  f"{'yes' if r['ok'] else '**no**'} | {r['seconds']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(CASES))
    ap.add_argument("--targets", default="0.5,0.3", help="'' for the latency model check alone")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--skip-model-check", action="store_true", help="only the compress runs")
    ap.add_argument("--json", default=None, help="write the raw rows here")
    args = ap.parse_args()
    os.environ.setdefault("METACOMPRESS_PROGRESS", "0")
    os.environ["METACOMPRESS_CACHE"] = tempfile.mkdtemp(prefix="mc-latency-bench-")  # the first build is timed
    torch.set_num_threads(args.threads)
    lm_rows, budget_rows = [], []
    with tempfile.TemporaryDirectory() as work:
        for name in args.only.split(","):
            if not args.skip_model_check:
                lm_rows.append(latency_model_rows(name, args.threads))
                print(json.dumps(lm_rows[-1]), file=sys.stderr, flush=True)
            for target in (float(t) for t in args.targets.split(",") if t):
                for batch in (int(b) for b in args.batches.split(",")):
                    budget_rows.append(budget_row(name, target, batch, args.threads, Path(work) / "o"))
                    print(json.dumps(budget_rows[-1]), file=sys.stderr, flush=True)
    print_tables(lm_rows, budget_rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"latency_model": lm_rows, "budgets": budget_rows}, indent=1))


if __name__ == "__main__":
    main()
