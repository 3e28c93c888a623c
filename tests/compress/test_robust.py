"""Prune-robust meta-training: masks are pruning, robustify helps pruned sub-networks, the dense
accuracy floor holds, bad input is refused with exit code 2."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metacompress.compress.importance import unit_scores
from metacompress.compress.masks import ChannelMasks, masked
from metacompress.compress.prune import PruningSpace
from metacompress.compress.robust import RobustConfig, TaskSampler, parse_budgets, robustify
from metacompress.compress.rules import rule_allocation
from metacompress.data import load_dataset
from metacompress.errors import UserError
from metacompress.pipeline import CompressConfig, Timer, compress_stages, load_dense
from metacompress.training import accuracy
from metacompress.zoo import build_model

MC = [sys.executable, "-m", "metacompress.cli.main"]
ENV = {**os.environ, "METACOMPRESS_PROGRESS": "0"}


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine terms, so that eval-mode BN cannot hide a wrong mask."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


@pytest.mark.parametrize("spec,data", [("mlp", "digits"), ("lenet5", "digits@16"), ("resnet20", "digits@16"),
                                       ("mobilenet-small", "digits@16"), ("vit-tiny", "digits@16"),
                                       ("vgg-small", "digits@16")])
def test_masked_model_equals_physically_pruned_model(spec, data):
    d = load_dataset(data)
    torch.manual_seed(0)
    model = build_model(spec, d.input_shape, d.num_classes, d.mean, d.std).eval()
    _randomise_bn(model)
    space = PruningSpace(model, d.x_train[:1], d.num_classes, 8)
    scores = unit_scores(model, space.groups, "magnitude", example=space.example)
    keep = space.project(rule_allocation("uniform", space, model, None), 0.3)
    assert any(k < g.channels for k, g in zip(keep, space.groups))
    masks = ChannelMasks(model, space)
    pruned = space.apply(copy.deepcopy(model), keep, scores=scores)
    x = d.x_test[:64]
    with torch.no_grad():
        want = pruned(x)
        got = functional_call(model, masked(dict(model.named_parameters()), masks.param_masks(
            masks.unit_masks(keep, scores))), (x,))
        dense = model(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), float((got - want).abs().max())
    assert not torch.allclose(dense, want, atol=1e-3)  # the masks did something


def test_masks_equal_pruning_on_1d_and_3d_convolutions():
    """Channel masks of Conv1d/Conv3d groups (BatchNorm1d/3d, a depthwise conv, a flatten into the
    classifier) reproduce the physically pruned model."""
    torch.manual_seed(0)
    for conv, bn, shape in ((nn.Conv1d, nn.BatchNorm1d, (3, 24)), (nn.Conv3d, nn.BatchNorm3d, (2, 6, 6, 6))):
        model = nn.Sequential(conv(shape[0], 16, 3, padding=1), bn(16), nn.ReLU(),
                              conv(16, 16, 3, padding=1, groups=16), bn(16), nn.ReLU(),
                              conv(16, 24, 1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
        x = torch.randn(8, *shape)
        model(x)
        model.eval()
        _randomise_bn(model)
        space = PruningSpace(model, x[:1], 5, 8)
        scores = unit_scores(model, space.groups, "magnitude", example=space.example)
        keep = space.project(rule_allocation("uniform", space, model, None), 0.4)
        assert any(k < g.channels for k, g in zip(keep, space.groups))
        pruned = space.apply(copy.deepcopy(model), keep, scores=scores)
        masks = ChannelMasks(model, space)
        with torch.no_grad():
            got = functional_call(model, masked(dict(model.named_parameters()), masks.param_masks(
                masks.unit_masks(keep, scores))), (x,))
            assert torch.allclose(got, pruned(x), atol=1e-5, rtol=1e-4), conv.__name__


def test_tasks_meet_their_budgets_under_any_cost_model(trained, digits):
    """A budget in another cost (here a stand-in for the latency model: parameters) is a valid task draw:
    every drawn task, perturbed or not, keeps its budget's fraction of that cost."""
    dense = trained("mlp")
    space = PruningSpace(dense, digits.x_train[:1], digits.num_classes, 8)

    class ParamsCost:
        name = "params-cost"

        def fraction(self, keep):
            return space.kept_fraction(keep, "params")

    cost = ParamsCost()
    uniform = rule_allocation("uniform", space, dense, None)
    sampler = TaskSampler(space, [lambda b: space.project(uniform, b, cost)], RobustConfig(tasks=5), cost, seed=0)
    tasks = [t for _ in range(3) for t in sampler.draw()]
    assert [b for b, _ in tasks[:2]] == [0.15, 0.7]
    for budget, keep in tasks:
        assert cost.fraction(keep) == pytest.approx(budget, rel=0.02)
    assert len({tuple(k) for _, k in tasks}) > 2  # random budgets and perturbed allocations differ


