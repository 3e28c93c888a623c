"""Prune-robust meta-training (``metacompress robustify``) vs the plain dense model.

    python benchmarks/robustify.py --model resnet20 --data digits@16 [--steps 60] [--set KEY=VALUE]
        [--repair-lr LR ...] [--quick] [--out FILE]

Three dense models of one architecture and dataset (one seed): (a) the plain dense model
robustified (uniform allocation plus perturbations, budgets 0.15-0.7 kept MACs), (b) the plain
dense model, (c) the plain dense model trained further with plain cross-entropy for as many
batches as robustify spent (forward + backward), so that a gain is not just more training. Each
is pruned (uniform allocation, L2 magnitude channels) to 0.5, 0.3 and 0.15 kept MACs and repaired
with the model itself as teacher in three regimes: BN recalibration only, 20 distillation steps,
50 steps with 10 labelled samples per class (``--full-repair``: also the default 150 steps;
``--repair-lr``: the step regimes again at other learning rates; ``--choose-rate``: the robust
model also repaired as ``compress --robustify`` repairs it). Prints test accuracies and
robustify's wall time.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from dataclasses import replace

import torch

os.environ.setdefault("METACOMPRESS_PROGRESS", "0")

from metacompress.compress.distill import RepairConfig, repair  # noqa: E402
from metacompress.compress.prune import PruningSpace  # noqa: E402
from metacompress.compress.robust import RobustConfig, robustify  # noqa: E402
from metacompress.compress.rules import rule_allocation  # noqa: E402
from metacompress.data import load_dataset  # noqa: E402
from metacompress.meta.modules import load_state  # noqa: E402
from metacompress.pipeline import load_dense  # noqa: E402
from metacompress.students import robust_repair_choice  # noqa: E402
from metacompress.training import accuracy, train_dense  # noqa: E402

BUDGETS = (0.5, 0.3, 0.15)
REGIMES = {"bn": RepairConfig(steps=0), "20 steps": RepairConfig(steps=20),
           "50 steps, 10/class": RepairConfig(steps=50, samples_per_class=10)}


def train_extra(model, data, batches: int, seed: int) -> tuple[int, int]:
    """Condition (c): ``model`` trained further in place with plain cross-entropy (Adam 1e-3,
    batches of 64) for about ``batches`` batches, in whole epochs; returns (epochs, batches)."""
    per_epoch = math.ceil(len(data.x_train) / 64)
    epochs = max(1, round(batches / per_epoch))
    train_dense(model, data, epochs=epochs, lr=1e-3, seed=seed, progress=False)
    return epochs, epochs * per_epoch


def pruned_accuracies(model, space, ratio_fn, data, seed: int, regimes: dict, choose_rate: bool = False) -> dict:
    """Test accuracy after pruning to each budget and repairing in each regime (``choose_rate``:
    step regimes as ``compress --robustify`` repairs, at two rates with the better kept on validation)."""
    out = {}
    for b in BUDGETS:
        keep = space.project(ratio_fn, b)
        for name, rc in regimes.items():
            student = space.apply(copy.deepcopy(model), keep)
            if choose_rate and rc.steps:
                load_state(student, robust_repair_choice(student, model, data, rc, seed)[1]["state_dict"])
            else:
                repair(student, model, data, rc, seed=seed, progress=False)
            out[f"{b}/{name}"] = accuracy(student, data.x_test, data.y_test)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--data", default="digits@16")
    ap.add_argument("--epochs", type=int, default=15, help="dense training epochs")
    ap.add_argument("--steps", type=int, default=60, help="robustify outer steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a few steps, for the smoke test")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--full-repair", action="store_true", help="also repair with the default 150 steps, all data")
    ap.add_argument("--repair-lr", action="append", type=float, default=[], metavar="LR",
                    help="also run the step regimes at this repair learning rate (repeatable)")
    ap.add_argument("--choose-rate", action="store_true",
                    help="also the robust model repaired as compress --robustify does: two rates, the better on validation")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a RobustConfig field (repeatable), e.g. --set inner_lr=0.05")
    args = ap.parse_args()
    overrides = {k: type(getattr(RobustConfig, k))(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    torch.set_num_threads(1)
    steps, epochs = (3, 2) if args.quick else (args.steps, args.epochs)
    data = load_dataset(args.data)
    plain = load_dense(args.model, data, None, seed=args.seed, epochs=epochs)
    space = PruningSpace(plain, data.x_train[:1], data.num_classes, 8)
    uniform = rule_allocation("uniform", space, plain, calib=None)

    robust = copy.deepcopy(plain)
    t0 = time.perf_counter()
    info = robustify(robust, data, space, [lambda b: space.project(uniform, b)], RobustConfig(steps=steps, **overrides),
                     seed=args.seed, progress=False)
    robust_s = time.perf_counter() - t0

    extra = copy.deepcopy(plain)  # (c): the same number of batches of plain training
    t0 = time.perf_counter()
    extra_epochs, extra_batches = train_extra(extra, data, info.forward_backward, seed=args.seed + 1)
    extra_s = time.perf_counter() - t0

    regimes = REGIMES | ({"150 steps": RepairConfig()} if args.full_repair else {})
    regimes |= {f"{name} lr {lr:g}": replace(rc, lr=lr) for lr in args.repair_lr
                for name, rc in list(regimes.items()) if rc.steps}
    rows = {}
    for name, model in (("robust", robust), ("plain", plain), ("plain+extra", extra)):
        rows[name] = {"dense": accuracy(model, data.x_test, data.y_test),
                      **pruned_accuracies(model, space, uniform, data, args.seed, regimes)}
    if args.choose_rate:
        rows["robust, rate on validation"] = {"dense": rows["robust"]["dense"], **pruned_accuracies(
            robust, space, uniform, data, args.seed, {k: v for k, v in regimes.items() if " lr " not in k}, True)}
    result = {"model": args.model, "data": args.data, "seed": args.seed, "dense_epochs": epochs, "overrides": overrides,
              "robustify": info.to_dict() | {"wall_s": round(robust_s, 1)},
              "extra_training": {"epochs": extra_epochs, "batches": extra_batches,
                                 "wall_s": round(extra_s, 1)},
              "test_accuracy": rows}
    print(json.dumps(result))
    keys = list(rows["plain"])
    print(f"\n{args.model} on {args.data}: robustify {steps} steps, {info.forward_backward} batches, {robust_s:.0f} s; "
          f"extra plain training {extra_batches} batches")
    print("| condition | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.3f}" if k in r else "" for k in keys) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
