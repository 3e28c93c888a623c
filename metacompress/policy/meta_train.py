"""Meta-training the policy with antithetic evolution strategies over a task distribution.

Each iteration samples a batch of compression tasks, evaluates every antithetic perturbation
of the policy weights on all of them (paired: same tasks, same seeds), and steps along the
rank-shaped ES gradient. Rewards are validation accuracy after repair minus the uniform
allocation's with default repair. Work is spread over worker processes, each with its own
teacher cache; the run is reproducible under its seed for a fixed worker count.

With ``select_every``, the weights are also scored every so many iterations (and at the start)
on fixed selection tasks, on a task seed training never draws, and the best of these is what
the run ships: early stopping on validation, because ES on a few families fits their sampled
tasks, and the training reward does not say when it stopped transferring.

``adapt`` is ES-MAML's fast adaptation: a few ES steps on one target task, starting from
the meta-learned weights.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from metacompress.compress.distill import RepairConfig
from metacompress.errors import UserError
from metacompress.io import load_weights, save_torch
from metacompress.meta.es import ES
from metacompress.policy.network import EXPERT_RULES, REGIMES, Shapes, anchored, init_params
from metacompress.policy.store import Policy, load_policy, save_policy
from metacompress.policy.tasks import Task, TaskDistribution, TaskPool, Teacher, kinds_seen, teachers_from
from metacompress.progress import track


@dataclass
class MetaTrainConfig:
    teachers: list[dict[str, Any]]
    iterations: int = 60
    tasks_per_iteration: int = 4
    population: int = 16
    sigma: float = 0.1
    lr: float = 0.03
    budgets: tuple[float, float] = (0.1, 0.7)
    regime_weights: tuple[float, ...] = (0.3, 0.3, 0.3, 0.1)
    workers: int = 2
    seed: int = 0
    repair_defaults: dict[str, Any] = field(default_factory=dict)
    init: str | None = None                 # warm start from this policy (a previous stage)
    train_only: tuple[str, ...] = ()        # weight blocks ES moves (network.Shapes names); () = all
    frozen_experts: tuple[str, ...] = ()    # experts (network.EXPERT_RULES) whose mixture weights stay 0
    reward_repair: str = "policy"           # repair settings the reward uses: the policy's, or the default ones
    anchor: str | None = None               # start the allocation at this expert alone (network.anchored)
    select_every: int = 0                   # score on the selection tasks every so many iterations; 0: never
    select_budgets: tuple[float, ...] = (0.5, 0.3, 0.15)  # selection tasks: every teacher x these x every regime
    out: str = "out/policy"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MetaTrainConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise UserError(f"unknown policy-training option(s): {', '.join(unknown)}")
        for key in ("budgets", "regime_weights", "train_only", "frozen_experts", "select_budgets"):
            if key in known:
                known[key] = tuple(known[key])
        if known.get("reward_repair", "policy") not in ("policy", "default"):
            raise UserError(f"reward_repair must be 'policy' or 'default', got {known['reward_repair']!r}")
        return cls(**known)


# ----- worker side: one TaskPool per process ----------------------------------------------
_POOL: TaskPool | None = None


def _init_worker(defaults: dict[str, Any]) -> None:
    global _POOL
    torch.set_num_threads(1)
    _POOL = TaskPool(RepairConfig(**defaults))


def _reward(args: tuple[np.ndarray, Task, bool]) -> float:
    theta, task, learned_repair = args
    return _POOL.reward(theta, task, learned_repair)


def _warm(teacher: Teacher) -> str:
    _POOL.context(teacher)
    return teacher.label()


class Evaluator:
    """Maps reward jobs over worker processes (or in-process when workers <= 1)."""

    def __init__(self, defaults: RepairConfig, workers: int) -> None:
        self.workers = workers
        if workers > 1:
            self._pool = mp.get_context("fork").Pool(workers, _init_worker, (defaults.to_dict(),))
        else:
            _init_worker(defaults.to_dict())
            self._pool = None

    def map(self, fn: Callable, jobs: list) -> list:
        if self._pool is None:
            return [fn(j) for j in jobs]
        return self._pool.map(fn, jobs, chunksize=1)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()


def meta_train(cfg: MetaTrainConfig, resume: bool = True) -> dict[str, Any]:
    """Run ES meta-training; writes checkpoints, the final policy and a reward curve into cfg.out."""
    out = Path(cfg.out)
    defaults = RepairConfig(**cfg.repair_defaults)
    teachers = teachers_from(cfg.teachers)
    dist = TaskDistribution(teachers, budgets=cfg.budgets, regime_weights=cfg.regime_weights)
    theta0 = load_policy(cfg.init).theta if cfg.init else init_params(cfg.seed)
    if cfg.anchor:
        theta0 = anchored(theta0, cfg.anchor)
    mask = block_mask(cfg.train_only, cfg.frozen_experts)
    es = ES(theta0[mask], sigma=cfg.sigma, lr=cfg.lr, population=cfg.population, seed=cfg.seed)

    def full(v: np.ndarray) -> np.ndarray:
        theta = theta0.copy()
        theta[mask] = v
        return theta

    history: list[dict[str, float]] = []
    selection: list[dict[str, float]] = []  # {iteration, reward} of every scored iterate
    best = theta0
    select_tasks = selection_tasks(teachers, cfg.select_budgets, dist.task_seeds) if cfg.select_every else []
    rng = np.random.default_rng(cfg.seed)
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.is_file():
        state = load_weights(ckpt)
        try:
            es.load_state_dict(state["es"])
        except UserError as exc:
            raise UserError(f"{ckpt} is from a different run ({exc}): remove it, or train into another --out") from None
        history = state["history"]
        rng.bit_generator.state = state["rng"]
        selection = state.get("selection", [])
        best = state["best"].numpy() if "best" in state else best
    ev = Evaluator(defaults, cfg.workers)
    t0 = time.perf_counter()

    def select(iteration: int) -> None:
        """Score the current weights on the selection tasks; keep them if they are the best yet."""
        nonlocal best
        theta = full(np.asarray(es.theta, dtype=np.float64))
        jobs = [(theta, t, cfg.reward_repair == "policy") for t in select_tasks]
        reward = float(np.mean(ev.map(_reward, jobs)))
        if not selection or reward > max(s["reward"] for s in selection):
            best = theta
        selection.append({"iteration": iteration, "reward": reward})

    try:
        # train/cache every teacher first (each worker process holds its own copy)
        for _ in range(max(1, cfg.workers)):
            ev.map(_warm, teachers)
        if select_tasks and not selection:
            select(0)
        for it in track(range(len(history), cfg.iterations), "meta-training policy",
                        total=cfg.iterations - len(history)):
            tasks = dist.sample(rng, cfg.tasks_per_iteration)
            candidates = es.ask()
            jobs = [(full(np.asarray(c)), t, cfg.reward_repair == "policy") for c in candidates for t in tasks]
            rewards = np.asarray(ev.map(_reward, jobs)).reshape(len(candidates), len(tasks))
            fitness = rewards.mean(1)
            metrics = es.tell(fitness)
            center = float(np.mean(fitness))
            history.append({"iteration": it, "mean_reward": center, "best_reward": float(fitness.max()),
                            "seconds": round(time.perf_counter() - t0, 1), **{k: float(v) for k, v in metrics.items()}})
            if select_tasks and ((it + 1) % cfg.select_every == 0 or it + 1 == cfg.iterations):
                select(it + 1)
            save_torch({"es": es.state_dict(), "history": history, "rng": rng.bit_generator.state,
                        "selection": selection, "best": torch.as_tensor(best)}, ckpt)
    finally:
        ev.close()
    theta = best if select_tasks else full(np.asarray(es.theta, dtype=np.float64))
    provenance = {
        "teachers": [t.label() for t in teachers], "iterations": cfg.iterations, "population": cfg.population,
        "tasks_per_iteration": cfg.tasks_per_iteration, "budgets": list(cfg.budgets),
        "regime_weights": list(cfg.regime_weights), "seed": cfg.seed, "sigma": cfg.sigma, "lr": cfg.lr,
        "init": cfg.init, "init_provenance": ({k: v for k, v in load_policy(cfg.init).provenance.items() if k != "history"}
                                              if cfg.init else None),
        "train_only": list(cfg.train_only), "frozen_experts": list(cfg.frozen_experts),
        "reward_repair": cfg.reward_repair, "anchor": cfg.anchor,
        "selection": ({"tasks": len(select_tasks), "task_seed": dist.task_seeds, "budgets": list(cfg.select_budgets),
                       "scores": selection, "selected_iteration": max(selection, key=lambda s: s["reward"])["iteration"]}
                      if select_tasks else None),
        "final_mean_reward_last10": float(np.mean([h["mean_reward"] for h in history[-10:]])) if history else 0.0,
        "history": history,
    }
    save_policy(Policy(theta, defaults, provenance, kinds_seen(teachers)), out)
    plot_curve(history, out / "reward_curve.png", selection)
    return {"out": str(out), "iterations": cfg.iterations, "history": history,
            "final_mean_reward_last10": provenance["final_mean_reward_last10"]}


def selection_tasks(teachers: list[Teacher], budgets: tuple[float, ...], seed: int) -> list[Task]:
    """Every teacher x budget x regime on one task seed (training draws seeds below ``seed``)."""
    return [Task(t, b, r, seed) for t in teachers for b in budgets for r in REGIMES]


def block_mask(blocks: tuple[str, ...], frozen_experts: tuple[str, ...] = ()) -> np.ndarray:
    """Boolean mask over the flat weights selecting the named blocks (all when none are named),
    less the mixture weights of ``frozen_experts``.

    Why freeze an expert: ES draws noise only for the selected weights, in their flat order, so
    a run that freezes an added expert draws exactly the noise, and takes exactly the steps, of
    a run without it: an earlier policy stays reproducible after the expert set grows.
    """
    layout = Shapes.layout()
    unknown = set(blocks) - {name for name, _ in layout}
    if unknown:
        raise UserError(f"unknown weight block(s) {', '.join(sorted(unknown))}; known: {', '.join(n for n, _ in layout)}")
    if set(frozen_experts) - set(EXPERT_RULES):
        raise UserError(f"unknown expert(s) {', '.join(sorted(set(frozen_experts) - set(EXPERT_RULES)))}; "
                        f"known: {', '.join(EXPERT_RULES)}")
    mask = []
    for name, shape in layout:
        block = np.full(shape, not blocks or name in blocks)
        if name == "wm":
            block[:, [EXPERT_RULES.index(e) for e in frozen_experts]] = False
        mask += block.ravel().tolist()
    return np.array(mask)


def plot_curve(history: list[dict[str, float]], path: Path, selection: list[dict[str, float]] | None = None) -> None:
    """Reward against iteration (mean over the population, a 10-iteration moving average, and the
    scores on the selection tasks with the one kept circled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metacompress.io import atomic_path

    r = np.array([h["mean_reward"] for h in history]) * 100
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(r, alpha=0.4, label="population mean")
    if len(r) >= 10:
        ax.plot(np.arange(9, len(r)), np.convolve(r, np.ones(10) / 10, mode="valid"), label="10-iteration mean")
    if selection:
        it = [s["iteration"] for s in selection]
        score = [100 * s["reward"] for s in selection]
        ax.plot(it, score, "o-", color="black", ms=4, label="selection tasks (unseen task seed)")
        k = int(np.argmax(score))
        ax.plot(it[k], score[k], "o", ms=12, mfc="none", color="red", label=f"kept: iteration {it[k]}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("ES iteration")
    ax.set_ylabel("reward (points over uniform)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def adapt(theta: np.ndarray, pool: TaskPool, task: Task, steps: int, population: int = 8, sigma: float = 0.05,
          lr: float = 0.02, seed: int = 0) -> np.ndarray:
    """ES-MAML fast adaptation: ``steps`` ES steps on one task from the meta-learned weights."""
    es = ES(np.asarray(theta, dtype=np.float64), sigma=sigma, lr=lr, population=population, seed=seed)
    for _ in track(range(steps), "adapting policy", total=steps):
        es.tell([pool.reward(np.asarray(c), task) for c in es.ask()])
    return np.asarray(es.theta, dtype=np.float64)
