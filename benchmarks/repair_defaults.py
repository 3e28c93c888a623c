"""Choose the toolkit's default repair settings: the single (lr, temperature, alpha) that is
best on average over the policy's meta-training tasks (uniform allocation, validation split).

    python benchmarks/repair_defaults.py [--quick] [--workers 2]

The built-in allocations are compared with these defaults, so they must not be a strawman:
this sweep is what makes them the strongest single setting, and the policy has to beat that.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
from dataclasses import replace

import numpy as np
import torch
import yaml

os.environ.setdefault("METACOMPRESS_PROGRESS", "0")

from metacompress.compress.distill import RepairConfig  # noqa: E402
from metacompress.policy.tasks import CompressionTask, TaskPool, regime_config, teachers_from  # noqa: E402

_POOL = None


def _init():
    global _POOL
    torch.set_num_threads(1)
    _POOL = TaskPool()


def _job(args):
    task, lr, t, a = args
    cfg = replace(regime_config(task.regime), lr=lr, temperature=t, alpha=a)
    return _POOL.rule(task, "uniform", cfg)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/policy-default.yaml")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    teachers = teachers_from(yaml.safe_load(open(args.recipe))["teachers"])
    budgets = (0.15, 0.4) if not args.quick else (0.3,)
    regimes = ("short", "few", "generous") if not args.quick else ("short",)
    if args.quick:
        teachers = teachers[:2]
    grid = list(itertools.product((1e-3, 3e-3, 1e-2, 3e-2), (1.0, 2.0, 4.0), (0.5, 0.9)))
    tasks = [CompressionTask(t, b, r, 0) for t in teachers for b in budgets for r in regimes]
    jobs = [(task, *g) for g in grid for task in tasks]
    with mp.get_context("fork").Pool(args.workers, _init) as pool:
        acc = np.array(pool.map(_job, jobs, chunksize=4)).reshape(len(grid), len(tasks))
    by_regime = {r: [i for i, t in enumerate(tasks) if t.regime == r] for r in regimes}
    order = np.argsort(-acc.mean(1))
    print(f"{len(tasks)} tasks ({len(teachers)} teachers x budgets {budgets} x regimes {regimes}), "
          f"{len(grid)} settings; mean validation accuracy %\n")
    print("| lr | T | alpha | mean | " + " | ".join(regimes) + " |")
    print("|---|---|---|---|" + "---|" * len(regimes))
    for i in order[:8]:
        lr, t, a = grid[i]
        cols = " | ".join(f"{100 * acc[i, idx].mean():.2f}" for idx in by_regime.values())
        print(f"| {lr:g} | {t:g} | {a:g} | **{100 * acc[i].mean():.2f}** | {cols} |")
    current = RepairConfig()
    cur = grid.index((current.lr, current.temperature, current.alpha)) if (
        current.lr, current.temperature, current.alpha) in grid else None
    if cur is not None:
        print(f"\ncurrent defaults (lr {current.lr:g}, T {current.temperature:g}, alpha {current.alpha:g}): "
              f"rank {int(np.where(order == cur)[0][0]) + 1} of {len(grid)}, mean {100 * acc[cur].mean():.2f}")
    worst = order[-1]
    print(f"worst setting {grid[worst]}: mean {100 * acc[worst].mean():.2f}")


if __name__ == "__main__":
    main()
