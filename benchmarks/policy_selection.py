"""Score policies on a meta-training recipe's selection tasks: the comparison that decides which
policy ships (BENCHMARKS.md, "A broader meta-training distribution").

    python benchmarks/policy_selection.py --recipe benchmarks/recipes/policy-v3.yaml \\
        --policies metacompress/policy/default,out/policy-v3-stage2 [--unfolded] [--workers 2]

Each policy is scored as ``meta_train`` scores its iterates: mean validation reward (points over
uniform with the default repair) on every teacher x selection budget x regime, on the recipe's
selection task seed. The recipe's teachers must be trained already (``metacompress policy
train`` caches them). ``--unfolded`` adds the first policy scored without folding the kinds it
has not seen onto those it has (``TaskPool(kinds_seen=None)``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time

import numpy as np
import torch

os.environ.setdefault("METACOMPRESS_PROGRESS", "0")

from metacompress.policy.meta_train import MetaTrainConfig, selection_tasks  # noqa: E402
from metacompress.policy.store import load_policy  # noqa: E402
from metacompress.policy.tasks import CompressionTaskSampler, TaskPool, teachers_from  # noqa: E402
from metacompress.recipes import load_recipe  # noqa: E402

_STATE: dict = {}


def _tasks(recipe: str) -> list:
    cfg = MetaTrainConfig.from_dict(load_recipe(recipe))
    teachers = teachers_from(cfg.teachers)
    seed = CompressionTaskSampler(teachers, budgets=cfg.budgets, regime_weights=cfg.regime_weights).task_seeds
    return selection_tasks(teachers, cfg.select_budgets, seed)


def _init(recipe: str, policies: list[str]) -> None:
    torch.set_num_threads(1)
    _STATE.update(tasks=_tasks(recipe), policies={p: load_policy(p) for p in policies}, pools={})


def _reward(job: tuple[str, bool, int]) -> float:
    path, folded, i = job
    pol = _STATE["policies"][path]
    if (path, folded) not in _STATE["pools"]:
        _STATE["pools"][path, folded] = TaskPool(pol.defaults, pol.kinds_seen if folded else None, score_test=False)
    pool, task = _STATE["pools"][path, folded], _STATE["tasks"][i]
    return pool.policy(pol.theta, task).val - pool.baseline(task).val


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--policies", required=True, help="comma-separated policy folders")
    ap.add_argument("--unfolded", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    policies = args.policies.split(",")
    n = len(_tasks(args.recipe))
    variants = [(p, True) for p in policies] + ([(policies[0], False)] if args.unfolded else [])
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers, initializer=_init, initargs=(args.recipe, policies)) as pool:
        rewards = pool.map(_reward, [(p, f, i) for p, f in variants for i in range(n)], chunksize=1)
    for k, (p, folded) in enumerate(variants):
        r = np.array(rewards[k * n:(k + 1) * n])
        print(json.dumps({"policy": p, "kinds_folded": folded, "tasks": n, "reward_points": round(100 * float(r.mean()), 3)}))
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
