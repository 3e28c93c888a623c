"""Meta-training the policy with antithetic evolution strategies over a task distribution.

Each iteration samples a batch of compression tasks, evaluates every antithetic perturbation
of the policy weights on all of them (paired: same tasks, same seeds), and steps along the
rank-shaped ES gradient. Rewards are validation accuracy after repair minus the uniform
allocation's with default repair. The (member x task) jobs are sharded over ranks (torchrun's, or
``workers`` processes on this machine), each with its own teacher contexts; every rank draws the
same tasks and perturbations from the seed and only the scalar rewards are exchanged
(``meta.distributed``), so the run is reproducible under its seed whatever the number of ranks.
The run state is checkpointed every ``checkpoint_every`` iterations and a run resumes from it.

With ``select_every``, the weights are also scored every so many iterations (and at the start)
on fixed selection tasks, on a task seed training never draws, and the best of these is what
the run ships: early stopping on validation, because ES on a few families fits their sampled
tasks, and the training reward does not say when it stopped transferring.

``adapt`` is ES-MAML's fast adaptation: a few ES steps on one target task, starting from
the meta-learned weights.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metacompress.compress.distill import RepairConfig
from metacompress.errors import UserError
from metacompress.meta import checkpoint, distributed
from metacompress.meta.es import ES
from metacompress.policy.network import EXPERT_RULES, REGIMES, Shapes, anchored, init_params
from metacompress.policy.store import Policy, load_policy, save_policy
from metacompress.policy.tasks import CompressionTask, CompressionTaskSampler, TaskPool, Teacher, kinds_seen, teachers_from
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
    workers: int = 2                        # ranks on this machine when not under torchrun (which sets its own)
    seed: int = 0
    repair_defaults: dict[str, Any] = field(default_factory=dict)
    init: str | None = None                 # warm start from this policy (a previous stage)
    train_only: tuple[str, ...] = ()        # weight blocks ES moves (network.Shapes names); () = all
    frozen_experts: tuple[str, ...] = ()    # experts (network.EXPERT_RULES) whose mixture weights stay 0
    reward_repair: str = "policy"           # repair settings the reward uses: the policy's, or the default ones
    anchor: str | None = None               # start the allocation at this expert alone (network.anchored)
    select_every: int = 0                   # score on the selection tasks every so many iterations; 0: never
    select_budgets: tuple[float, ...] = (0.5, 0.3, 0.15)  # selection tasks: every teacher x these x every regime
    checkpoint_every: int = 1               # write the run state every so many iterations (and after the last)
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


# ----- every rank holds one TaskPool -----------------------------------------------------------
_POOL: TaskPool | None = None

# settings that do not change the trajectory: a checkpoint stays valid when they change
_NOT_FINGERPRINTED = ("iterations", "workers", "out", "checkpoint_every")


def _score(job: tuple[np.ndarray | None, CompressionTask, bool]) -> float:
    """Validation accuracy of the policy ``theta`` on ``task`` (``None``: of the uniform baseline)."""
    theta, task, learned_repair = job
    if theta is None:
        return _POOL.baseline(task).val
    return _POOL.policy(theta, task, learned_repair).val


def _rewards(jobs: list[tuple[np.ndarray, CompressionTask, bool]], baselines: dict[CompressionTask, float]) -> np.ndarray:
    """Each job's reward (policy minus uniform baseline, as ``TaskPool.reward``), over all ranks.

    The baselines not yet in ``baselines`` (a cache every rank holds alike) are jobs of the same
    sharded map, so that no rank computes one that another also computes. They come last: when the
    policy jobs do not fill every rank equally, the baselines land on the ranks with fewer.
    (They shift every member's fitness equally, so they move the reports, not the ES step.)
    """
    missing = list(dict.fromkeys(t for _, t, _ in jobs if t not in baselines))
    scores = distributed.sharded_map(_score, jobs + [(None, t, False) for t in missing])
    baselines.update(zip(missing, scores[len(jobs):]))
    return np.array([s - baselines[t] for s, (_, t, _) in zip(scores, jobs)])


def train_policy(cfg: MetaTrainConfig, resume: bool = True) -> dict[str, Any]:
    """Run ES meta-training; rank 0 writes checkpoints, the final policy and a reward curve into cfg.out.

    Under ``torchrun`` every rank runs this and evaluates its share of each iteration's
    (member x task) jobs; otherwise ``cfg.workers`` ranks are started on this machine. The
    result does not depend on the number of ranks. ``resume`` continues from ``cfg.out``'s
    checkpoint when there is one (refused if it was written under other settings).
    """
    if cfg.checkpoint_every < 0:
        raise UserError(f"checkpoint_every must be 0 or positive, got {cfg.checkpoint_every}")
    if distributed.init_from_env()[1] > 1:
        return _train(cfg, resume)
    return distributed.launch_local(_train, max(1, cfg.workers), cfg, resume)


@dataclass
class _Run:
    """The state of one ES run that a checkpoint holds, and the steps that move it."""

    cfg: MetaTrainConfig
    theta0: np.ndarray
    mask: np.ndarray
    es: ES
    rng: np.random.Generator
    select_tasks: list[CompressionTask]
    history: list[dict[str, float]] = field(default_factory=list)
    selection: list[dict[str, float]] = field(default_factory=list)  # {iteration, reward} of every scored iterate
    best: np.ndarray | None = None
    baselines: dict[CompressionTask, float] = field(default_factory=dict)

    def full(self, v: Any) -> np.ndarray:
        """The whole policy vector with the trained blocks set to ``v``."""
        theta = self.theta0.copy()
        theta[self.mask] = np.asarray(v, dtype=np.float64)
        return theta

    def restore(self, state: dict[str, Any]) -> None:
        self.es.load_state_dict(state["es"])
        self.history = state["history"]
        self.rng.bit_generator.state = state["rng"]
        self.selection = state.get("selection", [])
        if "best" in state:
            self.best = state["best"].numpy()
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])

    def state(self, iteration: int) -> dict[str, Any]:
        return {"es": self.es.state_dict(), "history": self.history, "rng": self.rng.bit_generator.state,
                "selection": self.selection, "best": torch.as_tensor(self.best), "torch_rng": torch.get_rng_state(),
                "iteration": iteration}

    def select(self, iteration: int) -> None:
        """Score the current weights on the selection tasks; keep them if they are the best yet."""
        theta = self.full(self.es.theta)
        jobs = [(theta, t, self.cfg.reward_repair == "policy") for t in self.select_tasks]
        reward = float(np.mean(_rewards(jobs, self.baselines)))
        if not self.selection or reward > max(s["reward"] for s in self.selection):
            self.best = theta
        self.selection.append({"iteration": iteration, "reward": reward})

    def step(self, it: int, dist: CompressionTaskSampler, t0: float) -> None:
        """One ES iteration on freshly sampled tasks (``t0``: when training started)."""
        tasks = dist.sample(self.rng, self.cfg.tasks_per_iteration)
        candidates = self.es.ask()
        # task-major order: with a population that is a multiple of the world size, each rank gets whole
        # members on every task, so ranks carry equal work even when the tasks' costs differ
        jobs = [(self.full(c), t, self.cfg.reward_repair == "policy") for t in tasks for c in candidates]
        fitness = _rewards(jobs, self.baselines).reshape(len(tasks), len(candidates)).mean(0)
        metrics = self.es.tell(fitness)
        self.history.append({"iteration": it, "mean_reward": float(np.mean(fitness)),
                             "best_reward": float(fitness.max()), "seconds": round(time.perf_counter() - t0, 1),
                             **{k: float(v) for k, v in metrics.items()}})

    def final(self) -> np.ndarray:
        return self.best if self.select_tasks else self.full(self.es.theta)


def _start(cfg: MetaTrainConfig, teachers: list[Teacher], dist: CompressionTaskSampler) -> _Run:
    theta0 = load_policy(cfg.init).theta if cfg.init else init_params(cfg.seed)
    if cfg.anchor:
        theta0 = anchored(theta0, cfg.anchor)
    mask = block_mask(cfg.train_only, cfg.frozen_experts)
    es = ES(theta0[mask], sigma=cfg.sigma, lr=cfg.lr, population=cfg.population, seed=cfg.seed)
    select_tasks = selection_tasks(teachers, cfg.select_budgets, dist.task_seeds) if cfg.select_every else []
    return _Run(cfg, theta0, mask, es, np.random.default_rng(cfg.seed), select_tasks, best=theta0)


def _train(cfg: MetaTrainConfig, resume: bool) -> dict[str, Any]:
    """The ES loop every rank runs: same tasks, same perturbations, its shard of the rewards."""
    global _POOL
    out = Path(cfg.out)
    defaults = RepairConfig(**cfg.repair_defaults)
    teachers = teachers_from(cfg.teachers)
    dist = CompressionTaskSampler(teachers, budgets=cfg.budgets, regime_weights=cfg.regime_weights)
    run = _start(cfg, teachers, dist)
    ckpt = out / "checkpoint.pt"
    fp = checkpoint.fingerprint({k: v for k, v in asdict(cfg).items() if k not in _NOT_FINGERPRINTED})
    state = _load_state(ckpt, fp) if resume else None
    if state is not None:
        run.restore(state)
    _POOL = TaskPool(defaults, score_test=False)
    _warm_teachers(teachers)
    t0 = time.perf_counter()
    if run.select_tasks and not run.selection:
        run.select(0)
    iterations = range(len(run.history), cfg.iterations)
    for it in (track(iterations, "meta-training policy", total=len(iterations)) if distributed.is_main() else iterations):
        run.step(it, dist, t0)
        done = it + 1
        if run.select_tasks and (done % cfg.select_every == 0 or done == cfg.iterations):
            run.select(done)
        if done == cfg.iterations or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            checkpoint.save(run.state(done), ckpt, fp)
    provenance = _provenance(cfg, teachers, run.history, run.selection, len(run.select_tasks), dist.task_seeds)
    if distributed.is_main():
        save_policy(Policy(run.final(), defaults, provenance, kinds_seen(teachers)), out)
        plot_curve(run.history, out / "reward_curve.png", run.selection)
    return {"out": str(out), "iterations": cfg.iterations, "history": run.history,
            "final_mean_reward_last10": provenance["final_mean_reward_last10"]}


def _load_state(ckpt: Path, fp: str) -> dict[str, Any] | None:
    """The run state in ``ckpt`` (rank 0 reads it, every rank gets it), or None."""
    try:
        # legacy_ok: checkpoints from before fingerprints still resume (their ES state is checked below)
        return checkpoint.load(ckpt, fp, legacy_ok=True)
    except checkpoint.CheckpointMismatch as exc:
        raise UserError(f"{exc} (policy train: --restart starts over; or train into another --out)") from None


def _warm_teachers(teachers: list[Teacher]) -> None:
    """Rank 0 trains and caches any missing teacher first, so that ranks sharing the cache do not
    all train it; the others then read it (or, on another disk, train the same seeded model)."""
    if distributed.is_main():
        for t in teachers:
            _POOL.context(t)
    distributed.barrier()
    for t in teachers:
        _POOL.context(t)


def _provenance(cfg: MetaTrainConfig, teachers: list[Teacher], history: list[dict[str, float]],
                selection: list[dict[str, float]], n_select: int, task_seed: int) -> dict[str, Any]:
    return {
        "teachers": [t.label() for t in teachers], "iterations": cfg.iterations, "population": cfg.population,
        "tasks_per_iteration": cfg.tasks_per_iteration, "budgets": list(cfg.budgets),
        "regime_weights": list(cfg.regime_weights), "seed": cfg.seed, "sigma": cfg.sigma, "lr": cfg.lr,
        "init": cfg.init, "init_provenance": ({k: v for k, v in load_policy(cfg.init).provenance.items() if k != "history"}
                                              if cfg.init else None),
        "train_only": list(cfg.train_only), "frozen_experts": list(cfg.frozen_experts),
        "reward_repair": cfg.reward_repair, "anchor": cfg.anchor,
        "selection": ({"tasks": n_select, "task_seed": task_seed, "budgets": list(cfg.select_budgets),
                       "scores": selection, "selected_iteration": max(selection, key=lambda s: s["reward"])["iteration"]}
                      if n_select else None),
        "final_mean_reward_last10": float(np.mean([h["mean_reward"] for h in history[-10:]])) if history else 0.0,
        "history": history,
    }


def selection_tasks(teachers: list[Teacher], budgets: tuple[float, ...], seed: int) -> list[CompressionTask]:
    """Every teacher x budget x regime on one task seed (training draws seeds below ``seed``)."""
    return [CompressionTask(t, b, r, seed) for t in teachers for b in budgets for r in REGIMES]


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


def adapt(theta: np.ndarray, pool: TaskPool, task: CompressionTask, steps: int, population: int = 8, sigma: float = 0.05,
          lr: float = 0.02, seed: int = 0) -> np.ndarray:
    """ES-MAML fast adaptation: ``steps`` ES steps on one task from the meta-learned weights."""
    es = ES(np.asarray(theta, dtype=np.float64), sigma=sigma, lr=lr, population=population, seed=seed)
    for _ in track(range(steps), "adapting policy", total=steps):
        es.tell([pool.reward(np.asarray(c), task) for c in es.ask()])
    return np.asarray(es.theta, dtype=np.float64)
