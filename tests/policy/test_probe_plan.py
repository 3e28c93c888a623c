"""Probe planning: prefix reuse computes the same loss curves, and a model over the probe budget
has a spread subset of its groups measured and the rest sharing their curves."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metacompress.compress.prune import PruningSpace
from metacompress.policy import probe_plan
from metacompress.policy.features import PROBE_RATIOS
from metacompress.policy.probe_plan import PrefixCache, plan_probes, profile_forward
from metacompress.policy.probes import CURVE_RATIOS, loss_curves, probe_samples
from metacompress.zoo import build_model


class InPlace(nn.Module):
    """In-place changes of layer outputs by a layer and by the model's code, a reused activation
    module and a residual addition: what a replayed prefix must not corrupt."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.bn3 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.act(self.bn1(self.c1(x)))
        y = self.bn2(self.c2(x))
        y.mul_(2.0)  # not idempotent: a record changed twice would show
        x = self.act(self.bn3(self.c3(x + y)))
        return self.head(x.mean((2, 3)))


def small_vit() -> nn.Module:
    """torchvision's VisionTransformer (``nn.MultiheadAttention`` blocks), small enough for a test."""
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts it at zero: every loss would be equal
    return model


def _model_and_batch(spec, shape=(3, 32, 32), n=16):
    torch.manual_seed(0)
    own = {"inplace": InPlace, "torchvision-vit": small_vit}
    model = (own[spec]() if spec in own else build_model(spec, shape, 10)).eval()
    x, y = torch.randn(n, *shape), torch.randint(0, 10, (n,))
    return model, PruningSpace(model, x[:1], 10), (x, y)


@pytest.mark.parametrize("spec", ["inplace", "resnet20", "vit-tiny", "torchvision:resnet18", "torchvision-vit"])
def test_prefix_reuse_gives_the_curves_of_whole_passes_bit_for_bit(spec, monkeypatch):
    model, space, calib = _model_and_batch(spec)
    reused = loss_curves(model, space, calib)
    running = loss_curves(model, space, calib, ratios=(0.6,), batch_stats=False)
    assert plan_probes(space.groups, profile_forward(model, calib[0]), 8, 6).prefix != (0,) * len(space.groups)
    monkeypatch.setattr(probe_plan, "PREFIX_CACHE_BYTES", 0)  # no room to record: every probe runs whole
    assert np.array_equal(reused, loss_curves(model, space, calib))
    assert np.array_equal(running, loss_curves(model, space, calib, ratios=(0.6,), batch_stats=False))
    assert np.abs(reused).max() > 0


class Convolutions(torch.overrides.TorchFunctionMode):
    """Counts the convolutions a forward pass computes."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func is F.conv2d
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("spec", ["inplace", "torchvision:resnet18", "torchvision-vit"])
def test_any_replayed_prefix_gives_the_dense_output_and_leaves_the_record_intact(spec):
    model, _, (x, _) = _model_and_batch(spec)
    profile = profile_forward(model, x)
    assert profile.cacheable.all()  # attention modules too: they are replayed, not recomputed
    cache = PrefixCache(model, profile)
    with torch.no_grad():
        dense = cache.record(x)
        for calls in range(1, len(profile.names) + 1):
            for _ in range(2):  # the second replay sees the record the first one left
                with cache.replaying(calls):
                    assert torch.equal(model(x), dense), calls
    assert not any("forward" in m.__dict__ for m in model.modules())  # the layers are themselves again


def test_a_replayed_prefix_is_not_computed():
    model, _, (x, _) = _model_and_batch("torchvision:resnet18")
    profile = profile_forward(model, x)
    cache = PrefixCache(model, profile)
    with torch.no_grad():
        cache.record(x)
        with Convolutions() as convs, cache.replaying(len(profile.names) // 2):
            model(x)
    assert 0 < convs.count < 20  # resnet18 has 20 convolutions


def test_over_budget_a_spread_subset_is_measured_and_shared_by_kind(monkeypatch):
    model, space, calib = _model_and_batch("resnet20")
    full = loss_curves(model, space, calib)
    profile = profile_forward(model, calib[0])
    n, points = probe_samples(space), len(CURVE_RATIOS)
    whole = plan_probes(space.groups, profile, n, points, budget=float("inf"))
    assert whole.probed == tuple(range(len(space.groups)))
    monkeypatch.setattr(probe_plan, "PROBE_COST_BUDGET", whole.cost / 3)
    plan = plan_probes(space.groups, profile, n, points)
    assert 1 < len(plan.probed) < len(space.groups) and plan.cost <= whole.cost / 3
    by_execution = sorted(range(len(space.groups)), key=lambda i: profile.first_call(space.groups[i].in_layers))
    assert by_execution[0] in plan.probed and by_execution[-1] in plan.probed  # spread: both ends
    shared = loss_curves(model, space, calib)
    for i, src in enumerate(plan.source):
        assert src in plan.probed and space.groups[src].kind == space.groups[i].kind
        assert np.array_equal(shared[i], full[src])


@pytest.mark.parametrize("spec,shape", [("resnet20", (3, 32, 32)), ("vgg-small", (3, 32, 32)), ("lenet5", (1, 32, 32)),
                                        ("mobilenet-small", (3, 32, 32)), ("vit-tiny", (3, 32, 32)), ("mlp", (1, 28, 28))])
def test_the_policys_own_models_have_every_group_measured(spec, shape):
    """The meta-training and held-out families fit the budget: their features are what they were."""
    model, space, calib = _model_and_batch(spec, shape, n=2)
    plan = plan_probes(space.groups, profile_forward(model, calib[0]), probe_samples(space),
                       len(CURVE_RATIOS) + len(PROBE_RATIOS))
    assert plan.probed == tuple(range(len(space.groups)))
    assert plan.cost < probe_plan.PROBE_COST_BUDGET / 10
