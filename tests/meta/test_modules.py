"""Loading rebuilt state dicts: copies, soups and safetensors files carry no per-module versions."""

from __future__ import annotations

import pytest
import torch

from metacompress.meta.modules import load_state

torchvision = pytest.importorskip("torchvision")


def test_a_rebuilt_state_dict_loads_into_a_model_that_checks_its_version() -> None:
    torch.manual_seed(0)
    source = torchvision.models.mnasnet0_5(num_classes=10).eval()
    plain = {k: v.clone() for k, v in source.state_dict().items()}  # what a copy, a soup or safetensors gives
    target = torchvision.models.mnasnet0_5(num_classes=10).eval()
    with pytest.raises(ValueError, match="version"):
        target.load_state_dict(plain)  # why load_state exists: MNASNet refuses a dict without versions
    load_state(target, plain)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_a_wrong_state_dict_is_still_refused() -> None:
    model = torch.nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_state(model, {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)})
