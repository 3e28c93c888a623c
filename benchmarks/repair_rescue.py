"""Does a rising training loss tell when the default repair rate is too high for a model?

    python benchmarks/repair_rescue.py [--models vit-tiny,resnet20,...] [--data digits@16] [--targets 0.3,0.5]

For each zoo model (dense teacher trained with the CLI's defaults) and kept-MACs target: prune
with the uniform rule, repair 20 and 150 steps at the default rate and at GENTLE_LR_FACTOR of it,
and print validation and test accuracy, whether the default-rate repair's loss rose
(``distill.loss_rose``) and which rate ``students.rescued_repair`` (what ``compress`` runs when
neither the guard nor the user sets the rate) keeps.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

os.environ.setdefault("METACOMPRESS_PROGRESS", "0")

from metacompress.compress.distill import RepairConfig  # noqa: E402
from metacompress.compress.rules import rule_allocation  # noqa: E402
from metacompress.pipeline import CompressConfig, Prepared, Timer, prepare  # noqa: E402
from metacompress.students import GENTLE_LR_FACTOR, prune_to, repair_one, rescued_repair  # noqa: E402


def row(prep: Prepared, spec: str, target: float, steps: int, seed: int = 0) -> str:
    keep = prep.space.project(rule_allocation("uniform", prep.space, prep.dense, None), target)
    pruned = prune_to(prep, keep, "magnitude", seed)
    default = replace(RepairConfig(), steps=steps)
    gentle = replace(default, lr=default.lr * GENTLE_LR_FACTOR)
    at = {c.lr: repair_one(pruned, prep.dense, prep.data, c, seed) for c in (default, gentle)}
    kept_cfg, kept, _ = rescued_repair(pruned, prep.dense, prep.data, default, seed)
    cells = " | ".join(f"{at[lr]['val_accuracy']:.4f} / {at[lr]['test_accuracy']:.4f}" for lr in (default.lr, gentle.lr))
    rose = "yes" if at[default.lr]["loss_rose"] else "no"
    gain = at[kept_cfg.lr]["test_accuracy"] - at[default.lr]["test_accuracy"]
    return f"| {spec} | {target} | {steps} | {cells} | {rose} | {kept_cfg.lr:g} | {gain * 100:+.2f} |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vit-tiny,resnet20,vgg-small,mobilenet-small,mlp")
    ap.add_argument("--data", default="digits@16")
    ap.add_argument("--targets", default="0.3,0.5")
    ap.add_argument("--steps", default="20,150")
    args = ap.parse_args()
    lr = RepairConfig().lr
    print(f"| model | kept MACs | steps | lr {lr:g}: val / test | lr {lr * GENTLE_LR_FACTOR:g}: val / test | "
          "loss rose at the default | kept lr | test gain of the kept, points |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for spec in args.models.split(","):
        prep = prepare(CompressConfig(model=spec, data=args.data, target_macs=0.5), Timer())
        for target in map(float, args.targets.split(",")):
            for steps in map(int, args.steps.split(",")):
                print(row(prep, spec, target, steps), flush=True)


if __name__ == "__main__":
    main()
