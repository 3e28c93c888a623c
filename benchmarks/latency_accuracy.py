"""Accuracy at equal measured latency: a latency budget against a MACs budget tuned to the same
measured latency.

A MACs budget that happens to give the same speed is the fair baseline for a latency budget: it
is what a user of a MACs-only toolkit would get by trying MACs fractions until the model is fast
enough. For each model, latency target and repair regime (and seed):

1. ``compress --target-latency F`` (the allocation given by ``--allocation``, seeded) gives an
   accuracy and a measured latency fraction L (interleaved, batch 1, 2 threads);
2. the MACs fraction M whose allocation measures L (within 3 %) is searched from the MACs
   fraction the latency budget kept (each step prunes, exports and times the architecture
   against the dense model);
3. ``compress --target-macs M`` with the same allocation, repair and seed gives the accuracy to
   compare with.

Dense teachers are trained once per model (30 epochs, seed 0) and shared by every run.

    python benchmarks/latency_accuracy.py [--models resnet20,vgg-small,mobilenet-small] [--data digits@32]
        [--targets 0.5,0.3] [--regimes bn,short,generous] [--seeds 0,1,2] [--allocation meta]
        [--teachers DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from metacompress.allocation import allocate
from metacompress.budget import Budget, LatencyTarget
from metacompress.compress.distill import RepairConfig
from metacompress.deploy.runtime import default_threads
from metacompress.io import save_torch
from metacompress.pipeline import CompressConfig, load_dense, prepare, run_compress
from metacompress.policy import features

POLICY_INPUTS = features.policy_inputs
REGIMES = {"bn": RepairConfig(steps=0), "short": RepairConfig(steps=20), "generous": RepairConfig(steps=150)}
THREADS = 2


def teacher(spec: str, data_spec: str, folder: Path) -> str:
    from metacompress.data import load_dataset

    path = folder / f"{spec}-{data_spec.replace(':', '_').replace('/', '_')}.pt"
    if not path.exists():
        save_torch(load_dense(spec, load_dataset(data_spec), None, seed=0, epochs=30).state_dict(), path)
    return str(path)


def config(spec, data, weights, regime, seed, out, allocation, **budget) -> CompressConfig:
    return CompressConfig(model=spec, data=data, weights=weights, allocation=allocation, guard=False,
                          repair=copy.deepcopy(REGIMES[regime]), seed=seed, out=str(out), threads=THREADS,
                          latency_seconds=4.0, **budget)


def measured_fraction_of_macs(cfg: CompressConfig, prep, macs: float, meter: LatencyTarget) -> float:
    """Measured latency fraction of the allocation ``cfg`` makes at ``macs`` kept MACs."""
    cfg.target_macs = macs
    prep.budget = Budget("macs", macs, "macs")
    keep, _, _ = allocate(cfg, prep)
    return meter.measure(keep)


def equal_latency_macs(cfg: CompressConfig, goal: float, meter: LatencyTarget, start: float,
                       steps: int = 6) -> tuple[float, float]:
    """The kept MACs fraction whose allocation measures ``goal`` (within 3 %): secant steps on the
    measured latency from ``start`` (the MACs fraction the latency budget kept: usually close),
    bisection once the goal is bracketed."""
    prep = prepare(cfg)
    features.policy_inputs = once_per_model(POLICY_INPUTS)  # the same model and seed at every step
    points: list[tuple[float, float]] = []
    macs = start
    try:
        for _ in range(steps):
            points.append((macs, measured_fraction_of_macs(cfg, prep, macs, meter)))
            if abs(points[-1][1] / goal - 1) <= 0.03:
                break
            macs = next_guess(points, goal)
    finally:
        features.policy_inputs = POLICY_INPUTS
    return min(points, key=lambda p: abs(p[1] - goal))


def once_per_model(fn):
    """``fn(model, ...)`` computed once per model object."""
    memo: dict[int, object] = {}

    def wrapped(model, *args, **kwargs):
        if id(model) not in memo:
            memo[id(model)] = fn(model, *args, **kwargs)
        return memo[id(model)]

    return wrapped


def next_guess(points: list[tuple[float, float]], goal: float) -> float:
    """The next MACs fraction to try: bisection inside the tightest bracket around ``goal``, else a
    step along the line through the origin and the closest point (latency grows with MACs)."""
    below = [p for p in points if p[1] < goal]
    above = [p for p in points if p[1] >= goal]
    if below and above:
        return (max(below)[0] + min(above)[0]) / 2
    m, lat = min(points, key=lambda p: abs(p[1] - goal))
    return float(np.clip(m * (goal / lat) ** 2, 0.02, 1.0))


def run_cell(spec, data, weights, target, regime, seed, allocation, work: Path) -> dict:
    t0 = time.perf_counter()
    lat_cfg = config(spec, data, weights, regime, seed, work / "lat", allocation, target_latency=target)
    lat = run_compress(lat_cfg)
    measured = lat["latency"]["measured_fraction"]["b1"]
    macs_cfg = config(spec, data, weights, regime, seed, work / "macs", allocation, target_macs=0.5)
    prep = prepare(config(spec, data, weights, regime, seed, work / "x", allocation, target_latency=target))
    meter = prep.budget.latency
    try:
        macs, matched = equal_latency_macs(macs_cfg, measured, meter, lat["achieved_macs_ratio"])
    finally:
        meter.close()
    macs_cfg.target_macs = macs
    mac = run_compress(macs_cfg)
    return {"model": spec, "target": target, "regime": regime, "seed": seed,
            "latency_acc": lat["compressed"]["accuracy"], "latency_measured": measured,
            "latency_macs": lat["achieved_macs_ratio"], "macs_target": round(macs, 4),
            "macs_measured_in_bisection": round(matched, 4), "macs_acc": mac["compressed"]["accuracy"],
            "macs_measured": mac["latency"]["measured_fraction"]["b1"] if "latency" in mac else
            round(mac["compressed"]["latency_ms"]["b1"] / mac["dense"]["latency_ms"]["b1"], 4),
            "seconds": round(time.perf_counter() - t0, 1)}


def print_table(rows: list[dict]) -> None:
    print("| model | target | regime | seeds | latency budget: acc (measured L) | MACs budget at equal L: acc (MACs, "
          "measured L) | difference (points) |")
    print("|---|---|---|---|---|---|---|")
    keys = sorted({(r["model"], r["target"], r["regime"]) for r in rows}, key=lambda k: (k[0], -k[1], k[2]))
    for k in keys:
        rs = [r for r in rows if (r["model"], r["target"], r["regime"]) == k]
        la, ma = np.mean([r["latency_acc"] for r in rs]), np.mean([r["macs_acc"] for r in rs])
        print(f"| {k[0]} | {k[1]} | {k[2]} | {len(rs)} | {la:.2%} ({np.mean([r['latency_measured'] for r in rs]):.3f}) | "
              f"{ma:.2%} ({np.mean([r['macs_target'] for r in rs]):.3f}, {np.mean([r['macs_measured'] for r in rs]):.3f}) "
              f"| {100 * (la - ma):+.2f} |")
    short = [r for r in rows if r["regime"] in ("bn", "short")]
    if short:
        diff = 100 * np.mean([r["latency_acc"] - r["macs_acc"] for r in short])
        print(f"\nShort regimes (BN-only and 20 steps), mean difference: {diff:+.2f} points over {len(short)} runs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20,vgg-small,mobilenet-small")
    ap.add_argument("--data", default="digits@32")
    ap.add_argument("--targets", default="0.5,0.3")
    ap.add_argument("--regimes", default="bn,short,generous")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--allocation", default="meta")
    ap.add_argument("--json", default=None)
    ap.add_argument("--teachers", default=None, help="folder that keeps the dense teachers between runs")
    args = ap.parse_args()
    os.environ.setdefault("METACOMPRESS_PROGRESS", "0")
    torch.set_num_threads(min(THREADS, default_threads()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teachers = Path(args.teachers) if args.teachers else work
        teachers.mkdir(parents=True, exist_ok=True)
        weights = {spec: teacher(spec, args.data, teachers) for spec in args.models.split(",")}
        for seed in (int(s) for s in args.seeds.split(",")):  # whole seeds first: a cut run still covers every cell
            for spec in weights:
                for target in (float(t) for t in args.targets.split(",")):
                    for regime in args.regimes.split(","):
                        rows.append(run_cell(spec, args.data, weights[spec], target, regime, seed, args.allocation,
                                             work))
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
