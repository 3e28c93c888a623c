"""Compression tasks: what the policy is meta-trained and judged on.

A task is (dense teacher = architecture x dataset x seed, budget, repair regime). Teachers are
trained once and cached on disk (``METACOMPRESS_CACHE``, default ``~/.cache/metacompress``);
everything derived from a teacher (pruning space, group features, the uniform baseline's
score) is cached in memory by ``TaskPool``. The reward of an allocation on a task is its
validation accuracy after repair minus the uniform allocation's with the default repair,
on the same task and seed: paired, so most of the noise cancels.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from metacompress.compress.distill import RepairConfig, repair
from metacompress.compress.groups import KINDS
from metacompress.compress.prune import PruningSpace
from metacompress.compress.rules import CHANNEL_IMPORTANCE, RULES, rule_allocation
from metacompress.data import Dataset, load_dataset
from metacompress.io import load_weights, save_torch
from metacompress.meta.modules import load_state
from metacompress.policy.features import ExpertAllocations, policy_inputs
from metacompress.policy.network import EXPERT_RULES, REGIMES, decide
from metacompress.training import accuracy, accuracy_and_loss, train_dense
from metacompress.zoo import build_model

REGIME_STEPS = {"bn": (0, None), "short": (20, None), "few": (50, 10), "generous": (150, None)}


def regime_config(regime: str, defaults: RepairConfig | None = None) -> RepairConfig:
    """The default repair settings, with the steps and data of a regime."""
    steps, k = REGIME_STEPS[regime]
    return replace(defaults or RepairConfig(), steps=steps, samples_per_class=k)


@dataclass(frozen=True)
class Teacher:
    model: str
    data: str
    kwargs: tuple = ()
    seed: int = 0

    @property
    def key(self) -> str:
        text = json.dumps([self.model, self.data, list(self.kwargs), self.seed])
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def label(self) -> str:
        kw = ",".join(f"{k}={v}" for k, v in self.kwargs)
        return f"{self.model}({kw})@{self.data}" if kw else f"{self.model}@{self.data}"


class Score(NamedTuple):
    """One repaired student's accuracy on the validation and test splits, validation loss, and
    which validation images it gets right (for the guard's paired test)."""

    val: float
    test: float
    val_loss: float
    val_correct: np.ndarray


@dataclass(frozen=True)
class CompressionTask:
    teacher: Teacher
    budget: float
    regime: str
    seed: int = 0


def cache_dir() -> Path:
    return Path(os.environ.get("METACOMPRESS_CACHE", Path.home() / ".cache" / "metacompress"))


def load_teacher(t: Teacher, data: Dataset, epochs: int = 20) -> nn.Module:
    """The trained dense model of ``t``: from the disk cache, or trained now and cached."""
    torch.manual_seed(t.seed)
    model = build_model(t.model, data.input_shape, data.num_classes, data.mean, data.std, **dict(t.kwargs))
    path = cache_dir() / "teachers" / f"{t.key}.pt"
    if path.is_file():
        load_state(model, load_weights(path))
    else:
        train_dense(model, data, epochs=epochs, seed=t.seed, progress=False)
        save_torch(model.state_dict(), path)
    return model.eval()


@dataclass
class Context:
    """Everything about one teacher that every task on it reuses."""

    teacher: Teacher
    data: Dataset
    model: nn.Module
    space: PruningSpace
    features: np.ndarray
    dense_val: float
    dense_test: float
    experts: ExpertAllocations
    baseline: dict = field(default_factory=dict)


class TaskPool:
    """Builds and caches teacher contexts; evaluates allocations on tasks."""

    def __init__(self, defaults: RepairConfig | None = None, kinds_seen: tuple[str, ...] | None = None,
                 score_test: bool = True) -> None:
        self.defaults = defaults or RepairConfig()
        self.kinds_seen = kinds_seen  # of the policy being judged (see network.decide)
        self.score_test = score_test  # off in meta-training, whose rewards read validation only (test: nan)
        self._contexts: dict[Teacher, Context] = {}
        self._data: dict[str, Dataset] = {}

    def context(self, t: Teacher) -> Context:
        if t not in self._contexts:
            if t.data not in self._data:
                self._data[t.data] = load_dataset(t.data)
            data = self._data[t.data]
            model = load_teacher(t, data)
            space = PruningSpace(model, data.x_train[:1], data.num_classes)
            calib = data.calibration_batch(128, 0)
            feats, experts = policy_inputs(model, space, calib, EXPERT_RULES)
            self._contexts[t] = Context(t, data, model, space, feats, accuracy(model, data.x_val, data.y_val),
                                        accuracy(model, data.x_test, data.y_test), experts)
        return self._contexts[t]

    def register(self, teacher: Teacher, ctx: Context) -> None:
        """Use an already prepared model (e.g. the user's own) as the teacher of ``teacher``."""
        self._contexts[teacher] = ctx

    def run(self, task: CompressionTask, keep: list[int], importance: str, cfg: RepairConfig) -> Score:
        """Prune the teacher to ``keep``, repair with ``cfg``; validation and test accuracy."""
        ctx = self.context(task.teacher)
        calib = ctx.data.calibration_batch(128, task.seed)
        student = ctx.space.apply(copy.deepcopy(ctx.model), keep, importance, calib=calib)
        repair(student, ctx.model, ctx.data, cfg, seed=task.seed, progress=False)
        val, val_loss, correct = accuracy_and_loss(student, ctx.data.x_val, ctx.data.y_val)
        test = accuracy(student, ctx.data.x_test, ctx.data.y_test) if self.score_test else float("nan")
        return Score(val, test, val_loss, correct)

    def budget(self, task: CompressionTask) -> float:
        """The task's budget, raised to what its teacher can reach (sampled budgets may be below)."""
        return max(task.budget, round(self.context(task.teacher).space.floor() * 1.02 + 0.005, 3))

    def rule(self, task: CompressionTask, rule: str, cfg: RepairConfig | None = None) -> Score:
        """A built-in allocation with the default repair settings of the task's regime."""
        ctx = self.context(task.teacher)
        cfg = cfg or regime_config(task.regime, self.defaults)
        calib = ctx.data.calibration_batch(128, task.seed)
        keep = ctx.space.project(rule_allocation(rule, ctx.space, ctx.model, calib), self.budget(task))
        return self.run(task, keep, CHANNEL_IMPORTANCE[rule], cfg)

    def expert(self, task: CompressionTask, name: str) -> Score:
        """One of the policy's experts alone (e.g. ``sensitivity``), with the default repair settings."""
        ctx = self.context(task.teacher)
        keep = ctx.space.project(ctx.experts.allocation(name), self.budget(task))
        return self.run(task, keep, "magnitude", regime_config(task.regime, self.defaults))

    def baseline(self, task: CompressionTask) -> Score:
        """Uniform allocation with default repair (cached): what rewards are measured against."""
        ctx = self.context(task.teacher)
        key = (task.budget, task.regime, task.seed)
        if key not in ctx.baseline:
            ctx.baseline[key] = self.rule(task, "uniform")
        return ctx.baseline[key]

    def policy(self, theta: np.ndarray, task: CompressionTask, learned_repair: bool = True) -> Score:
        """The policy's allocation (and, unless ``learned_repair`` is off, repair settings) on ``task``."""
        ctx = self.context(task.teacher)
        base = regime_config(task.regime, self.defaults)
        budget = self.budget(task)
        decision = decide(theta, ctx.features, budget, base, ctx.experts.ratios(budget), self.kinds_seen)
        keep = ctx.space.project(decision.ratio_fn(), budget)
        return self.run(task, keep, "magnitude", decision.repair if learned_repair else base)

    def reward(self, theta: np.ndarray, task: CompressionTask, learned_repair: bool = True) -> float:
        """Validation accuracy of the policy on ``task`` minus the uniform baseline's (with the
        default repair settings instead of the policy's when ``learned_repair`` is off)."""
        return self.policy(theta, task, learned_repair)[0] - self.baseline(task)[0]


@dataclass
class CompressionTaskSampler:
    """Teachers x budgets x regimes, sampled with a seeded generator."""

    teachers: list[Teacher]
    budgets: tuple[float, float] = (0.1, 0.7)
    regimes: tuple[str, ...] = REGIMES
    regime_weights: tuple[float, ...] | None = None
    task_seeds: int = 4

    def sample(self, rng: np.random.Generator, n: int) -> list[CompressionTask]:
        w = np.asarray(self.regime_weights or [1.0] * len(self.regimes), dtype=float)
        tasks = []
        for _ in range(n):
            t = self.teachers[rng.integers(len(self.teachers))]
            b = float(np.round(rng.uniform(*self.budgets), 2))
            r = self.regimes[rng.choice(len(self.regimes), p=w / w.sum())]
            tasks.append(CompressionTask(t, b, r, int(rng.integers(self.task_seeds))))
        return tasks


def teachers_from(spec: list[dict[str, Any]]) -> list[Teacher]:
    """Teachers from a recipe: [{model, data: [..], kwargs: [{..}, ..]}, ...] (cross product)."""
    out = []
    for entry in spec:
        datas = entry["data"] if isinstance(entry["data"], list) else [entry["data"]]
        kwarg_sets = entry.get("kwargs") or [{}]
        for d in datas:
            for kw in kwarg_sets:
                out.append(Teacher(entry["model"], d, tuple(sorted(kw.items())), int(entry.get("seed", 0))))
    return out


def kinds_seen(teachers: list[Teacher]) -> tuple[str, ...]:
    """The group kinds these teachers' architectures have (what a policy trained on them met)."""
    kinds: set[str] = set()
    datasets = {d: load_dataset(d) for d in {t.data for t in teachers}}
    for t in teachers:
        data = datasets[t.data]
        model = build_model(t.model, data.input_shape, data.num_classes, data.mean, data.std, **dict(t.kwargs))
        kinds |= {g.kind for g in PruningSpace(model.eval(), data.x_train[:1], data.num_classes).groups}
    return tuple(k for k in KINDS if k in kinds)


__all__ = ["RULES", "Score", "CompressionTask", "CompressionTaskSampler", "TaskPool", "Teacher", "kinds_seen",
           "regime_config", "teachers_from"]
