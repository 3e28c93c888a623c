"""Meta-learning core benchmark: our torch.func MAML against `higher`, vmap vs loop, memory.

One run prints three markdown tables:
1. meta-training throughput (tasks/s) of second-order MAML, ours (vmap) vs higher's
   ``innerloop_ctx`` (a loop over tasks, the standard higher recipe), same model, tasks, seed,
   optimizer; the per-step meta-losses of the two must agree to 1e-5;
2. ours with vmap over the meta-batch vs a Python loop over tasks;
3. peak resident memory of one meta-step against the inner steps, second vs first order
   (each point in a fresh subprocess; ``ru_maxrss`` growth during the step).

    python benchmarks/meta_core.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from metacompress.meta import MAML, Sinusoid, default_model

torch.set_num_threads(1)


def _tasks(steps: int, batch: int, k: int = 10) -> list:
    g = torch.Generator().manual_seed(0)
    dist = Sinusoid(k_shot=k, k_query=k)
    return [dist.sample(batch, g) for _ in range(steps)]


def run_ours(batches: list, inner_steps: int, vectorize: str) -> tuple[list[float], float]:
    torch.manual_seed(0)
    learner = MAML(default_model("sinusoid", (1,), 1), "regression", inner_lr=0.01, inner_steps=inner_steps,
                   vectorize=vectorize)
    losses = []
    t0 = time.perf_counter()
    for tasks in batches:
        losses.append(learner.meta_step(tasks)["query_loss"])
    return losses, time.perf_counter() - t0


def run_higher(batches: list, inner_steps: int) -> tuple[list[float], float]:
    import higher

    torch.manual_seed(0)
    model = default_model("sinusoid", (1,), 1)
    outer = torch.optim.Adam(model.parameters(), lr=1e-3)
    inner = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    t0 = time.perf_counter()
    for tasks in batches:
        outer.zero_grad()
        total = 0.0
        for t in tasks:
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(inner_steps):
                    diffopt.step(F.mse_loss(fmodel(t.x_support), t.y_support))
                q = F.mse_loss(fmodel(t.x_query), t.y_query) / len(tasks)
                q.backward()
                total += float(q.detach())
        outer.step()
        losses.append(total)
    return losses, time.perf_counter() - t0


def memory_point(inner_steps: int, first_order: bool, width: int, k: int, batch: int) -> float:
    """MiB of resident memory that one meta-step adds (run in a fresh process)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))
    learner = MAML(model, "regression", inner_steps=inner_steps, first_order=first_order)
    tasks = Sinusoid(k_shot=k, k_query=k).sample(batch, torch.Generator().manual_seed(0))
    learner.evaluate(tasks[:1], 1)  # warm up allocator and kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    learner.meta_step(tasks)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke-sized run (seconds)")
    ap.add_argument("--meta-steps", type=int, default=200)
    ap.add_argument("--meta-batch", type=int, default=25)
    ap.add_argument("--memory-point", nargs=5, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_point:
        s, fo, w, k, b = args.memory_point
        print(json.dumps(memory_point(s, bool(fo), w, k, b)))
        return
    steps = 5 if args.quick else args.meta_steps
    print(f"# meta_core: sinusoid MLP 1-40-40-1, meta-batch {args.meta_batch}, K=10, {steps} meta-steps, "
          "1 CPU thread\n")
    print("| inner steps | ours vmap (tasks/s) | higher (tasks/s) | speed-up | max |loss diff|, first 20 steps "
          "| max |loss diff|, all steps |")
    print("|---|---|---|---|---|---|")
    for inner in (1, 5):
        batches = _tasks(steps, args.meta_batch)
        run_ours(batches[:2], inner, "always")  # warm-up
        ours, t_ours = run_ours(batches, inner, "always")
        ref, t_ref = run_higher(batches, inner)
        n = steps * args.meta_batch
        diffs = [abs(a - b) for a, b in zip(ours, ref)]
        print(f"| {inner} | {n / t_ours:.0f} | {n / t_ref:.0f} | {t_ref / t_ours:.1f}x | {max(diffs[:20]):.1e} "
              f"| {max(diffs):.1e} |")
    print("\n| inner steps | vmap (tasks/s) | loop (tasks/s) | vmap speed-up |")
    print("|---|---|---|---|")
    for inner in (1, 5):
        batches = _tasks(steps, args.meta_batch)
        _, tv = run_ours(batches, inner, "always")
        _, tl = run_ours(batches, inner, "never")
        n = steps * args.meta_batch
        print(f"| {inner} | {n / tv:.0f} | {n / tl:.0f} | {tl / tv:.1f}x |")
    width, k, batch = (64, 20, 4) if args.quick else (256, 100, 25)
    print(f"\nPeak memory added by one meta-step (MLP 1-{width}-{width}-1, K={k}, meta-batch {batch}), MiB:\n")
    print("| inner steps | second order | first order |")
    print("|---|---|---|")
    for inner in ((1, 5) if args.quick else (1, 5, 10, 20)):
        row = []
        for fo in (0, 1):
            out = subprocess.run([sys.executable, __file__, "--memory-point", str(inner), str(fo), str(width),
                                  str(k), str(batch)], capture_output=True, text=True, check=True)
            row.append(float(out.stdout.strip().splitlines()[-1]))
        print(f"| {inner} | {row[0]:.1f} | {row[1]:.1f} |")


if __name__ == "__main__":
    main()