def _pruned_accuracy(model, space, ratio_fn, data, budget: float) -> float:
    return accuracy(space.apply(copy.deepcopy(model), space.project(ratio_fn, budget)), data.x_test, data.y_test)


@pytest.fixture(scope="module")
def mlp_case(digits):
    dense = load_dense("mlp", digits, None, seed=0, epochs=15)  # its own teacher: the shared one may differ
    space = PruningSpace(dense, digits.x_train[:1], digits.num_classes, 8)
    uniform = rule_allocation("uniform", space, dense, None)
    robust = copy.deepcopy(dense)
    result = robustify(robust, digits, space, [lambda b: space.project(uniform, b)], RobustConfig(steps=60), seed=0,
                       progress=False)
    return dense, robust, space, uniform, result


def test_robustify_raises_post_prune_accuracy(mlp_case, digits):
    dense, robust, space, uniform, _ = mlp_case
    for budget in (0.15, 0.3):  # right after pruning (the MLP has no BN to recalibrate)
        before = _pruned_accuracy(dense, space, uniform, digits, budget)
        after = _pruned_accuracy(robust, space, uniform, digits, budget)
        assert after >= before + 0.10, (budget, before, after)


def test_dense_accuracy_floor_holds(mlp_case, digits):
    dense, robust, _, _, result = mlp_case
    assert result.kept_step > 0  # robust weights came back, not the given ones
    assert result.dense_val_before == pytest.approx(accuracy(dense, digits.x_val, digits.y_val))
    assert accuracy(robust, digits.x_val, digits.y_val) == pytest.approx(result.dense_val_after)
    assert result.dense_val_after >= result.dense_val_before - 0.005


