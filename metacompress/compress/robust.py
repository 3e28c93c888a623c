"""Prune-robust meta-training: a dense model whose sub-networks are good right after pruning.

"Model repair" across a task space: a task is a pruning configuration (a budget drawn from a range
and an allocation: one handed in, or a random perturbation of it), and the meta-objective is the
sub-network's loss after ``k`` repair steps. The learner is Reptile (first order, so affordable on
a CPU): per task the dense weights are copied, the task's channel masks applied (``masks.py``:
nothing is removed during training) and ``k`` SGD steps of distillation from the dense teacher
taken; the outer update moves the dense weights along the task-weighted ``theta - phi``
(``meta.reptile.reptile_step``: SGD with step size epsilon, decayed by a cosine). Adam as the
outer optimizer was tried and dropped: the dense task's delta is near zero (the dense model is its
own teacher), and Adam rescales that noise to full-size steps, which cost the dense model 5-10
points within a few steps on LeNet-5 (BENCHMARKS.md).

Choices, in the spirit of slimmable / once-for-all training:
- sandwich rule: every outer step trains the smallest and the largest budget of the range plus
  random ones in between, and the dense model itself as one more task with half the weight of the
  update (``dense_weight``), so that the extremes (the worst-served sub-networks) and the dense
  accuracy are pulled on at every step;
- distillation from the full network: every task distills from the dense model as it was given
  (frozen, its logits computed once for the whole training split), not from the moving full
  network (in-place distillation): the dense model must stay within ``max_drop`` of its given
  accuracy anyway, so it is the better target, and a cached target costs nothing per step;
- channels are chosen as deployment chooses them (L2 group magnitude of the current weights,
  re-scored every outer step), so the channels trained to be dropped are the ones that will be.

Dense accuracy floor: the dense model is re-checked on the validation split (after BatchNorm
recalibration, since masked passes disturb the running statistics) ``checks`` times along the run.
A check more than ``max_drop`` below the given model is answered at once with dense-only
distillation steps from the given model (up to ``restore_steps``, checked ``restore_checks``
times) until the accuracy is back over the floor, and the run continues from there: the
sub-network tasks drift the dense model by a few validation images, and a few dense steps bring
it back at little cost to what the outer steps gave the sub-networks. Without them the run would
drift on and the floor could only return an early state; raising the dense task's share of the
update after a failed check instead cost the sub-networks more (BENCHMARKS.md). The result is
the last checked state within the floor; if there is none, the given weights come back unchanged
with a warning: robustify never returns a worse dense model.

``compress`` knows nothing of the policy: allocations are callables ``budget -> units kept per
group`` passed in (the pipeline wires the meta-learned policy and the fixed rules).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from metacompress.compress.distill import distill_loss, recalibrate_bn
from metacompress.compress.groups import build_graph
from metacompress.compress.importance import unit_scores
from metacompress.compress.masks import ChannelMasks, Params, masked
from metacompress.compress.prune import BUDGET_TOL, MAX_RATIO, Metric, PruningSpace
from metacompress.data import Dataset
from metacompress.errors import UserError
from metacompress.meta.modules import load_state
from metacompress.meta.reptile import reptile_step
from metacompress.progress import track
from metacompress.training import accuracy, predict

Allocation = Callable[[float], Sequence[int]]  # budget (kept fraction of the cost) -> units kept per group


@dataclass
class RobustConfig:
    """How a dense model is made prune-robust."""

    budgets: tuple[float, float] = (0.15, 0.7)  # kept fraction of the cost, smallest and largest
    steps: int = 100            # outer (Reptile) steps
    inner_steps: int = 3        # k repair steps per task
    tasks: int = 3              # sub-network tasks per outer step, smallest and largest budget included
    dense_weight: float = 0.5   # share of the dense model's own task in the outer update
    inner_lr: float = 0.02      # SGD, the inner repair
    outer_lr: float = 1.0       # Reptile's epsilon (SGD on theta - phi), cosine decay over ``steps``
    temperature: float = 4.0
    alpha: float = 0.9          # mostly the teacher's soft targets: the sub-networks should keep its function
    batch_size: int = 64
    perturb: float = 0.5        # std of the log-normal noise on the allocation's per-group ratios
    max_drop: float = 0.005     # the dense validation accuracy may fall at most this much
    checks: int = 10            # dense-accuracy checks along the run (the last safe state is kept)
    restore_steps: int = 30     # at most this many dense-only SGD steps (``inner_lr``) after a failed check
    restore_checks: int = 3     # dense-accuracy checks along those steps
    bn_samples: int = 2048

    def validate(self) -> "RobustConfig":
        lo, hi = self.budgets
        if not (0.0 < lo <= 1.0 and 0.0 < hi <= 1.0):
            raise UserError(f"budget range must lie in (0, 1], got {lo:g}-{hi:g}")
        if lo > hi:
            raise UserError(f"budget range must be smallest-largest, got {lo:g}-{hi:g}")
        if self.inner_steps < 1:
            raise UserError(f"inner steps must be >= 1, got {self.inner_steps}")
        if self.steps < 1:
            raise UserError(f"outer steps must be >= 1, got {self.steps}")
        if self.tasks < 2:
            raise UserError(f"tasks per step must be >= 2 (the smallest and the largest budget), got {self.tasks}")
        if not (self.inner_lr > 0 and self.outer_lr > 0):
            raise UserError("learning rates must be > 0")
        if not 0.0 <= self.dense_weight < 1.0:
            raise UserError(f"dense weight must be in [0, 1), got {self.dense_weight:g}")
        if self.batch_size < 2 or self.checks < 1 or self.perturb < 0 or self.max_drop < 0:
            raise UserError("batch size must be >= 2, checks >= 1, perturb and max_drop >= 0")
        if self.restore_steps < 0 or self.restore_checks < 1:
            raise UserError("restore steps must be >= 0 and restore checks >= 1")
        return self


def parse_budgets(text: str) -> tuple[float, float]:
    """``"0.15-0.7"`` (or one value ``"0.3"``) as (smallest, largest) kept fraction."""
    parts = text.split("-")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"budget range must look like 0.15-0.7, got '{text}'") from None
    if len(values) not in (1, 2) or not all(math.isfinite(v) for v in values):
        raise UserError(f"budget range must look like 0.15-0.7, got '{text}'")
    lo, hi = values[0], values[-1]
    RobustConfig(budgets=(lo, hi)).validate()
    return lo, hi


@dataclass
class RobustResult:
    """What robustify did: dense accuracy before and after, which state was kept, the cost."""

    dense_val_before: float
    dense_val_after: float
    kept_step: int              # outer steps in the returned weights (0: the given weights came back)
    steps: int
    tasks_per_step: int
    forward_backward: int       # batches of forward + backward spent (for equal-compute comparisons)
    seconds: float
    checks: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    restored_by: int = 0        # dense-only steps that brought failed checks back over the floor (0: none needed)

    def to_dict(self) -> dict:
        return asdict(self)


def perturb_keep(space: PruningSpace, keep: Sequence[int], budget: float, sigma: float,
                 rng: np.random.Generator, metric: Metric = "macs") -> list[int]:
    """Another allocation near ``keep`` at the same budget: its per-group pruning ratios scaled by
    log-normal noise, projected back onto the budget (the shape is kept, the mix is not)."""
    ratios = np.array([1.0 - k / g.channels for k, g in zip(keep, space.groups)])
    weights = (ratios + 0.05) * np.exp(sigma * rng.standard_normal(len(ratios)))
    weights = weights / weights.max()
    return space.project(lambda s: list(np.minimum(MAX_RATIO, 2 * s * MAX_RATIO * weights)), budget, metric)


class TaskSampler:
    """Draws the sub-network tasks of one outer step: (budget, units kept per group)."""

    def __init__(self, space: PruningSpace, allocations: Sequence[Allocation], cfg: RobustConfig,
                 metric: Metric, seed: int):
        self.space, self.allocations, self.cfg, self.metric = space, list(allocations), cfg, metric
        self.rng = np.random.default_rng(seed)

    def draw(self) -> list[tuple[float, list[int]]]:
        lo, hi = self.cfg.budgets
        budgets = [lo, hi] + list(self.rng.uniform(lo, hi, self.cfg.tasks - 2))
        out = []
        for i, b in enumerate(budgets):
            keep = list(self.allocations[int(self.rng.integers(len(self.allocations)))](float(b)))
            if len(keep) != len(self.space.groups):
                raise ValueError(f"an allocation gave {len(keep)} keep counts for {len(self.space.groups)} groups")
            if i >= 2 and self.cfg.perturb > 0:  # the extremes keep the allocation as deployed
                keep = perturb_keep(self.space, keep, float(b), self.cfg.perturb, self.rng, self.metric)
            out.append((float(b), keep))
        return out


def _inner(model: nn.Module, theta: Params, masks: Params, batches: Callable, cfg: RobustConfig) -> Params:
    """``k`` SGD distillation steps of the masked sub-network from ``theta``; returns ``theta - phi``."""
    phi = {n: p.detach().clone().requires_grad_(True) for n, p in theta.items()}
    opt = torch.optim.SGD(list(phi.values()), lr=cfg.inner_lr)
    for _ in range(cfg.inner_steps):
        x, y, t = batches()
        loss = distill_loss(functional_call(model, masked(phi, masks), (x,)), t, y, cfg.temperature, cfg.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {n: theta[n].detach() - phi[n].detach() for n in theta}


def _check_floor(space: PruningSpace, cfg: RobustConfig, allocations: Sequence[Allocation], metric: Metric) -> None:
    """Refuse a range whose smallest budget pruning cannot reach (as ``project`` would, per task)."""
    lo = cfg.budgets[0]
    floor = space.floor(metric)
    if floor > lo * (1 + BUDGET_TOL):
        raise UserError(f"smallest budget {lo:g} lies below what pruning can reach on this model: pruning every "
                        f"group to its limit keeps {floor:.3f}; ask for >= {floor:.2f}")
    if not allocations:
        raise ValueError("robustify needs at least one allocation")


def robustify(model: nn.Module, data: Dataset, space: PruningSpace, allocations: Sequence[Allocation],
              cfg: RobustConfig, metric: Metric = "macs", seed: int = 0, progress: bool = True) -> RobustResult:
    """Meta-train ``model`` in place so that its sub-networks across ``cfg.budgets`` are good after
    pruning and a few repair steps; the dense validation accuracy falls by at most ``cfg.max_drop``."""
    cfg.validate()
    _check_floor(space, cfg, allocations, metric)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    teacher_logits = predict(model, data.x_train)
    given = copy.deepcopy(model.state_dict())
    before = accuracy(model, data.x_val, data.y_val)
    masks = ChannelMasks(model, space)
    dg = build_graph(model, space.example)
    sampler = TaskSampler(space, allocations, cfg, metric, seed)
    theta = dict(model.named_parameters())
    opt = torch.optim.SGD(list(theta.values()), lr=cfg.outer_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    bs = min(cfg.batch_size, len(data.x_train))

    def batches():
        idx = torch.randint(len(data.x_train), (bs,), generator=g)
        return data.x_train[idx], data.y_train[idx], teacher_logits[idx]

    check_at = {round(cfg.steps * (i + 1) / cfg.checks) for i in range(cfg.checks)}
    floor = before - cfg.max_drop - 1e-9
    kept, checks, spent, restored = (0, given, before), [], 0, 0
    for step in track(range(1, cfg.steps + 1), "robustifying", total=cfg.steps) if progress else range(1, cfg.steps + 1):
        scores = unit_scores(model, space.groups, "magnitude", dg=dg)
        tasks = [masks.param_masks(masks.unit_masks(keep, scores)) for _, keep in sampler.draw()]
        model.train()
        deltas = [_inner(model, theta, m, batches, cfg) for m in [{}] + tasks]  # the dense model is a task too
        w = [cfg.dense_weight] + [(1 - cfg.dense_weight) / len(tasks)] * len(tasks)
        reptile_step(opt, theta, {n: sum(wi * d[n] for wi, d in zip(w, deltas)) for n in theta})
        sched.step()
        if step in check_at:
            acc = _dense_accuracy(model, data, cfg, seed)
            checks.append({"step": step, "dense_val_accuracy": acc})
            if acc < floor and cfg.restore_steps > 0:
                taken, back = _restore(model, batches, cfg, data, floor, seed, checks, step)
                spent, restored = spent + taken, restored + (taken if back is not None else 0)
                acc = back if back is not None else acc
            if acc >= floor:
                kept = (step, copy.deepcopy(model.state_dict()), acc)
    load_state(model, kept[1])
    model.eval()
    return RobustResult(before, kept[2], kept[0], cfg.steps, cfg.tasks + 1,
                        cfg.steps * (cfg.tasks + 1) * cfg.inner_steps + spent, round(time.perf_counter() - t0, 2),
                        checks, _floor_warnings(kept[0], checks, before, cfg, len(data.y_val)), restored)


def _dense_accuracy(model: nn.Module, data: Dataset, cfg: RobustConfig, seed: int) -> float:
    """Dense validation accuracy after BatchNorm recalibration (masked passes disturb the running
    statistics)."""
    recalibrate_bn(model, data.x_train, cfg.bn_samples, seed=seed)
    return accuracy(model, data.x_val, data.y_val)


def _restore(model: nn.Module, batches: Callable, cfg: RobustConfig, data: Dataset, floor: float, seed: int,
             checks: list[dict], at_step: int) -> tuple[int, float | None]:
    """Dense-only distillation steps after the failed check at outer step ``at_step``, checked
    ``restore_checks`` times, until the dense validation accuracy is back over ``floor``: (steps
    taken, that accuracy), or (steps taken, None) with the model left where the steps took it."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.inner_lr)
    check_at = {round(cfg.restore_steps * (i + 1) / cfg.restore_checks) for i in range(cfg.restore_checks)}
    for step in range(1, cfg.restore_steps + 1):
        model.train()
        x, y, t = batches()
        loss = distill_loss(model(x), t, y, cfg.temperature, cfg.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in check_at:
            acc = _dense_accuracy(model, data, cfg, seed)
            checks.append({"step": at_step, "restore_step": step, "dense_val_accuracy": acc})
            if acc >= floor:
                return step, acc
    return cfg.restore_steps, None


def _floor_warnings(kept_step: int, checks: list[dict], before: float, cfg: RobustConfig, n_val: int) -> list[str]:
    """What the dense accuracy floor did, if anything a user should know."""
    if kept_step == 0:
        seen = ", ".join(f"{c['dense_val_accuracy']:.4f}" for c in checks)
        image = (f"; one of the {n_val} validation images is {1 / n_val:.4f}, more than the floor allows "
                 "(metacompress robustify --max-drop sets it)") if n_val and 1 / n_val > cfg.max_drop else ""
        return [f"robustify lowered the dense validation accuracy by more than {cfg.max_drop:.3f} at every "
                f"check ({seen} vs {before:.4f}): "
                "the given weights are returned unchanged; try fewer steps, a narrower budget range or smaller "
                f"learning rates{image}"]
    if kept_step != cfg.steps:
        restore = f" ({cfg.restore_steps} dense-only steps did not bring it back)" if cfg.restore_steps else ""
        return [f"the dense accuracy floor failed after step {kept_step}{restore}: the state at step {kept_step} "
                "is returned"]
    return []
