"""The meta-learned policy against the built-in allocations on held-out tasks, in one run.

    python benchmarks/policy_vs_baselines.py [--quick] [--no-search] [--policy DIR] [--out FILE.md] [--timing-only]

Held-out tasks come from recipes/policy-eval.yaml (architecture families and a dataset variant
never used in meta-training). Columns: meta (zero-shot), meta-alloc (its allocation with the
default repair), the four built-ins with the default repair, the per-task oracle among them
(chosen on validation), and a per-task ES search with 64 evaluations (a subset of tasks).
Also times the allocation stage of ``compress`` (pruning space, features, the rules' allocations
the policy mixes, policy, budget projection).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

os.environ.setdefault("METACOMPRESS_PROGRESS", "0")

from metacompress.allocation import allocate  # noqa: E402
from metacompress.budget import Budget  # noqa: E402
from metacompress.compress.distill import RepairConfig  # noqa: E402
from metacompress.compress.prune import PruningSpace  # noqa: E402
from metacompress.data import load_dataset  # noqa: E402
from metacompress.pipeline import CompressConfig, Prepared  # noqa: E402
from metacompress.policy.evaluate import EvalConfig, evaluate, markdown, summarise  # noqa: E402
from metacompress.policy.store import load_policy  # noqa: E402
from metacompress.recipes import load_recipe  # noqa: E402
from metacompress.zoo import build_model  # noqa: E402


def allocation_seconds(spec: str, data_spec: str, policy: str | None, repeats: int = 3) -> float:
    """Median wall time of the whole allocation stage of ``compress`` (pruning space, features,
    the rules' allocations the policy mixes, policy, budget projection), at 0.5 kept MACs."""
    data = load_dataset(data_spec)
    model = build_model(spec, data.input_shape, data.num_classes, data.mean, data.std).eval()
    cfg = CompressConfig(model=spec, data=data_spec, target_macs=0.5, policy=policy, repair=RepairConfig(steps=20))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        prep = Prepared(data, model, PruningSpace(model, data.x_train[:1], data.num_classes), float("nan"),
                        Budget("macs", 0.5, "macs"))
        allocate(cfg, prep)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


TIMING_LABEL = "Allocation time (the whole allocation stage of compress, 2 threads, median, s)"


def allocation_times(policy: str | None, large: bool) -> dict[str, float | str]:
    """Allocation stage times: resnet20 on digits, and (``large``) torchvision resnet18 at 224."""
    torch.set_num_threads(2)
    timing: dict[str, float | str] = {"resnet20@digits": allocation_seconds("resnet20", "digits", policy)}
    if large:
        try:
            timing["torchvision:resnet18@224"] = allocation_seconds(
                "torchvision:resnet18", "synthetic:3x224x224:n=200", policy, repeats=3)
        except ImportError as exc:  # torchvision is an optional extra
            timing["torchvision:resnet18@224"] = f"skipped ({exc})"
    return timing


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="recipes/policy-eval.yaml")
    ap.add_argument("--policy", default=None)
    ap.add_argument("--quick", action="store_true", help="1 seed, no ES search, two budgets")
    ap.add_argument("--no-search", action="store_true", help="no per-task ES search column (about a third of the time)")
    ap.add_argument("--smoke", action="store_true", help="one held-out teacher, one task: checks the script runs")
    ap.add_argument("--out", default=None, help="write the markdown section here")
    ap.add_argument("--rows", default=None, help="write every row as JSON here")
    ap.add_argument("--timing-only", action="store_true", help="only time the allocation stage")
    args = ap.parse_args()
    if args.timing_only:
        print(f"{TIMING_LABEL}: {json.dumps(allocation_times(args.policy, large=True))}")
        return
    torch.set_num_threads(1)
    pol = load_policy(args.policy)
    d = load_recipe(args.config)
    if args.quick or args.smoke:
        d.update(seeds=1, es_search_evals=0, budgets=[0.3, 0.15])
    if args.no_search:
        d.update(es_search_evals=0)
    if args.smoke:
        first = d["teachers"][0]
        d.update(teachers=[{**first, "data": "digits"}], budgets=[0.3], regimes=["short"], workers=1,
                 es_search_evals=8, es_search_budgets=[0.3], es_search_regimes=["short"])
    cfg = EvalConfig.from_dict(d)
    cfg.repair_defaults = pol.defaults.to_dict()
    t0 = time.perf_counter()
    rows = evaluate(cfg, pol.theta, pol.kinds_seen)
    wall = time.perf_counter() - t0
    summary = summarise(rows)
    timing = allocation_times(args.policy, large=not args.smoke)
    hist = pol.provenance.get("history", [])
    per_teacher: dict[str, dict[str, list[float]]] = {}
    teacher_cols = ["meta", "meta+guard", "meta+uniform-guard", "meta-alloc", summary["best_single_rule"], "uniform", "oracle"]
    teacher_cols = list(dict.fromkeys(teacher_cols))  # the best rule may be uniform
    for r in rows:
        if r["regime"] == "generous":
            continue
        cell = per_teacher.setdefault(r["teacher"], {c: [] for c in teacher_cols})
        for k in cell:
            cell[k].append(r["test"][k])
    lines = [
        f"Command: `python benchmarks/policy_vs_baselines.py{' --quick' if args.quick else ''}"
        f"{' --no-search' if args.no_search else ''}{f' --policy {args.policy}' if args.policy else ''}` "
        f"({len(rows)} task runs, {wall / 60:.1f} min on 2 workers). Policy: "
        f"{pol.provenance.get('iterations', '?')} ES iterations over {len(pol.provenance.get('teachers', []))} "
        f"teachers ({hist[-1]['seconds'] / 60 if hist else float('nan'):.1f} min of meta-training)"
        + (f", warm-started from a policy of {init['iterations']} iterations." if (init := pol.provenance.get(
            "init_provenance")) else "."),
        "",
        "Mean test accuracy (%) per repair regime, averaged over held-out teachers, budgets and seeds:",
        "",
        markdown(summary),
        "",
        "Short regimes = BN recalibration only, 20 steps, 10 labels/class x 50 steps. Per held-out teacher "
        "(short regimes, mean test accuracy %):",
        "",
        "| teacher | " + " | ".join(teacher_cols) + " |",
        "|---|" + "---|" * len(teacher_cols),
        *["| " + " | ".join([t, *(f"{100 * np.mean(v[c]):.2f}" for c in teacher_cols)]) + " |"
          for t, v in per_teacher.items()],
        "",
        "Targets:",
        "",
        "```",
        json.dumps({k: v for k, v in summary.items() if k != "table"}, indent=1),
        "```",
        "",
        f"{TIMING_LABEL}: {json.dumps(timing)}",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.rows:
        with open(args.rows, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
