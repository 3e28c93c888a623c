"""Few-shot benchmark: every meta-learner against joint pre-training (transfer) and no adaptation.

Sinusoid (K=10, one SGD step at test, MSE) and digits-rot 5-way 1-shot / 5-shot on the
meta-test digits 6-9 (accuracy). Each algorithm is meta-trained once per family (digits-rot on
5w1s episodes, then scored on 5w1s and 5w5s episodes); the joint baseline is trained in the same
run with the same step count. Means with 95 % CIs over the same seeded meta-test episodes.

    python benchmarks/meta_fewshot.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch

from metacompress.meta import ALGORITHMS, parse_task_spec
from metacompress.meta.runner import evaluate_checkpoint, train_checkpoint

torch.set_num_threads(1)


def _fmt(row: dict, metric: str) -> str:
    scale = 100 if metric == "accuracy" else 1
    return f"{row[metric] * scale:.2f} ± {row['ci95'] * scale:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke-sized run")
    ap.add_argument("--algos", default=",".join(ALGORITHMS))
    ap.add_argument("--sin-steps", type=int, default=5000, help="meta-steps on sinusoid")
    ap.add_argument("--digits-steps", type=int, default=200, help="meta-steps on digits-rot")
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--digits-test-steps", type=int, default=3)
    args = ap.parse_args()
    if args.quick:
        args.sin_steps, args.digits_steps, args.episodes = 100, 5, 20
    algos = args.algos.split(",")
    sections = [("sinusoid", args.sin_steps, [("sinusoid", 1)]),
                ("digits-rot:5w1s", args.digits_steps,
                 [("digits-rot:5w1s", args.digits_test_steps), ("digits-rot:5w5s", args.digits_test_steps)])]
    for train_spec, meta_steps, evals in sections:
        rows: dict[str, dict] = {}
        for algo in algos:
            t0 = time.perf_counter()
            extra = {"inner_steps": 5} if algo == "reptile" else {}
            ckpt = train_checkpoint(parse_task_spec(train_spec), algo, meta_steps, seed=0, **extra)
            secs = time.perf_counter() - t0
            for spec, steps in evals:
                res = evaluate_checkpoint(ckpt, parse_task_spec(spec), args.episodes, steps, seed=1)
                rows.setdefault(spec, {})[algo] = (res["results"], secs, steps)
        for spec, by_algo in rows.items():
            metric = "mse" if spec == "sinusoid" else "accuracy"
            unit = "MSE" if metric == "mse" else "accuracy %"
            first = next(iter(by_algo.values()))
            print(f"\n### {spec}: {args.episodes} meta-test episodes, {first[2]} step(s) at test, {unit} (95 % CI)\n")
            print(f"| method | {unit} | meta-train time (s) |")
            print("|---|---|---|")
            for algo, (res, secs, _) in by_algo.items():
                print(f"| {algo} ({meta_steps} meta-steps) | {_fmt(res[algo], metric)} | {secs:.0f} |")
            for base in ("joint", "no-adapt"):  # the same for every algorithm's run: show the first's
                res = first[0]
                print(f"| {base} | {_fmt(res[base], metric)} | |")


if __name__ == "__main__":
    main()
