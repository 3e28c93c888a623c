"""Soup of repaired students vs single students (model fusion in compression).

    python benchmarks/students_soup.py [--quick]

For each model and seed: prune the dense teacher to 0.3 kept MACs (uniform allocation), repair
K=4 students from the same pruned weights with different seeds and data orders, greedy-soup
them on the validation split. Reports test accuracy of the soup, the mean single student,
the best single student by validation (a fair pick) and by test (an upper bound).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

os.environ.setdefault("METACOMPRESS_PROGRESS", "0")

from metacompress.compress.distill import RepairConfig  # noqa: E402
from metacompress.pipeline import CompressConfig, allocate, prepare, prune_to, repair_students, soup_students  # noqa: E402
from metacompress.training import accuracy  # noqa: E402


def one(model: str, seed: int, k: int, steps: int) -> dict:
    cfg = CompressConfig(model=model, data="digits", target_macs=0.3, allocation="uniform", seed=seed,
                         repair=RepairConfig(steps=steps), train_epochs=20)
    prep = prepare(cfg)
    keep, importance, repair_cfg = allocate(cfg, prep)
    pruned = prune_to(prep, keep, importance, seed)
    students = repair_students(pruned, prep.dense, prep.data, repair_cfg, k, seed)
    soup = soup_students(pruned, students, prep.data)
    test = [s["test_accuracy"] for s in students]
    val = [s["val_accuracy"] for s in students]
    return {"soup": accuracy(pruned, prep.data.x_test, prep.data.y_test), "mean": float(np.mean(test)),
            "best_by_val": test[int(np.argmax(val))], "best_by_test": max(test), "ingredients": len(soup["ingredients"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--students", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = ["mlp"] if args.quick else ["mlp", "resnet20"]
    seeds = range(2) if args.quick else range(5)
    steps = 20 if args.quick else 60
    print(f"K={args.students} students, 0.3 kept MACs, uniform allocation, {steps} repair steps, digits; test accuracy %\n")
    print("| model | seed | soup | mean student | best student (by val) | best student (by test) | ingredients |")
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for m in models:
        rows = [one(m, s, args.students, steps) for s in seeds]
        for s, r in zip(seeds, rows):
            print(f"| {m} | {s} | {100 * r['soup']:.2f} | {100 * r['mean']:.2f} | {100 * r['best_by_val']:.2f} | "
                  f"{100 * r['best_by_test']:.2f} | {r['ingredients']} |")
        summary[m] = {k: 100 * float(np.mean([r[k] for r in rows])) for k in ("soup", "mean", "best_by_val", "best_by_test")}
    print("\n| model | soup | mean student | best (by val) | best (by test) | soup - best (by val) |")
    print("|---|---|---|---|---|---|")
    for m, v in summary.items():
        print(f"| {m} | {v['soup']:.2f} | {v['mean']:.2f} | {v['best_by_val']:.2f} | {v['best_by_test']:.2f} | "
              f"{v['soup'] - v['best_by_val']:+.2f} |")


if __name__ == "__main__":
    main()
