"""The baselines the source calls SGD / transfer learning, and the runner that compares them.

- ``joint``: pre-train one network on all meta-train data pooled together (every class at
  once, or points of many sinusoids), then fine-tune it on the new task's support set with the
  same SGD steps and learning rate the meta-learner gets at test time. For classification the
  pre-trained head (one output per meta-train class) is replaced by a zero-initialised N-way
  head; one SGD step on a zero head is a prototype-like classifier on the pre-trained features.
- ``no-adapt``: the meta-learned initialisation used as is (0 inner steps). For N-way tasks
  with shuffled labels this sits at chance, which is what adaptation must beat.

``ALGORITHMS``, ``build_learner``, ``meta_train`` and ``compare`` live here because they put a
meta-learner and its baselines on the same tasks, seeds and step budget; checkpoints of such runs
(what the ``meta-train`` / ``meta-eval`` commands write and read) are in ``meta.runner``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import replace_all_batch_norm_modules_

from metacompress.meta.errors import UserError
from metacompress.meta.maml import ANIL, FOMAML, MAML, MetaLearner, MetaSGD, head_names
from metacompress.meta.reptile import Reptile
from metacompress.meta.tasks import (
    Task,
    TaskDistribution,
    TaskType,
)

ALGORITHMS: dict[str, type[MetaLearner]] = {
    "maml": MAML, "fomaml": FOMAML, "metasgd": MetaSGD, "anil": ANIL, "reptile": Reptile,
}


def build_learner(algo: str, model: nn.Module, task_type: TaskType, **hp: Any) -> MetaLearner:
    """A meta-learner by name (``maml``, ``fomaml``, ``metasgd``, ``anil``, ``reptile``)."""
    if algo not in ALGORITHMS:
        raise UserError(f"unknown algorithm {algo!r}: use one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[algo](model, task_type, **hp)


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of its normal 95 % confidence interval (1.96 standard errors)."""
    v = values.double().flatten()
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(1.96 * v.std(unbiased=True) / math.sqrt(len(v)))


def meta_train(learner: MetaLearner, dist: TaskDistribution, meta_steps: int, meta_batch: int,
               seed: int, progress: Callable[[Iterable[int]], Iterable[int]] = iter,
               resume_from: dict[str, Any] | None = None,
               on_step: Callable[[list[float], torch.Generator], None] | None = None) -> list[float]:
    """``meta_steps`` outer updates on meta-batches drawn from ``dist``; returns the query losses.

    ``resume_from`` ({"history", "generator"}) continues a run at step ``len(history)`` with the
    task generator where it was; ``on_step(history, generator)`` runs after every step (checkpoints).
    """
    if meta_steps <= 0 or meta_batch <= 0:
        raise UserError(f"meta-steps and meta-batch must be positive, got {meta_steps} and {meta_batch}")
    g = torch.Generator().manual_seed(seed)
    history: list[float] = []
    if resume_from is not None:
        g.set_state(resume_from["generator"])
        history = list(resume_from["history"])
    for _ in progress(range(len(history), meta_steps)):
        history.append(learner.meta_step(dist.sample(meta_batch, g))["query_loss"])
        if on_step is not None:
            on_step(history, g)
    return history


def _replace_head(model: nn.Module, n_out: int) -> nn.Module:
    """A copy of ``model`` whose last linear layer is a fresh zero-initialised ``n_out`` head."""
    model = copy.deepcopy(model)
    path = head_names(model)[0].rsplit(".", 1)[0]
    old = model.get_submodule(path)
    if not isinstance(old, nn.Linear):
        raise UserError(f"the model's last parametrised module {path!r} must be nn.Linear to swap heads")
    new = nn.Linear(old.in_features, n_out)
    nn.init.zeros_(new.weight)
    nn.init.zeros_(new.bias)
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model


class JointPretrain:
    """Transfer-learning baseline: one network trained on the pooled meta-train data.

    BatchNorm uses batch statistics (as the meta-learners do), so fine-tuning and evaluation see
    the same per-task normalisation.
    """

    def __init__(self, model: nn.Module, task_type: TaskType, lr: float = 1e-3) -> None:
        self.model = replace_all_batch_norm_modules_(copy.deepcopy(model))
        self.task_type: TaskType = task_type
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)

    def fit(self, dist: TaskDistribution, steps: int, batch_size: int, seed: int) -> list[float]:
        """``steps`` Adam steps on pooled batches; returns the training losses."""
        if steps <= 0:
            raise UserError(f"joint pre-training steps must be positive, got {steps}")
        g = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(steps):
            x, y = dist.joint_batch(batch_size, g)
            out = self.model(x)
            loss = F.mse_loss(out, y) if self.task_type == "regression" else F.cross_entropy(out, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.detach()))
        return losses

    def evaluate(self, tasks: list[Task], steps: int, lr: float, n_out: int) -> dict[str, torch.Tensor]:
        """Per-task query loss (and accuracy) after fine-tuning on each support set."""
        return finetune_evaluate(self.model, self.task_type, tasks, steps, lr, n_out)


def finetune_evaluate(model: nn.Module, task_type: TaskType, tasks: list[Task], steps: int, lr: float,
                      n_out: int) -> dict[str, torch.Tensor]:
    """Fine-tune all of ``model`` with ``steps`` SGD steps per task, score on the query set.

    A classifier whose output size is not ``n_out`` gets a new zero-initialised head first.
    """
    head = head_names(model)[0].rsplit(".", 1)[0]
    if task_type == "classification" and getattr(model.get_submodule(head), "out_features", n_out) != n_out:
        model = _replace_head(model, n_out)
    # A MetaLearner is only used for its (vmapped) SGD inner loop here; nothing is meta-trained.
    learner = MetaLearner(copy.deepcopy(model), task_type, inner_lr=lr)
    return learner.evaluate(tasks, steps)


def compare(learner: MetaLearner, joint: JointPretrain, dist: TaskDistribution, episodes: int,
            steps: int, seed: int, batch: int = 50) -> dict[str, dict[str, float]]:
    """Mean metric and 95 % CI of the learner, ``joint`` and ``no-adapt`` on the same episodes."""
    if episodes <= 1:
        raise UserError(f"episodes must be at least 2 for a confidence interval, got {episodes}")
    if steps <= 0:
        raise UserError(f"adaptation steps must be positive, got {steps}")
    g = torch.Generator().manual_seed(seed)
    metric = "mse" if learner.task_type == "regression" else "accuracy"
    key = "loss" if metric == "mse" else "accuracy"
    runs: dict[str, list[torch.Tensor]] = {learner.name: [], "joint": [], "no-adapt": []}
    for start in range(0, episodes, batch):
        tasks = dist.sample(min(batch, episodes - start), g)
        runs[learner.name].append(learner.evaluate(tasks, steps)[key])
        runs["joint"].append(joint.evaluate(tasks, steps, learner.inner_lr, dist.n_out)[key])
        runs["no-adapt"].append(learner.evaluate(tasks, 0)[key])
    results = {}
    for name, parts in runs.items():
        m, c = mean_ci95(torch.cat(parts))
        results[name] = {metric: m, "ci95": c}
    return results
