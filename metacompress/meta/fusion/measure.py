"""A model run with given weights on data: accuracy, loss, BatchNorm statistics, diagonal Fisher.

Each takes the architecture (``model``) and a state dict and leaves the model itself untouched,
so that one module instance serves every candidate a merge method scores.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from metacompress.meta.errors import UserError
from metacompress.meta.fusion.base import StateDict
from metacompress.meta.fusion.checks import BN_STATS, check_compatible
from metacompress.meta.modules import batchnorm_layers, load_state


def check_fits(model: nn.Module, state_dict: StateDict, label: str = "the weights") -> None:
    """A one-line ``UserError`` unless the weights load into the model exactly."""
    check_compatible([model.state_dict(), state_dict], ["the model", label])


def check_data(x: Tensor, y: Tensor | None = None) -> None:
    if len(x) == 0:
        raise UserError("no data samples given")
    if y is not None and len(y) != len(x):
        raise UserError(f"{len(x)} samples but {len(y)} labels")


def estimate_fisher(
    model: nn.Module,
    state_dict: StateDict,
    x: Tensor,
    y: Tensor,
    batch_size: int = 64,
    max_samples: int = 512,
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher of the model with these weights: mean over samples of grad^2.

    The gradient is of the cross-entropy with the true label, per sample (``torch.func.vmap``
    over ``grad``), on the first ``max_samples`` samples, in eval mode (BN uses its running
    statistics and dropout is off: the Fisher of the deployed function). The model itself is
    left untouched. Returns one tensor per parameter, in float32.
    """
    check_fits(model, state_dict)
    check_data(x, y)
    if batch_size < 1 or max_samples < 1:
        raise UserError("batch size and sample count must be positive")
    param_names = [n for n, _ in model.named_parameters()]
    params = {n: state_dict[n].detach() for n in param_names}
    buffers = {n: state_dict[n] for n, _ in model.named_buffers() if n in state_dict}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    x, y = x[:max_samples], y[:max_samples]
    fisher = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in param_names}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
            grads = per_sample(params, x[start:start + batch_size], y[start:start + batch_size])
            for n in param_names:
                fisher[n] += grads[n].double().pow(2).sum(0)
    finally:
        model.train(was_training)
    return {n: (f / len(x)).float() for n, f in fisher.items()}


def recompute_bn(model: nn.Module, state_dict: StateDict, x: Tensor,
                 batch_size: int = 64) -> dict[str, Tensor]:
    """Re-estimate every BatchNorm's running statistics of these weights on data ``x``.

    A merged network's activation statistics are not the average of its parents' (the mean of
    a function of averaged weights is not the average of means), so averaged statistics can
    wreck a soup of BN networks. Statistics are a cumulative average over the batches (momentum
    None, as ``torch.optim.swa_utils.update_bn``), with the rest of the network in eval mode.
    Only BN entries change; all others are the given tensors. The model itself is untouched.
    """
    check_fits(model, state_dict)
    check_data(x)
    if batch_size < 2:
        raise UserError(f"BN recomputation needs batches of at least 2 samples, got {batch_size}")
    net = copy.deepcopy(model)
    load_state(net, state_dict)
    prefixes = [name for name, m in net.named_modules() if isinstance(m, _BatchNorm)]
    if not prefixes:
        return dict(state_dict)
    net.eval()
    for m in batchnorm_layers(net):
        m.reset_running_stats()
        m.momentum = None
        m.train()
    starts = list(range(0, len(x), batch_size))
    if len(starts) > 1 and len(x) - starts[-1] == 1:  # BN cannot take a batch of one sample in train mode
        starts.pop()
    with torch.no_grad():
        for start in starts:
            net(x[start:start + batch_size])  # read batch by batch: ``x`` may be lazy
    fresh = net.state_dict()
    bn_keys = {f"{p}.{b}" if p else b for p in prefixes for b in (*BN_STATS, "num_batches_tracked")}
    return {k: fresh[k].detach().clone() if k in bn_keys else v for k, v in state_dict.items()}


def _logits(model: nn.Module, state_dict: StateDict, x: Tensor, batch_size: int = 256) -> Tensor:
    """Outputs of the model with these weights on ``x``, in eval mode; the model is untouched."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([functional_call(model, dict(state_dict), (x[start:start + batch_size],))
                              for start in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def state_dict_accuracy(model: nn.Module, state_dict: StateDict, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of the model with these weights, in eval mode; the model is untouched."""
    check_data(x, y)
    return int((_logits(model, state_dict, x, batch_size).argmax(1) == y).sum()) / len(x)


def mean_loss(model: nn.Module, state_dict: StateDict, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Mean cross-entropy of the model with these weights, in eval mode; the model is untouched."""
    check_data(x, y)
    return float(F.cross_entropy(_logits(model, state_dict, x, batch_size), y))
