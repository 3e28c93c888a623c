"""torchvision constructs beyond resnet/mobilenet: grouped convs, channel shuffle, concat, squeeze-excitation.

Issue #14: regnet_y_400mf ended in an internal error (a pruned grouped conv broke the model) and
shufflenet_v2 in a ZeroDivisionError while tracing. Each construct here must either compress to
0.5 MACs with ONNX parity, or be refused up front with a one-line ``UserError``. Inputs are 64x64
(every model below accepts it) and torch runs on one thread, to stay fast on 2 shared cores;
``benchmarks/coverage.py`` walks every torchvision classifier the same way.

ONNX parity alone cannot show that a grouped conv was sliced *right* (a wrongly sliced model
exports just as faithfully), so the small grouped-conv model is also checked against the dense
model with the removed channels zeroed: pruning must not change what the kept channels compute.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("torchvision")

from metacompress.compress.distill import recalibrate_bn  # noqa: E402
from metacompress.compress.measure import count_macs  # noqa: E402
from metacompress.compress.prune import PruningSpace  # noqa: E402
from metacompress.compress.rules import rule_allocation  # noqa: E402
from metacompress.data import Dataset, load_dataset  # noqa: E402
from metacompress.deploy import export_onnx, verify_onnx  # noqa: E402
from metacompress.errors import UserError  # noqa: E402
from metacompress.zoo import build_model  # noqa: E402

pytestmark = pytest.mark.integration

TARGET_MACS = 0.5
MACS_TOL = 0.02
MAX_ABS_DIFF = 1e-4
MIN_LOGIT_STD = 1000 * MAX_ABS_DIFF  # else any ONNX file passes parity


@pytest.fixture(scope="module")
def data64() -> Dataset:
    return load_dataset("synthetic:3x64x64:n=140")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prune(model: nn.Module, data: Dataset) -> tuple[PruningSpace, float]:
    """Uniform allocation to TARGET_MACS (round_to=8), pruned in place, BN recalibrated as the pipeline does."""
    example = data.x_train[:1]
    space = PruningSpace(model, example, data.num_classes, round_to=8)
    keep = space.project(rule_allocation("uniform", space, model, calib=None), TARGET_MACS, "macs")
    space.apply(model, keep)
    recalibrate_bn(model, data.x_train, 32, batch_size=32, seed=0)
    model.eval()
    return space, count_macs(model, example) / space.dense_macs


def _onnx_parity(model: nn.Module, data: Dataset, tmp_path: Path) -> float:
    path = tmp_path / "model.onnx"
    export_onnx(model, data.x_test[:2], path, dynamo=False)
    with torch.no_grad():
        assert float(model(data.x_test).std()) >= MIN_LOGIT_STD
    return verify_onnx(path, model, data.x_test, None, threads=1)["max_abs_diff"]


def _grouped_convs(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(groups, input width per conv group) of every grouped, non-depthwise conv."""
    return {n: (m.groups, m.weight.shape[1]) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and 1 < m.groups != m.out_channels}


@pytest.mark.parametrize("name", [
    "regnet_y_400mf",    # grouped 3x3 convs of width 8 + squeeze-excitation
    "resnext50_32x4d",   # 32 conv groups of width 4
    "efficientnet_b0",   # depthwise + squeeze-excitation
    "densenet121",       # concatenations
])
def test_torchvision_construct_compresses(name: str, data64: Dataset, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(f"torchvision:{name}", data64.input_shape, data64.num_classes, data64.mean, data64.std).eval()
    dense = _grouped_convs(model)
    _, macs_ratio = _prune(model, data64)
    assert abs(macs_ratio - TARGET_MACS) <= MACS_TOL * TARGET_MACS, f"achieved MACs {macs_ratio:.4f}"
    assert _onnx_parity(model, data64, tmp_path) <= MAX_ABS_DIFF
    pruned = _grouped_convs(model)
    # grouped convs keep their number of groups, and some of them did lose channels per group
    assert {n: g for n, (g, _) in pruned.items()} == {n: g for n, (g, _) in dense.items()}
    if dense:
        assert any(pruned[n][1] < w for n, (_, w) in dense.items())


class _GroupedNet(nn.Module):
    """conv -> BN -> ReLU -> grouped conv (6 groups of 8) -> BN -> ReLU -> conv -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.a_bn = nn.Conv2d(3, 48, 3, padding=1), nn.BatchNorm2d(48)
        self.b, self.b_bn = nn.Conv2d(48, 48, 3, padding=1, groups=6), nn.BatchNorm2d(48)
        self.c, self.fc = nn.Conv2d(48, 32, 1), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a_bn(self.a(x)))
        x = torch.relu(self.b_bn(self.b(x)))
        return self.fc(self.c(x).mean((2, 3)))


def _kept_rows(dense: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Indices of the dense output channels whose weights survive in the pruned conv."""
    return [i for i in range(dense.shape[0]) if any(torch.equal(dense[i], p) for p in pruned)]


def test_grouped_conv_pruning_keeps_what_kept_channels_compute(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _GroupedNet().eval()
    for bn in (model.a_bn, model.b_bn):  # non-trivial BN so that masking after it is a real check
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(8, 3, 16, 16)
    dense_a, dense_c = model.a.weight.detach().clone(), model.c.weight.detach().clone()
    reference = _GroupedNet().eval()
    reference.load_state_dict(model.state_dict())

    space = PruningSpace(model, x[:1], 10, round_to=8)
    by_name = {g.name: g for g in space.groups}
    assert by_name["a"].conv_groups == by_name["b"].conv_groups == 6 and by_name["c"].conv_groups == 1
    keep = space.project(rule_allocation("uniform", space, model, calib=None), TARGET_MACS, "macs")
    assert all(k % g.quantum == 0 for k, g in zip(keep, space.groups))
    space.apply(model, keep)
    assert model.b.groups == 6 and model.b.in_channels % 6 == 0 and model.b.out_channels % 6 == 0
    assert model.b.in_channels < 48 and model.b.out_channels < 48

    # the dense model with the removed channels zeroed after their BN + ReLU computes the same
    kept_a = _kept_rows(dense_a, model.a.weight)
    kept_b = [j for j in range(48) if any(torch.equal(dense_c[:, j], model.c.weight[:, i])
                                          for i in range(model.c.weight.shape[1]))]
    assert len(kept_a) == model.a.out_channels and len(kept_b) == model.b.out_channels

    def zero_except(kept: list[int]):
        mask = torch.zeros(1, 48, 1, 1)
        mask[:, kept] = 1
        return lambda module, args, out: out * mask + (-1e9) * (1 - mask)  # ReLU turns -1e9 into 0

    reference.a_bn.register_forward_hook(zero_except(kept_a))
    reference.b_bn.register_forward_hook(zero_except(kept_b))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)
    path = tmp_path / "grouped.onnx"
    export_onnx(model, x[:2], path, dynamo=False)
    assert verify_onnx(path, model, x, None, threads=1)["max_abs_diff"] <= MAX_ABS_DIFF


def test_channel_shuffle_is_refused_with_one_line(data64: Dataset) -> None:
    model = build_model("torchvision:shufflenet_v2_x0_5", data64.input_shape, data64.num_classes).eval()
    with pytest.raises(UserError) as info:
        PruningSpace(model, data64.x_train[:1], data64.num_classes, round_to=8)
    msg = str(info.value)
    assert "channel shuffle" in msg and "stage2.0" in msg and "\n" not in msg
