"""Model repair: BatchNorm recalibration and knowledge distillation from the dense teacher.

Pruning shifts every activation statistic, so BN running statistics are re-estimated first
(cheap, label-free, often most of the recovery). Then the student learns from the teacher's
softened outputs (temperature ``T``) blended with the labels (weight ``1 - alpha``).
The settings that work best depend on the regime (steps, data, budget): the meta-learned
policy predicts them; these defaults are the best single setting on average.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, astuple, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metacompress.data import Dataset, subsample_per_class
from metacompress.errors import UserError
from metacompress.meta.modules import batchnorm_layers, has_batchnorm
from metacompress.progress import track
from metacompress.training import batch_step, convolution_layout, cosine_adam, eval_batch_size, predict_shared


@dataclass
class RepairConfig:
    """How a pruned student is repaired. ``steps=0`` means BN recalibration only."""

    # lr, temperature and alpha: the best single setting on average over the policy's
    # meta-training tasks (benchmarks/repair_defaults.py, BENCHMARKS.md)
    steps: int = 150
    lr: float = 1e-2
    temperature: float = 4.0
    alpha: float = 0.5
    batch_size: int = 64
    bn_samples: int = 512
    samples_per_class: int | None = None

    def validate(self) -> "RepairConfig":
        if self.steps < 0:
            raise UserError(f"repair steps must be >= 0, got {self.steps}")
        if not 0 < self.lr < math.inf:
            raise UserError(f"repair learning rate must be a finite number > 0, got {self.lr}")
        if not 0 < self.temperature < math.inf:
            raise UserError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.samples_per_class is not None and self.samples_per_class <= 0:
            raise UserError(f"samples per class must be positive, got {self.samples_per_class}")
        if self.bn_samples < 0 or self.batch_size <= 0:
            raise UserError("bn_samples must be >= 0 and batch_size > 0")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def outcome(self, batchnorm: bool = True) -> tuple:
        """The settings the repaired model depends on: with ``steps=0`` only BN recalibration's,
        and none on a model without BatchNorm (``batchnorm``). Two configs with the same outcome
        repair a model to the same weights."""
        if self.steps == 0:
            return (0, self.bn_samples, self.samples_per_class) if batchnorm else (0,)
        return astuple(self)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, n: int, batch_size: int | None = None, seed: int = 0) -> None:
    """Re-estimate BN running statistics as a cumulative average over ``n`` samples of ``x``, in
    batches of ``batch_size`` (default: 128, fewer for big samples, as for evaluation)."""
    bns = batchnorm_layers(model)
    if not bns or n <= 0 or len(x) == 0:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    g = torch.Generator().manual_seed(seed)
    sel = torch.randperm(len(x), generator=g)[:n]  # read batch by batch: ``x`` may be lazy
    batch_size = batch_size or eval_batch_size(x.shape[1:], most=128)
    model.train()
    with convolution_layout(model, x.shape[1:]) as laid_out:
        for i in range(0, len(sel), batch_size):
            if len(sel[i:i + batch_size]) > 1:
                model(laid_out(x[sel[i:i + batch_size]]))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


def repair_set(data: Dataset, cfg: RepairConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The labelled data repair may use: everything, or K samples per class."""
    if cfg.samples_per_class is None:
        return data.x_train, data.y_train
    return subsample_per_class(data.x_train, data.y_train, cfg.samples_per_class, seed=seed)


def distill_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float) -> torch.Tensor:
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1),
                    reduction="batchmean", log_target=True) * (t * t)
    return alpha * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def _distill(student: nn.Module, opt, sched, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
             cfg: RepairConfig, steps: int, g: torch.Generator, progress: bool, losses: list[float] | None = None) -> None:
    """``steps`` distillation steps on random batches of ``batch`` = (inputs, labels, teacher
    logits); each step's training loss is appended to ``losses`` when given."""
    x, y, teacher_logits = batch
    bs = min(cfg.batch_size, len(x))
    if steps <= 0 or (has_batchnorm(student) and bs < 2):  # BN cannot train on a batch of one sample
        return

    def loss_of(i: torch.Tensor) -> torch.Tensor:
        loss = distill_loss(student(laid_out(x[i])), teacher_logits[i], y[i], cfg.temperature, cfg.alpha)
        if losses is not None:
            losses.append(float(loss.detach()))
        return loss

    student.train()
    with convolution_layout(student, x.shape[1:]) as laid_out:
        for _ in track(range(steps), "repairing", total=steps) if progress else range(steps):
            batch_step(student, opt, sched, torch.randint(len(x), (bs,), generator=g), loss_of)
    student.eval()


