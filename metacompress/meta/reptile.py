"""Reptile (Nichol et al., 2018): move the init towards each task's adapted weights.

No second derivatives and no query loss in the outer update: the meta-gradient is the mean of
``theta - phi_task`` where ``phi_task`` is ``inner_steps`` SGD steps on the task's support set.
That makes it the cheapest learner per step and the easiest to scale; ``vmap`` runs all the
tasks' inner loops at once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metacompress.meta import distributed
from metacompress.meta.maml import MetaLearner, Params, Vectorize, _global_metrics
from metacompress.meta.tasks import Task, TaskType


def reptile_step(optimizer: torch.optim.Optimizer, params: Params, deltas: Params) -> None:
    """Reptile's outer update: each parameter's ``.grad`` becomes its task-averaged ``theta - phi``
    (averaged across ranks too), then ``optimizer`` steps. SGD with step size epsilon is Reptile's
    interpolation towards the adapted weights; Adam rescales the same direction per entry."""
    for name, d in deltas.items():
        params[name].grad = d
    distributed.average_gradients(optimizer)
    optimizer.step()


class Reptile(MetaLearner):
    """Reptile with SGD inner steps; the outer update is plain SGD with step size ``outer_lr``.

    ``outer_lr`` is Reptile's epsilon (interpolation towards the adapted weights), so values
    around 0.1-1 are usual, unlike MAML's Adam learning rate.
    """

    name = "reptile"

    def __init__(self, model: nn.Module, task_type: TaskType, inner_lr: float = 0.01,
                 outer_lr: float = 0.1, inner_steps: int = 5, vectorize: Vectorize = "auto") -> None:
        super().__init__(model, task_type, inner_lr, outer_lr, inner_steps, vectorize)
        self.optimizer = torch.optim.SGD(list(self.params.values()), lr=self.outer_lr)

    def meta_step(self, tasks: list[Task]) -> dict[str, float]:
        """Set ``.grad = theta - mean(phi)`` and take one SGD step; with a process group each rank
        adapts on its shard and the summed differences are added up across ranks."""
        steps, total = self.inner_steps, len(tasks)
        shard = distributed.shard(tasks)
        params = {k: v.detach() for k, v in self.params.items()}

        def fn(p: Params, lr: dict[str, Any], xs, ys, xq, yq):
            fast = self.inner_loop(p, xs, ys, steps, False, lr)
            out = self._forward(fast, xq)
            return (self._loss(out, yq), self._accuracy(out, yq),
                    *(p[k] - fast[k] for k in self.adapt_names))

        self.optimizer.zero_grad(set_to_none=True)
        if shard:
            with torch.no_grad():
                loss, acc, *deltas = self._map_tasks(fn, shard, (params, self.inner_lrs))
            for name, d in zip(self.adapt_names, deltas):
                self.params[name].grad = d.sum(0) / total
            metrics = self._metrics(loss, acc, total)
        else:
            metrics = self._metrics(torch.zeros(0), torch.zeros(0), total)
        distributed.sum_gradients(self.optimizer)
        self.optimizer.step()
        return _global_metrics(metrics)
