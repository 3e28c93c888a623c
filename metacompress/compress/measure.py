"""Cost of a model: MACs (multiply-accumulates at batch 1) and parameter counts.

MACs come from ``torch.utils.flop_counter`` so that attention matmuls count as well as
convolutions and linear layers; per-module figures feed the budget's analytic cost model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


@contextlib.contextmanager
def composed_attention() -> Iterator[None]:
    """Run ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` through their composed
    path (linear layers, then attention), which computes what the fused one does.

    In inference PyTorch runs those blocks as one fused op, which the flop counter has no formula
    for (their MACs would count as zero) and inside which the encoder layer's own linear layers
    are never called (so module hooks of probes and masks would not fire). Compression's passes
    run inside this context; the previous setting comes back on exit.
    """
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def module_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """MACs of a batch-1 forward pass per module path ('' is the whole model), nested totals."""
    was_training = model.training
    model.eval()
    try:
        with composed_attention():
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


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """``scaled_dot_product_attention``'s CPU kernel, which the flop counter has no formula for:
    what it counts for the same op on other devices (scores and weighted sum)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _counted(model: nn.Module, example: torch.Tensor, grad: bool) -> FlopCounterMode:
    counter = FlopCounterMode(display=False, depth=None, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops})
    with torch.set_grad_enabled(grad), counter:
        model(example)
    return counter


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Total MACs of one sample's forward pass."""
    return module_macs(model, example).get("", 0)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