LOSS_RISE = 0.25  # a repair whose loss climbs this far above its first step's ran at too high a rate


def loss_rose(losses: list[float]) -> bool:
    """Whether a repair's training loss climbed over LOSS_RISE above its first step's: the rate is
    too high for this model (ViT-tiny, VGG and ResNet-20 at 1e-2 on digits@16 climb 1.7x and end
    behind a tenth of the rate; the models that do not climb end ahead at 1e-2: BENCHMARKS.md)."""
    return bool(losses) and max(losses) > losses[0] * (1 + LOSS_RISE)


def _trunk(student: nn.Module, teacher: nn.Module, data: Dataset, cfg: RepairConfig, seed: int, steps: int,
           progress: bool, losses: list[float] | None = None):
    """Recalibrate BN and run the first ``steps`` of the repair; returns what continuing needs."""
    cfg.validate()
    x, y = repair_set(data, cfg, seed)
    recalibrate_bn(student, x, cfg.bn_samples, seed=seed)
    if cfg.steps == 0:
        return None
    batch = (x, y, predict_shared(teacher, x))
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt, sched = cosine_adam(student.parameters(), cfg.lr, cfg.steps)
    _distill(student, opt, sched, batch, cfg, steps, g, progress, losses)
    return batch, opt, sched, g


def repair(student: nn.Module, teacher: nn.Module, data: Dataset, cfg: RepairConfig, seed: int = 0,
           progress: bool = True, losses: list[float] | None = None) -> nn.Module:
    """Recalibrate BN, then distill for ``cfg.steps`` steps (Adam, cosine decay). In place.
    ``losses``: a list to append each step's training loss to."""
    _trunk(student, teacher, data, cfg, seed, cfg.steps, progress, losses)
    student.eval()
    return student


def repair_forked(student: nn.Module, teacher: nn.Module, data: Dataset, cfg: RepairConfig, k: int,
                  seed: int = 0, shared: float = 0.5, progress: bool = True) -> list[nn.Module]:
    """``k`` repaired students that share the first ``shared`` fraction of the repair, then go on
    with their own seeds and data orders. ``student`` is left untouched.

    Why a shared trunk: students repaired independently from the pruned weights end in different
    basins, and averaging them loses accuracy (resnet20 on digits, 30 seeds: the uniform soup is
    0.8 point below the best student). Forked half-way, they stay in one basin, as fine-tuned copies
    of one pre-trained model do, and their average is 0.2 point above it (BENCHMARKS.md). Cheaper too:
    ``shared + k * (1 - shared)`` repairs instead of ``k``. Student 0 continues the trunk's own
    random stream, so it is exactly ``repair(student, ..., seed)``.
    """
    if k < 1:
        raise UserError(f"the number of students must be >= 1, got {k}")
    if not 0.0 <= shared <= 1.0:
        raise UserError(f"the shared fraction of the repair must be in [0, 1], got {shared:g}")
    trunk = copy.deepcopy(student)
    fork_at = int(round(shared * cfg.steps))
    state = _trunk(trunk, teacher, data, cfg, seed, fork_at, progress)
    if state is None:  # BN recalibration only: every student would be the same
        return [copy.deepcopy(trunk) for _ in range(k)]
    batch, opt, sched, g = state
    rest = cfg.steps - fork_at
    students = []
    for i in range(k):
        s = copy.deepcopy(trunk)
        o, sc = cosine_adam(s.parameters(), cfg.lr, cfg.steps)
        o.load_state_dict(opt.state_dict())
        sc.load_state_dict(sched.state_dict())
        if i == 0:  # nothing drew random numbers since the trunk: its streams go on unchanged
            gi = g
        else:
            gi = torch.Generator().manual_seed(seed + i)
            torch.manual_seed(seed + i)
        _distill(s, o, sc, batch, cfg, rest, gi, progress)
        students.append(s.eval())
    return students