def test_robustify_gives_back_the_given_weights_when_the_floor_fails(trained, digits):
    dense = trained("mlp")
    space = PruningSpace(dense, digits.x_train[:1], digits.num_classes, 8)
    uniform = rule_allocation("uniform", space, dense, None)
    model = copy.deepcopy(dense)
    cfg = RobustConfig(steps=4, inner_lr=0.5, outer_lr=30.0, checks=2)  # steps this large wreck the dense model
    result = robustify(model, digits, space, [lambda b: space.project(uniform, b)], cfg, progress=False)
    assert result.kept_step == 0 and "unchanged" in result.warnings[0]
    assert "one of the 144 validation images is 0.0069" in result.warnings[0]  # finer than one image: said so
    assert all(c["dense_val_accuracy"] < result.dense_val_before - 0.005 for c in result.checks)
    for (n, a), b in zip(dense.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n


def test_failed_checks_are_restored_by_dense_steps_and_the_run_goes_on(trained, digits):
    dense = trained("mlp")
    space = PruningSpace(dense, digits.x_train[:1], digits.num_classes, 8)
    uniform = rule_allocation("uniform", space, dense, None)
    allocations = [lambda b: space.project(uniform, b)]
    cfg = dict(steps=20, outer_lr=3.0, checks=4)  # large outer steps: the first check falls under the floor
    without = robustify(copy.deepcopy(dense), digits, space, allocations, RobustConfig(**cfg, restore_steps=0),
                        progress=False)
    assert without.kept_step == 0 and "unchanged" in without.warnings[0]
    model = copy.deepcopy(dense)
    result = robustify(model, digits, space, allocations, RobustConfig(**cfg, restore_steps=60), progress=False)
    floor = result.dense_val_before - 0.005
    first = result.checks[0]
    assert first["step"] == 5 and "restore_step" not in first and first["dense_val_accuracy"] < floor
    restores = [c for c in result.checks if c["step"] == 5 and "restore_step" in c]
    assert restores and restores[-1]["dense_val_accuracy"] >= floor  # brought back before step 6
    assert result.kept_step == 20 and 0 < result.restored_by and not result.warnings
    assert result.dense_val_after >= floor
    assert accuracy(model, digits.x_val, digits.y_val) == pytest.approx(result.dense_val_after)
    assert result.forward_backward >= without.forward_backward + result.restored_by
    for budget in (0.3, 0.15):  # the sub-networks still gained
        before = _pruned_accuracy(dense, space, uniform, digits, budget)
        assert _pruned_accuracy(model, space, uniform, digits, budget) >= before + 0.05, budget


def test_compress_runs_robustify_as_a_stage():
    timer = Timer()
    cfg = CompressConfig(model="mlp", data="digits", weights="none", target_macs=0.3, allocation="uniform",
                         round_to=8, robustify=RobustConfig(steps=3, checks=1))
    cfg.repair.steps = 0
    c = compress_stages(cfg, timer)
    assert "robustify" in timer.timings and list(timer.timings).index("robustify") < list(timer.timings).index("prune")
    assert c.prep.robust["steps"] == 3 and c.prep.robust["dense_test_accuracy"] == c.prep.dense_accuracy
    assert c.prep.dense_logits is None  # the logits of the model before robustify are no reference for its ONNX file


@pytest.mark.parametrize("overridden", [False, True])
def test_compress_repairs_a_robust_model_at_two_rates_and_keeps_the_better_on_validation(overridden):
    from metacompress.students import GENTLE_LR_FACTOR

    cfg = CompressConfig(model="mlp", data="digits", weights="none", target_macs=0.3, allocation="uniform",
                         round_to=8, robustify=RobustConfig(steps=3, checks=1),
                         repair_overrides=("lr",) if overridden else ())
    cfg.repair.steps = 5
    c = compress_stages(cfg, Timer())
    if overridden:  # an explicit --repair-lr is the rate
        assert "repair" not in c.prep.robust and c.repair.lr == cfg.repair.lr
        return
    tried = c.prep.robust["repair"]["lr"]
    assert set(tried) == {f"{cfg.repair.lr:g}", f"{cfg.repair.lr * GENTLE_LR_FACTOR:g}"}
    best = max(tried.values())
    assert c.repair.lr == c.prep.robust["repair"]["chosen_lr"]
    assert tried[f"{c.repair.lr:g}"] == best
    assert c.students[0]["val_accuracy"] == best  # the kept student is the one that scored


@pytest.mark.parametrize("gentle_wins", [False, True])
def test_robust_repair_choice_keeps_the_rate_that_wins_on_validation(monkeypatch, gentle_wins):
    from metacompress import students
    from metacompress.compress.distill import RepairConfig

    def fake_repair(pruned, teacher, data, cfg, seed, test=True):
        gentle = cfg.lr < RepairConfig().lr
        return {"val_accuracy": 0.9 if gentle == gentle_wins else 0.8, "val_loss": 0.5, "lr": cfg.lr}

    monkeypatch.setattr(students, "repair_one", fake_repair)
    cfg, kept, info = students.robust_repair_choice(None, None, None, RepairConfig(steps=5), seed=0)
    assert (cfg.lr < RepairConfig().lr) == gentle_wins and kept["lr"] == cfg.lr == info["chosen_lr"]


def _run(*args):
    return subprocess.run([*MC, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300)


NO_GROUPS = "import torch.nn as nn\n\ndef make(input_shape, num_classes):\n" \
            "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n"


@pytest.mark.parametrize("text,fragment", [("0.7-0.2", "smallest-largest"), ("abc", "0.15-0.7"), ("0.1-0.2-0.3", "0.15-0.7"),
                                           ("nan", "0.15-0.7")])
def test_bad_budget_ranges_are_refused(text, fragment):
    with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
        parse_budgets(text)


def test_bad_robust_settings_are_refused():
    for bad in (dict(steps=0), dict(tasks=1), dict(dense_weight=1.0), dict(inner_lr=0.0), dict(restore_steps=-1),
                dict(restore_checks=0)):
        with pytest.raises(UserError):
            RobustConfig(**bad).validate()
    assert parse_budgets("0.3") == (0.3, 0.3)


@pytest.mark.integration
@pytest.mark.parametrize("args,fragment", [
    (("--budgets", "0-0.5"), "(0, 1]"),
    (("--budgets", "0.2-1.5"), "(0, 1]"),
    (("--inner-steps", "0"), "inner steps must be >= 1"),
    (("--max-drop", "-0.1"), "max_drop >= 0"),
])
def test_robustify_cli_bad_input_exits_2(tmp_path, args, fragment):
    out = tmp_path / "robust.pt"
    res = _run("robustify", "mlp", "--weights", "none", "--out", out, *args)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert not out.exists()


@pytest.mark.integration
def test_robustify_cli_refuses_a_model_without_prunable_groups(tmp_path):
    (tmp_path / "tiny.py").write_text(NO_GROUPS)
    out = tmp_path / "robust.pt"
    res = _run("robustify", f"{tmp_path / 'tiny.py'}:make", "--weights", "none", "--allocation", "uniform", "--out", out)
    assert res.returncode == 2, res.stderr
    assert "no prunable groups" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


@pytest.mark.integration
def test_robustify_cli_writes_loadable_weights(tmp_path, trained):
    weights = tmp_path / "dense.pt"
    torch.save(trained("mlp").state_dict(), weights)
    out = tmp_path / "robust.pt"
    res = _run("robustify", "mlp", "--weights", weights, "--data", "digits", "--budgets", "0.2-0.6", "--steps", "5",
               "--allocation", "uniform", "--out", out, "--json")
    assert res.returncode == 0, res.stderr
    state = torch.load(out, weights_only=True)
    assert set(state) == set(trained("mlp").state_dict())
    assert '"kept_step": 5' in res.stdout
