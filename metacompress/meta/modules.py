"""Facts about a module that the core and the toolkit both need (torch only)."""

from __future__ import annotations

from torch import nn


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers: the ones whose statistics depend on the data they have seen."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorm_layers(model))
