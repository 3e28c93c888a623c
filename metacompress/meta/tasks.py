"""Tasks and task distributions: what a meta-learner adapts to, and where tasks come from.

A *task* is a small learning problem split into a support set (what the learner may adapt on)
and a query set (what the adapted learner is judged on). A *task distribution* draws batches
of tasks from a seeded ``torch.Generator`` so that every experiment is reproducible.

Families:
- ``Sinusoid``: regression on ``A sin(x - phi)`` as in the MAML paper (Finn et al., 2017).
- ``NWayKShot``: N-way K-shot classification over any labelled tensors, with class sets split
  into disjoint meta-train / meta-val / meta-test pools (a new task only ever sees new classes).
- ``digits_rot``: sklearn's digits where each digit at 0/90/180/270 degrees is its own class
  (40 classes), the way Omniglot is augmented with rotations.
"""

from __future__ import annotations

import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from metacompress.meta.errors import UserError

TaskType = Literal["regression", "classification"]
SPLITS = ("train", "val", "test")


@dataclass
class Task:
    """One learning problem: adapt on the support set, evaluate on the query set."""

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor


@runtime_checkable
class TaskDistribution(Protocol):
    """Anything that draws tasks from a seeded generator (and can feed a joint baseline)."""

    task_type: TaskType
    n_out: int  # outputs a task model needs: 1 for regression, N for N-way classification

    def sample(self, n: int, generator: torch.Generator) -> list[Task]:
        """Draw ``n`` independent tasks."""

    def joint_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of ``n`` pooled examples with global targets, for joint (transfer) pre-training."""

    @property
    def joint_outputs(self) -> int:
        """Outputs of the joint model: 1 for regression, the number of pooled classes otherwise."""


def stack_tasks(tasks: list[Task]) -> Task | None:
    """Stack same-shaped tasks along a new leading dim (for ``vmap``); ``None`` if shapes differ."""
    if not tasks:
        raise UserError("a meta-batch needs at least one task")
    first = tasks[0]
    fields = ("x_support", "y_support", "x_query", "y_query")
    for t in tasks[1:]:
        if any(getattr(t, f).shape != getattr(first, f).shape for f in fields):
            return None
    return Task(*(torch.stack([getattr(t, f) for t in tasks]) for f in fields))


class Sinusoid:
    """Regression tasks ``y = A sin(x - phi)``: A ~ U[0.1, 5], phi ~ U[0, pi], x ~ U[-5, 5].

    ``k_shot`` support points and ``k_query`` query points per task, shaped ``(k, 1)``.
    """

    task_type: TaskType = "regression"
    n_out = 1
    joint_outputs = 1

    def __init__(self, k_shot: int = 10, k_query: int = 10,
                 amplitude: tuple[float, float] = (0.1, 5.0), phase: tuple[float, float] = (0.0, math.pi),
                 x_range: tuple[float, float] = (-5.0, 5.0)) -> None:
        if k_shot <= 0 or k_query <= 0:
            raise UserError(f"shots must be positive, got k_shot={k_shot}, k_query={k_query}")
        self.k_shot, self.k_query = k_shot, k_query
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def _uniform(self, shape: tuple[int, ...], bounds: tuple[float, float], g: torch.Generator) -> torch.Tensor:
        lo, hi = bounds
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    def sample(self, n: int, generator: torch.Generator) -> list[Task]:
        amp = self._uniform((n, 1, 1), self.amplitude, generator)
        phase = self._uniform((n, 1, 1), self.phase, generator)
        x = self._uniform((n, self.k_shot + self.k_query, 1), self.x_range, generator)
        y = amp * torch.sin(x - phase)
        k = self.k_shot
        return [Task(x[i, :k], y[i, :k], x[i, k:], y[i, k:]) for i in range(n)]

    def joint_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Points from ``n`` different sinusoids pooled together: what 'pre-train on all tasks' means."""
        amp = self._uniform((n, 1), self.amplitude, generator)
        phase = self._uniform((n, 1), self.phase, generator)
        x = self._uniform((n, 1), self.x_range, generator)
        return x, amp * torch.sin(x - phase)


