"""The policy's data probes (loss curves, the sensitivity allocation) and the guard's choice."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metacompress.compress.prune import PruningSpace
from metacompress.policy.features import ExpertAllocations
from metacompress.policy.guard import guard_choice
from metacompress.policy.probes import CURVE_RATIOS, loss_curves, removable_shares, sensitivity_allocation
from metacompress.zoo import build_model


def test_loss_curve_is_the_loss_of_the_pruned_model(trained, digits):
    """Masking a group's units computes what pruning them does: the curve is that exact loss."""
    model = trained("mlp")
    space = PruningSpace(model, digits.x_train[:1], 10)
    x, y = digits.calibration_batch(128)
    curves = loss_curves(model, space, (x, y))
    assert curves.shape == (len(space.groups), len(CURVE_RATIOS))
    with torch.no_grad():
        base = F.cross_entropy(model(x), y).item()
    gi, ri = 0, CURVE_RATIOS.index(0.6)
    keep = [g.channels for g in space.groups]
    keep[gi] = space.groups[gi].channels - int(round(0.6 * space.groups[gi].channels))
    pruned = space.apply(copy.deepcopy(model), keep, "magnitude")
    with torch.no_grad():
        assert F.cross_entropy(pruned(x), y).item() - base == pytest.approx(curves[gi, ri], abs=1e-4)
    assert curves[:, -1].mean() > curves[:, 0].mean()  # losing 90 % of a group hurts more than 10 %


def test_sensitivity_allocation_spares_the_sensitive_group():
    steep = 2.0 * np.array(CURVE_RATIOS) ** 2
    flat = 0.1 * np.array(CURVE_RATIOS)
    dipping = np.array([0.0, -0.1, 0.2, 0.1, 0.6, 0.9])  # noise: made non-decreasing
    fn = sensitivity_allocation(np.stack([steep, flat, dipping]), np.array([0.3, 0.3, 0.3]))
    previous = np.zeros(3)
    for scale in np.linspace(0, 1, 41):
        r = np.asarray(fn(scale))
        assert (r >= previous - 1e-12).all() and (r <= 0.9 + 1e-12).all()  # non-decreasing, capped
        previous = r
    mid = np.asarray(fn(0.5))
    assert mid[1] > mid[0]
    # a nearly free price prunes only what costs nothing (the dip, flattened to 0); a huge one, all
    assert fn(0.0) == pytest.approx([0.0, 0.0, 0.3]) and fn(1.0) == pytest.approx([0.9] * 3)


@pytest.mark.parametrize("name", ["resnet20", "vit-tiny"])
def test_sensitivity_expert_meets_the_budget(name, digits):
    torch.manual_seed(0)
    model = build_model(name, digits.input_shape, 10, digits.mean, digits.std).eval()
    space = PruningSpace(model, digits.x_train[:1], 10)
    calib = digits.calibration_batch(64)
    experts = ExpertAllocations(model, space, calib, ("lamp", "sensitivity"))
    channels = np.array([g.channels for g in space.groups])
    mac_share, param_share = removable_shares(space)
    assert ((mac_share > 0) & (mac_share <= 1)).all() and ((param_share >= 0) & (param_share <= 1)).all()
    for metric in ("macs", "params"):
        for target in (0.2, 0.5):
            ratios = experts.ratios(target, metric)
            assert ratios.shape == (len(space.groups), 2)
            keep = np.round(channels * (1 - ratios[:, 1])).astype(int)
            got = space.estimate(list(keep))[0 if metric == "macs" else 1]
            dense = space.dense_macs if metric == "macs" else space.dense_params
            assert abs(got / dense - target) <= 0.02 * target


def test_guard_keeps_uniform_unless_beaten_by_more_than_one_image():
    n = 100
    acc = {"policy": 0.91, "policy-allocation": 0.905, "uniform": 0.90}
    loss = {"policy": 0.3, "policy-allocation": 0.3, "uniform": 0.3}
    assert guard_choice(acc, loss, n) == "uniform"                      # +1 image: within noise
    assert guard_choice({**acc, "policy": 0.92}, loss, n) == "policy"   # +2 images
    # accuracy ties between the policy's candidates fall to the lower validation loss, then to order
    acc2 = {"policy": 0.95, "policy-allocation": 0.95, "uniform": 0.90}
    assert guard_choice(acc2, {**loss, "policy": 0.5}, n) == "policy-allocation"
    assert guard_choice(acc2, loss, n) == "policy"
    # without the uniform candidate (it repeated the policy's allocation) the best one is kept
    assert guard_choice({"policy": 0.8, "policy-allocation": 0.85}, {"policy": 0.3, "policy-allocation": 0.3},
                        n) == "policy-allocation"
    assert guard_choice({"uniform": 0.5}, {"uniform": 1.0}, n) == "uniform"
    with pytest.raises(ValueError):
        guard_choice({}, {}, n)
