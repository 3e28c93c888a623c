"""Gradient-based meta-learning on ``torch.func``: MAML, first-order MAML, Meta-SGD and ANIL.

All learners share one interface (``MetaLearner``): build one from an ``nn.Module`` (copied: the
caller's module is never modified; the meta-learned one is ``learner.model``) and, optionally, a
``loss_fn(outputs, targets)`` of the user's (default: cross-entropy or MSE by task type);
``adapt(task, steps)`` returns the adapted model; ``meta_step(tasks)`` does one outer update and returns
metrics; ``evaluate(tasks, steps)`` gives per-task query loss (and accuracy) after adaptation.

Why ``torch.func``: the inner loop is a pure function of the parameters
(``functional_call`` + ``grad``), so the same code runs (a) second order, because ``grad``
composes with the outer autograd graph, (b) first order, by detaching the inner gradients, and
(c) over a whole meta-batch at once with ``vmap`` instead of a Python loop over tasks.

BatchNorm: the model's BN layers are switched to batch statistics only
(``torch.func.replace_all_batch_norm_modules_``), so each task is normalised with its own
statistics at meta-training and test time (the transductive setting of the MAML paper) and no
running buffer is mutated inside ``vmap``.

Memory: second-order MAML keeps every inner step's graph alive, so memory grows linearly with
the inner steps; ``first_order=True`` drops the inner graphs and bounds memory by one step.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

from metacompress.meta import distributed
from metacompress.meta.errors import UserError
from metacompress.meta.modules import load_state
from metacompress.meta.tasks import Task, TaskType, stack_tasks

Params = dict[str, torch.Tensor]
Vectorize = Literal["auto", "always", "never"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def head_names(model: nn.Module) -> list[str]:
    """Parameter names of the last module that owns parameters: the 'head' ANIL adapts."""
    last = None
    for name, mod in model.named_modules():
        if any(True for _ in mod.parameters(recurse=False)):
            last = name
    if last is None:
        raise UserError("the model has no parameters to adapt")
    prefix = f"{last}." if last else ""
    return [f"{prefix}{n}" for n, _ in model.get_submodule(last).named_parameters(recurse=False)]


def _check_steps(steps: int, what: str = "steps") -> int:
    if not isinstance(steps, int) or steps < 0:
        raise UserError(f"{what} must be a non-negative integer, got {steps!r}")
    return steps


class MetaLearner:
    """Shared machinery: functional forward/loss, the inner loop, evaluation, checkpoints.

    Subclasses define ``meta_step``. ``vectorize`` picks ``vmap`` over the meta-batch
    (``"always"``), a loop over tasks (``"never"``) or ``vmap`` with a permanent fallback to the
    loop the first time the model or the task shapes do not allow it (``"auto"``).
    """

    name = "base"

    def __init__(self, model: nn.Module, task_type: TaskType, inner_lr: float = 0.01,
                 outer_lr: float = 1e-3, inner_steps: int = 1, vectorize: Vectorize = "auto",
                 adapt_names: list[str] | None = None, loss_fn: LossFn | None = None) -> None:
        if task_type not in ("regression", "classification"):
            raise UserError(f"unknown task type {task_type!r}: use regression or classification")
        if not isinstance(inner_steps, int) or inner_steps <= 0:
            raise UserError(f"inner steps must be a positive integer, got {inner_steps!r}")
        if inner_lr <= 0 or outer_lr <= 0:
            raise UserError(f"learning rates must be positive, got inner {inner_lr}, outer {outer_lr}")
        if vectorize not in ("auto", "always", "never"):
            raise UserError(f"vectorize must be auto, always or never, got {vectorize!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise UserError(f"loss_fn must be callable (outputs, targets) -> loss, got {type(loss_fn).__name__}")
        self.model = replace_all_batch_norm_modules_(copy.deepcopy(model))
        self.loss_fn = loss_fn
        self.task_type: TaskType = task_type
        self.inner_lr, self.outer_lr, self.inner_steps = float(inner_lr), float(outer_lr), inner_steps
        self.vectorize: Vectorize = vectorize
        self.params: Params = dict(self.model.named_parameters())
        self.buffers: Params = dict(self.model.named_buffers())
        names = adapt_names if adapt_names is not None else list(self.params)
        unknown = sorted(set(names) - set(self.params))
        if unknown:
            raise UserError(f"unknown parameter names to adapt: {', '.join(unknown)}")
        self.adapt_names = names
        self.inner_lrs: dict[str, Any] = {n: self.inner_lr for n in names}

    # ----- functional pieces -------------------------------------------------------------
    def _forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (params, self.buffers), (x,))

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(out, y)
        if self.task_type == "regression":
            return F.mse_loss(out, y)
        return F.cross_entropy(out, y)

    def _accuracy(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task_type == "regression":
            return torch.zeros((), dtype=out.dtype)
        return (out.argmax(-1) == y).to(out.dtype).mean()

    def inner_loop(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int,
                   create_graph: bool, lrs: dict[str, Any] | None = None) -> Params:
        """``steps`` SGD steps on (x, y) from ``params``; returns the full adapted parameter dict.

        With ``create_graph`` the result stays differentiable through the inner gradients
        (second order); otherwise they are detached (first order: the result still depends on
        ``params`` through the identity path only).
        """
        lrs = self.inner_lrs if lrs is None else lrs
        frozen = {k: v for k, v in params.items() if k not in lrs}
        fast = {k: params[k] for k in lrs}

        def support_loss(f: Params) -> torch.Tensor:
            return self._loss(self._forward({**frozen, **f}, x), y)

        for _ in range(steps):
            g = grad(support_loss)(fast)
            if not create_graph:
                g = {k: v.detach() for k, v in g.items()}
            fast = {k: fast[k] - lrs[k] * g[k] for k in fast}
        return {**frozen, **fast}

    def _task_query(self, params: Params, lrs: dict[str, Any], xs: torch.Tensor, ys: torch.Tensor,
                    xq: torch.Tensor, yq: torch.Tensor, steps: int, create_graph: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        fast = self.inner_loop(params, xs, ys, steps, create_graph, lrs)
        out = self._forward(fast, xq)
        return self._loss(out, yq), self._accuracy(out, yq)

    def _map_tasks(self, fn: Any, tasks: list[Task], shared: tuple) -> tuple[torch.Tensor, ...]:
        """Apply ``fn(*shared, xs, ys, xq, yq)`` to every task: ``vmap`` where possible, else a loop."""
        stacked = stack_tasks(tasks) if self.vectorize != "never" else None
        if stacked is None and self.vectorize == "always":
            raise UserError("vectorize='always' needs tasks of identical shapes")
        if stacked is not None:
            in_dims = (None,) * len(shared) + (0, 0, 0, 0)
            args = (*shared, stacked.x_support, stacked.y_support, stacked.x_query, stacked.y_query)
            try:
                return vmap(fn, in_dims=in_dims, randomness="different")(*args)
            except RuntimeError:
                if self.vectorize == "always":
                    raise
                self.vectorize = "never"  # the model does not support vmap: loop from now on
        outs = [fn(*shared, t.x_support, t.y_support, t.x_query, t.y_query) for t in tasks]
        return tuple(torch.stack(o) for o in zip(*outs))

    # ----- public interface ---------------------------------------------------------------
    def adapt(self, task: Task, steps: int | None = None) -> nn.Module:
        """A copy of the model adapted to ``task``'s support set (``steps`` inner steps)."""
        steps = self.inner_steps if steps is None else _check_steps(steps)
        with torch.no_grad():
            fast = self.inner_loop({k: v.detach() for k, v in self.params.items()},
                                   task.x_support, task.y_support, steps, create_graph=False,
                                   lrs={k: _detach(v) for k, v in self.inner_lrs.items()})
            adapted = copy.deepcopy(self.model)
            for name, p in adapted.named_parameters():
                p.copy_(fast[name])
        return adapted

    def evaluate(self, tasks: list[Task], steps: int | None = None) -> dict[str, torch.Tensor]:
        """Per-task query ``loss`` (and ``accuracy``) after ``steps`` inner steps (0: no adaptation)."""
        steps = self.inner_steps if steps is None else _check_steps(steps)
        params = {k: v.detach() for k, v in self.params.items()}
        lrs = {k: _detach(v) for k, v in self.inner_lrs.items()}

        def fn(p: Params, lr: dict, xs, ys, xq, yq):
            return self._task_query(p, lr, xs, ys, xq, yq, steps, create_graph=False)

        with torch.no_grad():
            loss, acc = self._map_tasks(fn, tasks, (params, lrs))
        out = {"loss": loss}
        if self.task_type == "classification":
            out["accuracy"] = acc
        return out

    def meta_step(self, tasks: list[Task]) -> dict[str, float]:
        raise NotImplementedError  # pragma: no cover - every learner defines its outer update

    def _metrics(self, loss: torch.Tensor, acc: torch.Tensor, total: int) -> dict[str, float]:
        """Query loss (and accuracy) summed over this shard's tasks, divided by the batch size."""
        metrics = {"query_loss": float(loss.sum()) / total}
        if self.task_type == "classification":
            metrics["query_accuracy"] = float(acc.sum()) / total
        return metrics

    def config(self) -> dict[str, Any]:
        """Plain settings needed to rebuild this learner (stored in checkpoints)."""
        return {"algo": self.name, "task_type": self.task_type, "inner_lr": self.inner_lr,
                "outer_lr": self.outer_lr, "inner_steps": self.inner_steps,
                "adapt_names": list(self.adapt_names)}

    def state_dict(self) -> dict[str, Any]:
        """Weights, learned inner learning rates and optimizer state: tensors and numbers only."""
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "inner_lrs": {k: _detach(v) for k, v in self.inner_lrs.items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_state(self.model, state["model"])
        with torch.no_grad():
            for k, v in state["inner_lrs"].items():
                if isinstance(self.inner_lrs[k], torch.Tensor):
                    self.inner_lrs[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])