class NWayKShot:
    """N-way K-shot episodes drawn from a fixed pool of classes of labelled tensors.

    Each episode picks ``n_way`` classes from ``classes``, ``k_shot`` support and ``k_query``
    query examples of each, and relabels the classes 0..N-1 in a random order (so a model
    cannot memorise a class-to-label map and must adapt).
    """

    task_type: TaskType = "classification"

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: list[int], n_way: int, k_shot: int,
                 k_query: int = 15) -> None:
        if n_way < 2:
            raise UserError(f"ways must be at least 2, got {n_way}")
        if k_shot <= 0 or k_query <= 0:
            raise UserError(f"shots must be positive, got k_shot={k_shot}, k_query={k_query}")
        if n_way > len(classes):
            raise UserError(f"{n_way}-way tasks need {n_way} classes but this split has only {len(classes)}")
        self.x, self.classes = x, list(classes)
        self.n_way, self.k_shot, self.k_query = n_way, k_shot, k_query
        self.n_out = n_way
        self._index = [torch.nonzero(y == c).flatten() for c in self.classes]
        smallest = min(len(i) for i in self._index)
        if k_shot + k_query > smallest:
            raise UserError(f"{k_shot} shots + {k_query} query examples per class exceed the smallest "
                            f"class ({smallest} examples)")

    @property
    def joint_outputs(self) -> int:
        return len(self.classes)

    def sample(self, n: int, generator: torch.Generator) -> list[Task]:
        tasks = []
        k, q = self.k_shot, self.k_query
        for _ in range(n):
            chosen = torch.randperm(len(self.classes), generator=generator)[: self.n_way]
            sup, qry = [], []
            for idx in (self._index[int(c)] for c in chosen):
                pick = idx[torch.randperm(len(idx), generator=generator)[: k + q]]
                sup.append(pick[:k])
                qry.append(pick[k:])
            labels = torch.arange(self.n_way)
            tasks.append(Task(self.x[torch.cat(sup)], labels.repeat_interleave(k),
                              self.x[torch.cat(qry)], labels.repeat_interleave(q)))
        return tasks

    def joint_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` examples from all classes of this pool, labelled by their index in ``classes``."""
        c = torch.randint(len(self.classes), (n,), generator=generator)
        picks = torch.stack([self._index[int(i)][torch.randint(len(self._index[int(i)]), (1,),
                                                               generator=generator)[0]] for i in c])
        return self.x[picks], c


def split_classes(y: torch.Tensor, counts: tuple[int, int, int], seed: int = 0) -> dict[str, list[int]]:
    """Split the distinct labels of ``y`` into disjoint meta-train / meta-val / meta-test sets."""
    labels = torch.unique(y).tolist()
    if sum(counts) > len(labels):
        raise UserError(f"class split {counts} needs {sum(counts)} classes but the data has {len(labels)}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [labels[i] for i in order]
    a, b, c = counts
    return {"train": shuffled[:a], "val": shuffled[a:a + b], "test": shuffled[a + b:a + b + c]}


def digits_rot() -> tuple[torch.Tensor, torch.Tensor, dict[str, list[int]]]:
    """sklearn digits, each digit x rotation (0/90/180/270) a class: 40 classes of ~180 images.

    Class ``4 * digit + r`` is ``digit`` rotated by ``r * 90`` degrees. Digits 0-5 (24 classes)
    are meta-train and digits 6-9 (16 classes) meta-test, so no meta-test digit is ever seen, in
    any orientation, during meta-training. Images are ``(1, 8, 8)`` in [0, 1].
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    img = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    lab = torch.tensor(d.target, dtype=torch.long)
    xs = [torch.rot90(img, r, dims=(2, 3)) for r in range(4)]
    ys = [4 * lab + r for r in range(4)]
    splits = {"train": list(range(24)), "val": [], "test": list(range(24, 40))}
    return torch.cat(xs), torch.cat(ys), splits


def load_npz(path: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[int]]]:
    """Labelled arrays ``x`` and ``y`` from an ``.npz``; classes split 60/20/20 % by a fixed seed."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"npz file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise UserError(f"{p} must hold arrays named 'x' and 'y', found {sorted(data.files)}")
            x = torch.tensor(np.asarray(data["x"], dtype=np.float32))
            y = torch.tensor(np.asarray(data["y"]).astype(np.int64))
    except UserError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read {p} as npz: {type(exc).__name__}") from None
    if y.ndim != 1 or len(y) != len(x):
        raise UserError(f"{p}: y must be 1-D with one label per row of x, got x{tuple(x.shape)} y{tuple(y.shape)}")
    n = len(torch.unique(y))
    n_val = n_test = max(1, round(0.2 * n))
    return x, y, split_classes(y, (n - n_val - n_test, n_val, n_test), seed=0)


_SPEC = re.compile(r"^(\d+)w(\d+)s$")


@dataclass(frozen=True)
class TaskSpec:
    """A parsed ``--tasks`` string: ``sinusoid``, ``digits-rot:5w1s`` or ``npz:PATH:5w1s``."""

    family: str
    n_way: int = 0
    k_shot: int = 10
    path: str = ""

    @property
    def text(self) -> str:
        if self.family == "sinusoid":
            return "sinusoid" if self.k_shot == 10 else f"sinusoid:{self.k_shot}s"
        shots = f"{self.n_way}w{self.k_shot}s"
        return f"npz:{self.path}:{shots}" if self.family == "npz" else f"{self.family}:{shots}"


def parse_task_spec(text: str) -> TaskSpec:
    """Parse ``sinusoid[:Ks]``, ``digits-rot:NwKs`` or ``npz:PATH:NwKs`` (one-line error otherwise)."""
    text = text.strip()
    if text == "sinusoid" or text.startswith("sinusoid:"):
        m = re.fullmatch(r"sinusoid(?::(\d+)s)?", text)
        if not m:
            raise UserError(f"bad task spec {text!r}: expected 'sinusoid' or 'sinusoid:10s'")
        return TaskSpec("sinusoid", k_shot=int(m.group(1) or 10))
    head, _, shots = text.rpartition(":")
    m = _SPEC.match(shots)
    if head == "digits-rot" and m:
        return TaskSpec("digits-rot", int(m.group(1)), int(m.group(2)))
    if head.startswith("npz:") and m and len(head) > 4:
        return TaskSpec("npz", int(m.group(1)), int(m.group(2)), head[4:])
    raise UserError(f"bad task spec {text!r}: expected sinusoid, digits-rot:5w1s or npz:PATH:5w1s")


def build_distribution(spec: TaskSpec, split: str, k_query: int = 15) -> TaskDistribution:
    """The task distribution of ``spec`` on one class split (``train``, ``val`` or ``test``)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if spec.family == "sinusoid":
        return Sinusoid(k_shot=spec.k_shot, k_query=10)
    if spec.family == "digits-rot":
        x, y, splits = digits_rot()
    elif spec.family == "npz":
        x, y, splits = load_npz(spec.path)
    else:
        raise UserError(f"unknown task family {spec.family!r}")
    if not splits[split]:
        raise UserError(f"{spec.family} has no meta-{split} classes")
    return NWayKShot(x, y, splits[split], spec.n_way, spec.k_shot, k_query)


def default_model(family: str, input_shape: tuple[int, ...], n_out: int) -> nn.Module:
    """The reference network for a task family (a fresh one, initialised from torch's global RNG).

    Sinusoid: the MAML paper's 1-40-40-1 ReLU MLP. Images: three conv3x3(32)-BN-ReLU-maxpool
    blocks and a linear head (a small 'Conv-4' for 8x8 inputs). Flat features: a 2x128 MLP
    with BN. The last module is always the ``nn.Linear`` head (ANIL and the transfer baseline
    rely on that).
    """
    if family == "sinusoid":
        return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, n_out))
    if len(input_shape) in (2, 3):
        c = 1 if len(input_shape) == 2 else input_shape[0]
        layers: list[nn.Module] = [] if len(input_shape) == 3 else [nn.Unflatten(1, (1, *input_shape))]
        hw = min(input_shape[-2:])
        for _ in range(3):
            layers += [nn.Conv2d(c, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()]
            if hw >= 2:
                layers.append(nn.MaxPool2d(2))
                hw //= 2
            c = 32
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, n_out)]
        return nn.Sequential(*layers)
    if len(input_shape) == 1:
        d = input_shape[0]
        return nn.Sequential(nn.Linear(d, 128), nn.BatchNorm1d(128), nn.ReLU(),
                             nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, n_out))
    raise UserError(f"no default model for inputs of shape {input_shape}: use 1-D features or images")
