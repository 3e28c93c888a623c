"""torchvision constructs beyond resnet/mobilenet: grouped convs, channel shuffle, concat, squeeze-excitation.

Issue #14: regnet_y_400mf ended in an internal error (a pruned grouped conv broke the model) and
shufflenet_v2 in a ZeroDivisionError while tracing (then in a refusal). Each construct here must
compress to 0.5 MACs with ONNX parity. Inputs are 64x64
(every model below accepts it) and torch runs on one thread, to stay fast on 2 shared cores;
``benchmarks/coverage.py`` walks every torchvision classifier the same way.

ONNX parity alone cannot show that a grouped conv was sliced *right* (a wrongly sliced model
exports just as faithfully), so the small grouped-conv model is also checked against the dense
model with the removed channels zeroed: pruning must not change what the kept channels compute.
"""

from __future__ import annotations

import copy
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


def test_shufflenet_prunes_between_its_shuffles_and_computes_what_the_kept_channels_did(data64: Dataset,
                                                                                       tmp_path: Path) -> None:
    """ShuffleNet v2 was refused (torch-pruning divided by zero on its channel shuffle). Its trunk,
    which every shuffle permutes, is kept whole; the stem, every branch's inner width and the last
    conv are pruned. The pruned model must compute what the dense one computes with the removed
    channels zeroed (BatchNorm scales made distinct first, so that they tell which channels were
    kept), and its ONNX file must match it."""
    torch.manual_seed(0)
    model = build_model("torchvision:shufflenet_v2_x0_5", data64.input_shape, data64.num_classes).eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.weight.data, bn.bias.data = 0.5 + torch.rand(bn.num_features), 0.1 * torch.randn(bn.num_features)
    recalibrate_bn(model, data64.x_train, 32, batch_size=32, seed=0)  # else every input gives the same logits
    model.eval()
    dense = copy.deepcopy(model)
    space = PruningSpace(model, data64.x_train[:1], data64.num_classes, round_to=8)
    space.apply(model, space.project(rule_allocation("uniform", space, model, calib=None), TARGET_MACS, "macs"))
    macs_ratio = count_macs(model, data64.x_train[:1]) / space.dense_macs
    assert abs(macs_ratio - TARGET_MACS) <= MACS_TOL * TARGET_MACS, f"achieved MACs {macs_ratio:.4f}"
    assert [g for g in space.groups if g.unsafe] and all("channel shuffle" in g.unsafe for g in space.groups if g.unsafe)
    net, ref = model[1], dense[1]
    # (where the removed channels are zeroed in the dense model, the pruned and dense BN that tell them)
    pairs = [((ref.conv1, ref.stage2[0].branch1[1]), net.conv1[1], ref.conv1[1]),  # the stem feeds a depthwise conv
             ((ref.conv5,), net.conv5[1], ref.conv5[1])]
    for stage in ("stage2", "stage3", "stage4"):
        for name, block in getattr(ref, stage).named_children():
            pairs.append(((block.branch2[4],), getattr(net, stage)[int(name)].branch2[1], block.branch2[1]))
    narrower = 0
    for places, pruned_bn, dense_bn in pairs:
        kept = [i for i, w in enumerate(dense_bn.weight) if bool((pruned_bn.weight == w).any())]
        assert len(kept) == pruned_bn.num_features
        narrower += len(kept) < dense_bn.num_features
        mask = torch.zeros(dense_bn.num_features)
        mask[kept] = 1
        for where in places:
            where.register_forward_hook(lambda mod, args, out, m=mask: out * m.view(1, -1, 1, 1))
    assert narrower >= len(pairs) // 2
    with torch.no_grad():
        torch.testing.assert_close(model(data64.x_test), dense(data64.x_test), atol=1e-4, rtol=1e-3)
    assert _onnx_parity(model, data64, tmp_path) <= MAX_ABS_DIFF
