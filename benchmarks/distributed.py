"""Throughput of sharded meta-training at 1 and 2 ranks on this machine, bytes exchanged per
iteration, and a 64-rank efficiency estimate for policy ES from measured job times.

    python benchmarks/distributed.py [--quick]

- policy ES: reward jobs (member x task) per second at 1 rank and 2 ranks (``workers: 2``), one
  thread per rank, after the teachers are cached; and each rank's CPU seconds, whose ratio says
  what two *free* cores would give on a machine whose cores are shared with other work;
- MAML: meta-steps per second on sinusoid (meta-batch 25) at 1 and 2 ranks;
- data-parallel repair (what ``torchrun ... compress`` runs): distillation steps per second of
  resnet20 on digits@32 and @64 (batch 64, BatchNorm synced, teacher logits gathered) at 1 and
  2 ranks;
- bytes: the payload each rank puts into the iteration's all-reduce (ES: one float64 per job;
  MAML: the float32 meta-gradient plus the loss metric);
- 64 ranks: per-job times measured here, resampled into iterations of several populations x tasks
  dealt out as the trainer does (see ``es_efficiency``).
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch

os.environ.setdefault("METACOMPRESS_PROGRESS", "0")
os.environ.setdefault("METACOMPRESS_CACHE", tempfile.mkdtemp(prefix="metacompress-bench-dist-"))

from metacompress.meta import data_parallel, distributed, parse_task_spec  # noqa: E402
from metacompress.meta.runner import train_checkpoint  # noqa: E402
from metacompress.policy import meta_train as mt  # noqa: E402
from metacompress.policy.tasks import CompressionTask  # noqa: E402

TEACHERS = [{"model": "mlp", "data": "digits", "kwargs": [{"hidden": 64, "depth": 1}]},
            {"model": "vgg-small", "data": "digits", "kwargs": [{"width": 0.5}]}]


def es_config(quick: bool, workers: int, out: str) -> mt.MetaTrainConfig:
    teachers = TEACHERS[:1] if quick else TEACHERS
    return mt.MetaTrainConfig(teachers=teachers, iterations=2 if quick else 12, tasks_per_iteration=2,
                              population=4 if quick else 8, workers=workers, seed=0, out=out)


def es_rate(quick: bool, workers: int) -> tuple[float, float, int, list[float]]:
    """Reward jobs per second over the whole run (teacher caching excluded) and after the first
    iteration (the steady state: each rank's one-off setup, its teachers' contexts and probes,
    falls in the first), jobs per iteration, and the CPU seconds of each rank over the whole run
    (rank 0 is this process; the others are its reaped children)."""
    cfg = es_config(quick, workers, tempfile.mkdtemp(prefix="es-"))
    cpu0, kids0 = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    hist = mt.train_policy(cfg, resume=False)["history"]
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = [time.process_time() - cpu0]
    if workers > 1:  # one child per extra rank, all reaped: their CPU time together, split evenly
        cpu += [(kids.ru_utime + kids.ru_stime - kids0.ru_utime - kids0.ru_stime) / (workers - 1)] * (workers - 1)
    jobs = cfg.population * cfg.tasks_per_iteration
    steady = jobs * (len(hist) - 1) / max(hist[-1]["seconds"] - hist[0]["seconds"], 1e-9)
    return jobs * len(hist) / max(hist[-1]["seconds"], 1e-9), steady, jobs, cpu


def job_times(quick: bool) -> tuple[dict[CompressionTask, list[float]], list[float]]:
    """Seconds per reward job from a 1-rank run: policy jobs by task, and uniform-baseline jobs."""
    by_task: dict[CompressionTask, list[float]] = defaultdict(list)
    baselines: list[float] = []
    inner = mt._score

    def timed(job):
        t0 = time.perf_counter()
        r = inner(job)
        (baselines if job[0] is None else by_task[job[1]]).append(time.perf_counter() - t0)
        return r

    mt._score = timed
    try:
        mt.train_policy(es_config(quick, 1, tempfile.mkdtemp(prefix="es-")), resume=False)
    finally:
        mt._score = inner
    return by_task, baselines


def maml_rate(ranks: int, steps: int) -> float:
    """Meta-steps per second of MAML on sinusoid (meta-batch 25), timed inside the loop on rank 0."""
    stamps: list[float] = []

    def progress(it):
        for i in it:
            stamps.append(time.perf_counter())
            yield i
        stamps.append(time.perf_counter())

    spec = parse_task_spec("sinusoid")
    distributed.launch_local(lambda: train_checkpoint(spec, "maml", steps, 0, joint_steps=1, progress=progress), ranks)
    return (len(stamps) - 2) / (stamps[-1] - stamps[1])  # from the end of the first step (warm-up excluded)


def _timed_repair(steps: int, data_spec: str = "digits@32") -> float:
    """Seconds of one data-parallel repair (BN recalibration, teacher logits, ``steps`` steps) of
    resnet20 on ``data_spec``."""
    import copy

    from metacompress.compress.distill import RepairConfig, repair
    from metacompress.data import load_dataset
    from metacompress.zoo import build_model

    torch.set_num_threads(1)
    data = load_dataset(data_spec)
    torch.manual_seed(0)
    teacher = build_model("resnet20", data.input_shape, data.num_classes, data.mean, data.std).eval()
    student = copy.deepcopy(teacher)
    distributed.barrier()  # a spawned rank imports torch first: its start-up is not the repair's time
    with data_parallel.data_parallel():
        start = time.perf_counter()
        repair(student, teacher, data, RepairConfig(steps=steps), progress=False)
        return time.perf_counter() - start


def resnet20_params() -> int:
    from metacompress.zoo import build_model

    return sum(p.numel() for p in build_model("resnet20", (1, 32, 32), 10).parameters())


def repair_rate(ranks: int, steps: int, data_spec: str) -> float:
    """Distillation steps per second of a data-parallel repair on ``ranks`` ranks (spawned)."""
    return steps / distributed.launch_local(functools.partial(_timed_repair, steps, data_spec), ranks)


def allreduce_latency(n: int = 200) -> float:
    """Seconds per all-reduce of 64 float64 between 2 local gloo ranks (median of ``n``)."""

    def run() -> float:
        t = torch.zeros(64, dtype=torch.float64)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            distributed.all_reduce_sum(t)
            out.append(time.perf_counter() - t0)
        return float(np.median(out))

    return distributed.launch_local(run, 2)


def es_efficiency(by_task: dict[CompressionTask, list[float]], baselines: list[float], latency: float, ranks: int,
                  population: int, tasks: int, rng: np.random.Generator, trials: int = 2000) -> float:
    """Median efficiency of ES iterations on ``ranks`` ranks, resampled from measured job times.

    An iteration's jobs are population x tasks members (task-major) then its tasks' baselines,
    dealt out strided as ``meta.distributed.sharded_map`` does; it lasts as long as the busiest
    rank plus one all-reduce (a ring: 2 (ranks - 1) hops of ``latency``). Efficiency = the
    iteration's total work / (ranks x its duration).
    """
    pools = [np.asarray(v) for v in by_task.values() if len(v) >= 2]
    eff = []
    for _ in range(trials):
        times = []
        for i in rng.integers(len(pools), size=tasks):
            times += list(rng.choice(pools[i], size=population))
        times += [rng.choice(baselines) for _ in range(tasks)]
        per_rank = np.array([sum(times[r::ranks]) for r in range(ranks)])
        eff.append(sum(times) / (ranks * (per_rank.max() + 2 * (ranks - 1) * latency)))
    return float(np.median(eff))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread per rank at every world size: the comparison is of processes
    mt.train_policy(es_config(args.quick, 1, tempfile.mkdtemp(prefix="es-warm-")), resume=False)  # cache teachers
    (es1, steady1, jobs, cpu1), (es2, steady2, _, cpu2) = es_rate(args.quick, 1), es_rate(args.quick, 2)
    steps = 10 if args.quick else 60
    m1, m2 = maml_rate(1, steps), maml_rate(2, steps)
    repair_steps = 10 if args.quick else 60
    repairs = {size: (repair_rate(1, repair_steps, f"digits@{size}"), repair_rate(2, repair_steps, f"digits@{size}"))
               for size in ((16,) if args.quick else (32, 64))}
    params = sum(p.numel() for p in train_checkpoint(parse_task_spec("sinusoid"), "maml", 1, 0, joint_steps=1)
                 ["state"]["model"].values())
    latency = allreduce_latency(50 if args.quick else 500)
    by_task, baselines = job_times(args.quick)
    member = np.concatenate([np.asarray(v) for v in by_task.values()])
    cv = np.mean([np.std(v) / np.mean(v) for v in by_task.values() if len(v) >= 2])
    rng, trials = np.random.default_rng(0), 200 if args.quick else 2000
    shapes = ((64, 64, 4), (64, 60, 4), (64, 64, 16), (64, 62, 16), (64, 126, 16))  # ranks, population, tasks
    eff = {shape: es_efficiency(by_task, baselines, latency, *shape, rng, trials) for shape in shapes}
    print("| work | 1 rank | 2 ranks | speedup | all-reduce payload per iteration and rank |")
    print("|---|---:|---:|---:|---|")
    print(f"| policy ES, reward jobs/s ({jobs} jobs/iteration), whole run | {es1:.2f} | {es2:.2f} | {es2 / es1:.2f}x | "
          f"{8 * jobs} B ({jobs} float64 rewards) |")
    print(f"| policy ES, reward jobs/s after the first iteration | {steady1:.2f} | {steady2:.2f} | "
          f"{steady2 / steady1:.2f}x | same |")
    print(f"| MAML sinusoid, meta-steps/s (meta-batch 25) | {m1:.1f} | {m2:.1f} | {m2 / m1:.2f}x | "
          f"{4 * params + 8} B ({params} float32 gradients + loss) |")
    for size, (r1, r2) in repairs.items():
        print(f"| data-parallel repair, resnet20 digits@{size}, steps/s (batch 64, {repair_steps} steps) | {r1:.2f} | "
              f"{r2:.2f} | {r2 / r1:.2f}x | {4 * resnet20_params():,} B of float32 gradients per step, and "
              "4 all-reduces of a few floats per channel per BatchNorm layer |")
    print()
    print(f"policy ES CPU seconds, whole run (setup included): 1 rank {cpu1[0]:.1f}; 2 ranks {cpu2[0]:.1f} + "
          f"{cpu2[1]:.1f}; speedup on two free cores estimated from CPU time: {cpu1[0] / max(cpu2):.2f}x")
    print(f"policy job: median {np.median(member):.3f} s over {len(member)} jobs, mean within-task coefficient of "
          f"variation {cv:.2f}; uniform-baseline job: median {np.median(baselines):.3f} s; gloo all-reduce of "
          f"64 float64 between 2 local ranks: {1e6 * latency:.0f} us (median)")
    print()
    print("| ranks | population x tasks per iteration | jobs per rank | estimated ES efficiency |")
    print("|---:|---|---:|---:|")
    for (w, p, t), e in eff.items():
        print(f"| {w} | {p} x {t} (+{t} baselines) | {(p * t + t) / w:.2f} | {100 * e:.1f} % |")

if __name__ == "__main__":
    main()
