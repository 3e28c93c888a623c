"""The policy's data probes (loss curves, the sensitivity allocation) and the guard's choice."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metacompress.compress.distill import RepairConfig, recalibrate_bn
from metacompress.compress.prune import PruningSpace
from metacompress.policy.features import ExpertAllocations, group_features, policy_inputs
from metacompress.policy.guard import (
    SCREEN_BN_SAMPLES,
    SCREEN_VAL_SAMPLES,
    SIGNIFICANCE,
    fallback_of,
    guard_choice,
    paired_test,
    screen_config,
    screened_rule,
    versus_fallback,
)
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


def test_bn_probe_is_the_loss_after_recalibration_and_leaves_the_model_alone(trained, digits):
    """On a BN network the expert's probe gives the loss the pruned model has once BN is
    recalibrated on the probe batch (what every repair starts with), not the far worse one with
    stale statistics; that one is still there on request (the policy's features read it)."""
    model = trained("resnet20", epochs=5)
    space = PruningSpace(model, digits.x_train[:1], 10)
    x, y = digits.calibration_batch(16)  # the smallest probe batch: used whole
    state = {k: v.clone() for k, v in model.state_dict().items()}
    curves = loss_curves(model, space, (x, y))
    assert not model.training and all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    def recalibrated_loss(m):
        recalibrate_bn(m, x, len(x), batch_size=len(x))
        with torch.no_grad():
            return F.cross_entropy(m(x), y).item()

    gi = int(np.argmax(curves[:, -1]))  # the group whose pruning hurts most
    ri = CURVE_RATIOS.index(0.6)
    keep = [g.channels for g in space.groups]
    keep[gi] -= int(round(0.6 * keep[gi]))
    pruned = space.apply(copy.deepcopy(model), keep, "magnitude")
    with torch.no_grad():
        stale = F.cross_entropy(pruned(x), y).item() - F.cross_entropy(model(x), y).item()
    increase = recalibrated_loss(pruned) - recalibrated_loss(copy.deepcopy(model))
    assert curves[gi, ri] == pytest.approx(increase, rel=0.05, abs=2e-3)
    # on running statistics (what the policy's features read) the probe is the stale-statistics loss
    running = loss_curves(model, space, (x, y), ratios=(0.6,), batch_stats=False)
    assert running[gi, 0] == pytest.approx(stale, abs=1e-4)
    assert stale > 1.5 * increase  # the two differ: stale statistics overstate the damage


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


def _votes(right: int, n: int = 100, offset: int = 0) -> np.ndarray:
    """Per-image correctness: images offset .. offset+right-1 right, the rest wrong."""
    v = np.zeros(n, dtype=bool)
    v[offset:offset + right] = True
    return v


def test_paired_test_counts_disagreements_and_gives_the_exact_sign_test():
    ref = _votes(90)
    t = paired_test(_votes(90, offset=5), ref)   # 5 images won at the end, 5 lost at the start
    assert (t.wins, t.losses) == (5, 5) and t.p_value == pytest.approx(638 / 1024)
    t = paired_test(_votes(95), ref)
    assert (t.wins, t.losses) == (5, 0) and t.p_value == pytest.approx(1 / 32)
    assert paired_test(ref, ref) == (0, 0, 1.0)
    with pytest.raises(ValueError):
        paired_test(ref, ref[:50])


def test_guard_keeps_uniform_unless_a_paired_test_says_otherwise():
    loss = {"policy": 0.3, "policy-allocation": 0.3, "uniform": 0.3}
    uniform = _votes(60)                                        # images 0..59 right
    assert SIGNIFICANCE == 0.1
    # the same +5 images: significant when the models agree elsewhere, noise when they disagree a lot
    clear = {"policy": _votes(65), "policy-allocation": _votes(60), "uniform": uniform}
    noisy = {"policy": _votes(65, offset=20), "policy-allocation": _votes(60), "uniform": uniform}  # +25 -20
    assert guard_choice(clear, loss) == "policy"
    assert guard_choice(noisy, loss) == "uniform"
    assert guard_choice({**clear, "policy": _votes(63)}, loss) == "uniform"  # 3 of 3: p = 1/8
    # among candidates that pass: accuracy, then the lower validation loss, then candidate order
    both = {"policy": _votes(70), "policy-allocation": _votes(70), "uniform": uniform}
    assert guard_choice(both, {**loss, "policy": 0.5}) == "policy-allocation"
    assert guard_choice(both, loss) == "policy"
    assert guard_choice({**both, "policy-allocation": _votes(75)}, loss) == "policy-allocation"
    # without a fixed-rule candidate the best one is kept
    assert guard_choice({"policy": _votes(80), "policy-allocation": _votes(85)}, loss) == "policy-allocation"
    assert guard_choice({"uniform": uniform}, loss) == "uniform"
    with pytest.raises(ValueError):
        guard_choice({}, {})


def test_guard_weighs_the_policy_against_the_better_fixed_rule():
    loss = {"policy": 0.3, "policy-allocation": 0.3, "uniform": 0.3, "global-magnitude": 0.3}
    policy = {"policy": _votes(70), "policy-allocation": _votes(60)}
    # a screened rule better than uniform becomes the fallback; the policy must beat it, not uniform
    assert guard_choice({**policy, "uniform": _votes(60), "global-magnitude": _votes(68)}, loss) == "global-magnitude"
    assert guard_choice({**policy, "uniform": _votes(60), "global-magnitude": _votes(64)}, loss) == "policy"
    # the fallback is the better fixed rule on validation, uniform on an exact tie
    assert fallback_of({"uniform": _votes(60), "global-magnitude": _votes(62)}, loss) == "global-magnitude"
    assert fallback_of({"uniform": _votes(60), "global-magnitude": _votes(60)}, loss) == "uniform"
    assert fallback_of({"uniform": _votes(60), "global-magnitude": _votes(60)},
                       {**loss, "global-magnitude": 0.2}) == "global-magnitude"
    assert fallback_of(policy, loss) is None
    tests = versus_fallback({**policy, "uniform": _votes(60), "global-magnitude": _votes(68)}, loss)
    assert tests["policy"][:2] == (2, 0) and tests["policy-allocation"][:2] == (0, 8)


def test_screen_picks_the_rule_right_on_most_of_the_first_validation_images():
    head = _votes(SCREEN_VAL_SAMPLES // 2, n=SCREEN_VAL_SAMPLES + 100)
    tail = _votes(SCREEN_VAL_SAMPLES // 2 - 1, n=SCREEN_VAL_SAMPLES + 100)
    tail[SCREEN_VAL_SAMPLES:] = True    # beyond the screened images: not counted
    assert screened_rule({"global-taylor": tail, "lamp": head}) == "lamp"
    assert screened_rule({"lamp": head, "global-magnitude": head}) == "global-magnitude"  # order breaks ties
    with pytest.raises(ValueError):
        screened_rule({})
    cfg = screen_config(RepairConfig(steps=150, bn_samples=512, samples_per_class=10))
    assert (cfg.steps, cfg.bn_samples, cfg.samples_per_class) == (0, SCREEN_BN_SAMPLES, 10)
    assert screen_config(RepairConfig(bn_samples=16)).bn_samples == 16


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_policy_inputs_measure_what_features_and_experts_measure_alone(name, digits):
    """policy_inputs shares probes between features and experts only where that changes nothing:
    with BN the features keep running statistics and the sensitivity expert uses the batch's."""
    torch.manual_seed(0)
    model = build_model(name, digits.input_shape, 10, digits.mean, digits.std).eval()
    space = PruningSpace(model, digits.x_train[:1], 10)
    calib = digits.calibration_batch(64)
    rules = ("lamp", "sensitivity")
    feats, experts = policy_inputs(model, space, calib, rules)
    assert np.array_equal(feats, group_features(model, space, calib))
    assert np.array_equal(experts.ratios(0.3), ExpertAllocations(model, space, calib, rules).ratios(0.3))
