"""Cost of a model: MACs (multiply-accumulates at batch 1) and parameter counts.

MACs come from ``torch.utils.flop_counter`` so that attention matmuls count as well as
convolutions and linear layers; per-module figures feed the budget's analytic cost model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def module_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """MACs of a batch-1 forward pass per module path ('' is the whole model), nested totals."""
    was_training = model.training
    model.eval()
    try:
        counter = _counted(model, example[:1], grad=False)
    except AssertionError:  # its module tracker needs grad_fns where a forward feeds a module parameters (PiT)
        counter = _counted(model, example[:1], grad=True)
    finally:
        model.train(was_training)
    out: dict[str, int] = {}
    for path, ops in counter.get_flop_counts().items():
        name = "" if path == "Global" else path.split(".", 1)[1] if "." in path else ""
        out[name] = int(sum(ops.values()) // 2)
    return out


def _counted(model: nn.Module, example: torch.Tensor, grad: bool) -> FlopCounterMode:
    counter = FlopCounterMode(display=False, depth=None)
    with torch.set_grad_enabled(grad), counter:
        model(example)
    return counter


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Total MACs of one sample's forward pass."""
    return module_macs(model, example).get("", 0)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
