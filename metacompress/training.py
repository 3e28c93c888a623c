"""Dense training and evaluation: the teacher every compression starts from."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metacompress.data import Dataset
from metacompress.meta import data_parallel
from metacompress.progress import batched, track


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


EVAL_BATCH_VALUES = 2**23  # input values per evaluation batch: 512 small samples, 55 images of 3x224x224


def eval_batch_size(sample_shape: tuple[int, ...] | torch.Size, most: int = 512) -> int:
    """Samples per evaluation batch: ``most``, fewer for big samples (activations scale with the input)."""
    return max(1, min(most, EVAL_BATCH_VALUES // max(1, math.prod(sample_shape))))


CHANNELS_LAST_MIN_PIXELS = 64 * 64  # images at least this large are computed in channels-last layout


@contextmanager
def convolution_layout(model: nn.Module, sample_shape: tuple[int, ...] | torch.Size
                     ) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """While inside, ``model`` runs in the memory layout its CPU convolutions are fastest in; yields
    the conversion each input batch needs.

    oneDNN computes convolutions in a channels-last layout and reorders a default (NCHW) model's
    tensors on every call. On 224-px images an evaluation pass is 1.1-1.4x faster in channels-last,
    a BN recalibration pass 1.25-1.6x and a training step 1.2-1.5x (resnet, mobilenet, efficientnet,
    densenet, regnet; BENCHMARKS.md), and on a small CPU the passes of ``compress`` over big images
    (accuracies, BN recalibration, the guard's screens and candidates, repair) are minutes. Small
    images keep NCHW, where there is little to gain, and their results stay bit-identical. ONNX
    parity checks keep NCHW too: their reference is the model as a user runs it. The model is back
    in NCHW on exit (exporters and pruning expect it)."""
    large = len(sample_shape) == 3 and sample_shape[1] * sample_shape[2] >= CHANNELS_LAST_MIN_PIXELS
    if not large or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        yield lambda t: t
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield lambda t: t.contiguous(memory_format=torch.channels_last)
    finally:
        model.to(memory_format=torch.contiguous_format)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Logits for ``x`` (a tensor or lazy samples) in eval mode, in batches."""
    batch_size = batch_size or eval_batch_size(x.shape[1:])
    was = model.training
    model.eval()
    with convolution_layout(model, x.shape[1:]) as laid_out:
        out = [model(laid_out(x[i:i + batch_size])) for i in batched(len(x), batch_size, "evaluating")]
    model.train(was)
    return torch.cat(out) if out else x[:0]


def predict_shared(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``predict``, its rows split across the ranks under data parallelism (every rank gets all)."""
    return data_parallel.gather_rows(lambda lo, hi: predict(model, x[lo:hi]), len(x))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x).argmax(1) == y).float().mean())


def accuracy_and_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, np.ndarray]:
    """Accuracy, mean cross-entropy and per-sample correctness from one pass (for choices on
    validation that break accuracy ties by loss and compare models image by image)."""
    logits = predict(model, x)
    correct = logits.argmax(1) == y
    return float(correct.float().mean()), float(F.cross_entropy(logits, y)), correct.numpy()


def cosine_adam(params, lr: float, total_steps: int, weight_decay: float = 0.0):
    """Adam with a cosine decay to zero over ``total_steps``: the schedule for training and repair."""
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    total = max(1, total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    return opt, sched


def batch_step(model: nn.Module, opt, sched, index: torch.Tensor,
               loss_of: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """One step on the batch ``index`` (``loss_of(index)``: the mean loss of those samples). Under
    data parallelism each rank takes its share, scaled so that the summed gradients are the whole
    batch's, with BatchNorm statistics of the whole batch: the step one process would take."""
    share, weight, split = data_parallel.batch_shard(index)
    with data_parallel.synced_batchnorm(model, split):
        loss = loss_of(share) * weight
    opt.zero_grad(set_to_none=True)
    loss.backward()
    data_parallel.sum_gradients_if_data_parallel(opt)
    opt.step()
    sched.step()


def train_dense(model: nn.Module, data: Dataset, epochs: int = 30, lr: float = 3e-3, batch_size: int = 64,
                seed: int = 0, progress: bool = True) -> nn.Module:
    """Adam with cosine decay on the training split; deterministic under ``seed``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = len(data.x_train)
    opt, sched = cosine_adam(model.parameters(), lr, epochs * math.ceil(n / batch_size), weight_decay=1e-4)
    model.train()
    epochs_iter = track(range(epochs), "training dense model", total=epochs) if progress else range(epochs)
    with convolution_layout(model, data.x_train.shape[1:]) as laid_out:
        for _ in epochs_iter:
            perm = torch.randperm(n, generator=g)
            for i in range(0, n, batch_size):
                idx = perm[i:i + batch_size]
                if len(idx) < 2:
                    continue
                batch_step(model, opt, sched, idx,
                           lambda i: F.cross_entropy(model(laid_out(data.x_train[i])), data.y_train[i]))
    model.eval()
    return model
