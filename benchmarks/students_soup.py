"""Soup of repaired students vs single students (model fusion in compression).

    python benchmarks/students_soup.py [--quick] [--seeds N] [--per-seed]

For each model and seed: prune the dense teacher to 0.3 kept MACs (uniform allocation), repair
K=4 students and greedy-soup them on the validation split, in two ways: students forked from a
shared first half of the repair (what ``--students K`` does) and students repaired independently
from the pruned weights. Reports test accuracy of the greedy soup, the mean single student, the
best single student by validation (accuracy, then loss on ties: the soup's own rule, so a
one-ingredient soup is that student up to BN recomputation), the best by test (an upper bound),
and the uniform soup of all K (BN recomputed), which shows whether the students share a basin.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

os.environ.setdefault("METACOMPRESS_PROGRESS", "0")

from metacompress.allocation import allocate  # noqa: E402
from metacompress.compress.distill import RepairConfig  # noqa: E402
from metacompress.meta.fusion import recompute_bn, uniform_soup  # noqa: E402
from metacompress.meta.fusion import state_dict_accuracy as fused_accuracy  # noqa: E402
from metacompress.meta.modules import has_batchnorm  # noqa: E402
from metacompress.pipeline import CompressConfig, prepare  # noqa: E402
from metacompress.students import prune_to, repair_one, repair_students, soup_students  # noqa: E402
from metacompress.training import accuracy  # noqa: E402

KEYS = ("soup", "mean", "best_by_val", "best_by_test", "uniform")


def scores(pruned, students, data) -> dict:
    sds = [s["state_dict"] for s in students]
    uniform = uniform_soup(sds)
    if has_batchnorm(pruned):
        uniform = recompute_bn(pruned, uniform, data.x_train)
    uniform_test = fused_accuracy(pruned, uniform, data.x_test, data.y_test)
    soup = soup_students(pruned, students, data)
    test = [s["test_accuracy"] for s in students]
    # the single student validation picks, by the soup's own rule: accuracy, then loss on ties
    pick = max(range(len(students)), key=lambda i: (students[i]["val_accuracy"], -students[i]["val_loss"]))
    return {"soup": accuracy(pruned, data.x_test, data.y_test), "mean": float(np.mean(test)),
            "best_by_val": test[pick], "best_by_test": max(test), "ingredients": len(soup["ingredients"]),
            "uniform": uniform_test}


def one(model: str, seed: int, k: int, steps: int) -> dict:
    cfg = CompressConfig(model=model, data="digits", target_macs=0.3, allocation="uniform", seed=seed,
                         repair=RepairConfig(steps=steps), train_epochs=20)
    prep = prepare(cfg)
    keep, importance, repair_cfg = allocate(cfg, prep)
    pruned = prune_to(prep, keep, importance, seed)
    forked = repair_students(pruned, prep.dense, prep.data, repair_cfg, k, seed)
    alone = [repair_one(pruned, prep.dense, prep.data, repair_cfg, seed + i) for i in range(k)]
    return {"forked": scores(pruned, forked, prep.data), "independent": scores(pruned, alone, prep.data)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--students", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--per-seed", action="store_true", help="also print every seed's row")
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = ["mlp"] if args.quick else ["mlp", "resnet20"]
    seeds = range(2) if args.quick else range(args.seeds)
    steps = 20 if args.quick else 60
    print(f"K={args.students} students, 0.3 kept MACs, uniform allocation, {steps} repair steps, digits, "
          f"seeds 0-{seeds[-1]}; test accuracy %\n")
    per_seed = ["| model | seed | students | greedy soup | mean student | best student (by val) | best student (by test) | "
                "uniform soup | ingredients |", "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for m in models:
        rows = [one(m, s, args.students, steps) for s in seeds]
        for kind in ("forked", "independent"):
            for s, r in zip(seeds, rows):
                v = r[kind]
                per_seed.append(f"| {m} | {s} | {kind} | " + " | ".join(f"{100 * v[k]:.2f}" for k in KEYS)
                                + f" | {v['ingredients']} |")
            gaps = np.array([r[kind]["soup"] - r[kind]["best_by_val"] for r in rows])
            summary[(m, kind)] = {k: 100 * float(np.mean([r[kind][k] for r in rows])) for k in KEYS} | {
                "wtl": f"{(gaps > 1e-9).sum()}/{(np.abs(gaps) <= 1e-9).sum()}/{(gaps < -1e-9).sum()}",
                "ingredients": float(np.mean([r[kind]["ingredients"] for r in rows]))}
    print("| model | students | greedy soup | mean student | best (by val) | best (by test) | uniform soup | "
          "greedy soup - best (by val) | greedy soup vs best (by val): wins/ties/losses | mean ingredients |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (m, kind), v in summary.items():
        print(f"| {m} | {kind} | " + " | ".join(f"{v[k]:.2f}" for k in KEYS)
              + f" | {v['soup'] - v['best_by_val']:+.2f} | {v['wtl']} | {v['ingredients']:.1f} |")
    if args.per_seed:
        print("\n" + "\n".join(per_seed))


if __name__ == "__main__":
    main()
