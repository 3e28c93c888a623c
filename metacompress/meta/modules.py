"""Facts about a module that the core and the toolkit both need (torch only)."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping

import torch
from torch import nn


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers: the ones whose statistics depend on the data they have seen."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorm_layers(model))


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """``model.load_state_dict(state)`` for any mapping of tensors, not only ``state_dict()``'s own.

    A state dict carries per-module versions in its ``_metadata``; modules whose loading depends on
    them (torchvision's MNASNet refuses a dict without one) fail on a rebuilt dict: a copy, a soup,
    a safetensors file. Such a dict gets the model's own versions, which describe its layout.
    """
    if getattr(state, "_metadata", None) is None:
        versioned: OrderedDict[str, torch.Tensor] = OrderedDict(state)
        versioned._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
        state = versioned
    model.load_state_dict(state, strict=strict)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; every module's own train/eval flag is restored
    after, so a caller's model in training mode (or with some layers frozen in eval) is as it was."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training