def _detach(v: Any) -> Any:
    return v.detach() if isinstance(v, torch.Tensor) else v


def _global_metrics(local: dict[str, float]) -> dict[str, float]:
    """Sum per-rank metrics that are already divided by the global batch size (one all-reduce)."""
    names = sorted(local)
    t = distributed.all_reduce_sum(torch.tensor([local[k] for k in names], dtype=torch.float64), "metric all-reduce")
    return dict(zip(names, t.tolist()))


class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning (Finn et al., 2017): learn an init that adapts in a few steps.

    ``first_order=True`` is FOMAML (inner gradients treated as constants: memory flat in the
    number of inner steps). ``learn_inner_lr=True`` is Meta-SGD (a learned learning rate per
    parameter entry). ``adapt_names`` restricts the inner loop to some parameters (ANIL).
    """

    name = "maml"

    def __init__(self, model: nn.Module, task_type: TaskType, inner_lr: float = 0.01,
                 outer_lr: float = 1e-3, inner_steps: int = 1, first_order: bool = False,
                 learn_inner_lr: bool = False, adapt_names: list[str] | None = None,
                 vectorize: Vectorize = "auto", loss_fn: LossFn | None = None) -> None:
        super().__init__(model, task_type, inner_lr, outer_lr, inner_steps, vectorize, adapt_names, loss_fn)
        self.first_order, self.learn_inner_lr = first_order, learn_inner_lr
        if learn_inner_lr:
            self.inner_lrs = {n: nn.Parameter(torch.full_like(self.params[n], self.inner_lr))
                              for n in self.adapt_names}
        learned = [v for v in self.inner_lrs.values() if isinstance(v, torch.Tensor)]
        self.optimizer = torch.optim.Adam([*self.params.values(), *learned], lr=self.outer_lr)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "first_order": self.first_order, "learn_inner_lr": self.learn_inner_lr}

    def meta_gradients(self, tasks: list[Task], total: int | None = None) -> dict[str, float]:
        """Accumulate the meta-gradient of the query loss into ``.grad``: summed over ``tasks`` and
        divided by ``total`` (default ``len(tasks)``: the mean), so that a rank's shard of a
        meta-batch of ``total`` tasks contributes its part of the batch's mean.

        The metrics are sums over ``tasks`` divided by ``total`` as well (see ``_metrics``).
        """
        steps, create_graph = self.inner_steps, not self.first_order
        total = len(tasks) if total is None else total

        def fn(p: Params, lr: dict, xs, ys, xq, yq):
            return self._task_query(p, lr, xs, ys, xq, yq, steps, create_graph)

        self.optimizer.zero_grad(set_to_none=True)
        if not tasks:  # an empty shard: zero gradients, so that the all-reduce still matches
            return self._metrics(torch.zeros(0), torch.zeros(0), total)
        loss, acc = self._map_tasks(fn, tasks, (self.params, self.inner_lrs))
        (loss.sum() / total).backward()
        return self._metrics(loss.detach(), acc.detach(), total)

    def meta_step(self, tasks: list[Task]) -> dict[str, float]:
        """One outer Adam step on the meta-batch; with a process group each rank computes its shard
        and the meta-gradients are summed across ranks (every rank then takes the same step)."""
        metrics = self.meta_gradients(distributed.shard(tasks), total=len(tasks))
        distributed.sum_gradients(self.optimizer)
        self.optimizer.step()
        return _global_metrics(metrics)


class FOMAML(MAML):
    """First-order MAML: the meta-gradient is the query gradient at the adapted parameters."""

    name = "fomaml"

    def __init__(self, model: nn.Module, task_type: TaskType, **kw: Any) -> None:
        super().__init__(model, task_type, first_order=True, **kw)


class MetaSGD(MAML):
    """Meta-SGD (Li et al., 2017): MAML that also learns a per-parameter inner learning rate."""

    name = "metasgd"

    def __init__(self, model: nn.Module, task_type: TaskType, **kw: Any) -> None:
        super().__init__(model, task_type, learn_inner_lr=True, **kw)


class ANIL(MAML):
    """Almost No Inner Loop (Raghu et al., 2020): adapt only the head; the body is meta-learned."""

    name = "anil"

    def __init__(self, model: nn.Module, task_type: TaskType, head: list[str] | None = None,
                 **kw: Any) -> None:
        super().__init__(model, task_type, adapt_names=head or head_names(model), **kw)
