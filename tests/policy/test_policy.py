"""The meta-learned policy: projection, features, save/load, bad files, and that the shipped
default beats the uniform rule on a small task in the short-repair regime."""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from metacompress.compress.distill import RepairConfig
from metacompress.compress.prune import PruningSpace
from metacompress.errors import UserError
from metacompress.policy.features import FEATURE_NAMES, NUM_FEATURES, fold_unseen_kinds, group_features
from metacompress.policy.network import Shapes, decide, init_params
from metacompress.policy.store import Policy, load_policy, save_policy
from metacompress.policy.tasks import CompressionTask, TaskPool, Teacher
from metacompress.zoo import build_model

ZOO = ["mlp", "lenet5", "vgg-small", "resnet20", "resnet56", "mobilenet-small", "vit-tiny"]


@pytest.mark.parametrize("name", ZOO)
def test_policy_allocation_meets_budget_for_every_zoo_model(name, digits):
    torch.manual_seed(0)
    model = build_model(name, digits.input_shape, 10, digits.mean, digits.std).eval()
    space = PruningSpace(model, digits.x_train[:1], 10)
    feats = group_features(model, space, digits.calibration_batch(64))
    assert feats.shape == (len(space.groups), NUM_FEATURES) and np.isfinite(feats).all()
    theta = np.random.default_rng(1).normal(0, 0.5, Shapes.size())  # a non-trivial policy
    for target in (0.1 if name != "vit-tiny" else 0.15, 0.3, 0.5, 0.8):
        d = decide(theta, feats, target, RepairConfig(steps=20))
        keep = space.project(d.ratio_fn(), target)
        assert abs(space.estimate(keep)[0] / space.dense_macs - target) <= 0.02 * target


def test_initial_policy_is_the_uniform_rule():
    feats = np.random.default_rng(0).normal(size=(5, NUM_FEATURES)).astype(np.float32)
    d = decide(init_params(0), feats, 0.3, RepairConfig(steps=20))
    assert np.allclose(d.scores, d.scores[0])
    assert d.repair == RepairConfig(steps=20)


def test_repair_head_reacts_to_the_regime():
    rng = np.random.default_rng(0)
    theta = rng.normal(0, 0.5, Shapes.size())
    feats = rng.normal(size=(4, NUM_FEATURES)).astype(np.float32)
    a = decide(theta, feats, 0.3, RepairConfig(steps=20)).repair
    b = decide(theta, feats, 0.3, RepairConfig(steps=50, samples_per_class=10)).repair
    assert (a.lr, a.temperature) != (b.lr, b.temperature)
    assert b.samples_per_class == 10 and b.steps == 50  # the regime itself is the user's


def test_kinds_unseen_in_meta_training_are_shown_as_the_closest_seen_kind(digits):
    """ES random-walks the input weights of a one-hot that is always 0 in meta-training; with
    the fold, a policy's decision on depthwise / attention groups cannot depend on them."""
    rng = np.random.default_rng(0)
    theta = rng.normal(0, 0.5, Shapes.size())
    seen = ("conv", "linear")
    for name in ("mobilenet-small", "vit-tiny"):
        torch.manual_seed(0)
        model = build_model(name, digits.input_shape, 10, digits.mean, digits.std).eval()
        space = PruningSpace(model, digits.x_train[:1], 10)
        feats = group_features(model, space, digits.calibration_batch(64))
        unseen = [FEATURE_NAMES.index(f"kind_{k}") for k in ("depthwise", "attention")]
        assert feats[:, unseen].sum() > 0  # the family has groups of a kind the policy did not meet
        folded = fold_unseen_kinds(feats, seen)
        assert folded[:, unseen].sum() == 0
        np.testing.assert_allclose(folded.sum(1), feats.sum(1), rtol=1e-6)  # moved, not dropped
        noisy = theta.copy()
        w1 = dict(Shapes.layout())["w1"]
        start = 0  # w1 is the first block: rows are input features
        for col in unseen:
            noisy[start + col * w1[1]:start + (col + 1) * w1[1]] += rng.normal(0, 3, w1[1])
        a = decide(theta, feats, 0.3, RepairConfig(steps=20), kinds_seen=seen)
        b = decide(noisy, feats, 0.3, RepairConfig(steps=20), kinds_seen=seen)
        np.testing.assert_allclose(a.scores, b.scores)
        c = decide(noisy, feats, 0.3, RepairConfig(steps=20))  # without the fold the noise leaks through
        assert not np.allclose(a.scores, c.scores)
    assert fold_unseen_kinds(feats, None) is feats


def test_save_load_round_trip_and_bad_files(tmp_path):
    theta = np.random.default_rng(0).normal(size=Shapes.size())
    pol = Policy(theta, RepairConfig(lr=0.01), {"iterations": 3}, ("conv", "linear"))
    save_policy(pol, tmp_path)
    back = load_policy(tmp_path)
    np.testing.assert_array_equal(back.theta, theta)
    assert back.defaults.lr == 0.01 and back.provenance["iterations"] == 3
    assert back.kinds_seen == ("conv", "linear")
    meta = json.loads((tmp_path / "policy.json").read_text())
    (tmp_path / "policy.json").write_text(json.dumps({**meta, "kinds_seen": ["conv", "pooling"]}))
    with pytest.raises(UserError, match="kinds_seen"):
        load_policy(tmp_path)
    meta["version"] = 99
    (tmp_path / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="version"):
        load_policy(tmp_path)
    save_policy(Policy(np.zeros(7)), tmp_path / "short")
    with pytest.raises(UserError, match="expects"):
        load_policy(tmp_path / "short")
    with pytest.raises(UserError, match="not found"):
        load_policy(tmp_path / "nothing")


def test_model_without_prunable_groups_is_a_user_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(UserError, match="no prunable groups"):
        PruningSpace(model, torch.randn(1, 1, 8, 8), 10)


def test_features_cost_one_forward_pass_per_probe(digits):
    """What features cost, counted instead of timed: a forward pass per group and probe ratio
    and a few for the baseline, the probe plan's one-sample profile and the graph trace, whatever
    the machine."""
    from metacompress.policy.features import PROBE_RATIOS

    model = build_model("resnet20", digits.input_shape, 10, digits.mean, digits.std).eval()
    space = PruningSpace(model, digits.x_train[:1], 10)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    features = group_features(model, space, digits.calibration_batch(128))
    assert np.isfinite(features).all()
    assert len(space.groups) * len(PROBE_RATIOS) <= len(forwards) <= len(space.groups) * len(PROBE_RATIOS) + 4


@pytest.mark.integration
def test_shipped_policy_beats_uniform_in_the_short_regime(tmp_path, monkeypatch):
    """A CI-sized held-out task: vit-tiny (a family never seen in meta-training) on digits,
    20 repair steps at 0.3 kept MACs. BENCHMARKS.md has the full held-out comparison, including
    where the policy loses (aggressive budgets on some CNNs)."""
    monkeypatch.setenv("METACOMPRESS_CACHE", str(tmp_path))
    pol = load_policy()
    pool = TaskPool(pol.defaults)
    teacher = Teacher("vit-tiny", "digits")
    gains = []
    for seed in (0, 1):
        task = CompressionTask(teacher, 0.3, "short", seed)
        gains.append(pool.policy(pol.theta, task)[1] - pool.rule(task, "uniform")[1])
    assert min(gains) > 0.02, gains


def test_a_pool_that_skips_the_test_split_scores_validation_alike(tmp_path, monkeypatch):
    """Meta-training reads validation only, so its pool leaves the test split unscored (nan):
    on larger test splits (Fashion-MNIST's 10k images) that pass would cost more than the repair."""
    monkeypatch.setenv("METACOMPRESS_CACHE", str(tmp_path))
    task = CompressionTask(Teacher("mlp", "digits", (("depth", 1), ("hidden", 32))), 0.4, "bn", 0)
    full, val_only = TaskPool().rule(task, "uniform"), TaskPool(score_test=False).rule(task, "uniform")
    assert 0.0 < full.test <= 1.0 and np.isnan(val_only.test)
    assert val_only.val == full.val and np.array_equal(val_only.val_correct, full.val_correct)


def test_policy_train_smoke_and_resume(tmp_path, monkeypatch):
    """A CI-sized meta-training run: writes a loadable policy, checkpoints, and a reward curve."""
    from metacompress.policy.meta_train import MetaTrainConfig, train_policy

    monkeypatch.setenv("METACOMPRESS_CACHE", str(tmp_path / "cache"))
    cfg = MetaTrainConfig(teachers=[{"model": "mlp", "data": "digits", "kwargs": [{"hidden": 32, "depth": 1}]}],
                          iterations=2, tasks_per_iteration=1, population=4, workers=1,
                          regime_weights=(1, 1, 0, 0), out=str(tmp_path / "pol"))
    result = train_policy(cfg)
    assert len(result["history"]) == 2
    pol = load_policy(tmp_path / "pol")
    assert pol.provenance["iterations"] == 2 and pol.theta.shape == (Shapes.size(),)
    assert (tmp_path / "pol" / "reward_curve.png").stat().st_size > 1000
    cfg.iterations = 3  # resumes from the checkpoint: only one more iteration runs
    assert len(train_policy(cfg)["history"]) == 3


def test_recipe_overrides_and_errors(tmp_path):
    from metacompress.recipes import load_recipe

    (tmp_path / "r.yaml").write_text("iterations: 5\nnested: {a: 1}\n")
    d = load_recipe(tmp_path / "r.yaml", ["iterations=7", "nested.b=[1, 2]", "name=x"])
    assert d == {"iterations": 7, "nested": {"a": 1, "b": [1, 2]}, "name": "x"}
    with pytest.raises(UserError, match="malformed override"):
        load_recipe(tmp_path / "r.yaml", ["iterations"])
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="malformed recipe"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "none.yaml")


def test_warm_start_moves_only_the_named_blocks(tmp_path, monkeypatch):
    from metacompress.policy.meta_train import MetaTrainConfig, block_mask, train_policy

    monkeypatch.setenv("METACOMPRESS_CACHE", str(tmp_path / "cache"))
    base = Policy(np.random.default_rng(0).normal(0, 0.3, Shapes.size()))
    save_policy(base, tmp_path / "base")
    cfg = MetaTrainConfig(teachers=[{"model": "mlp", "data": "digits", "kwargs": [{"hidden": 32, "depth": 1}]}],
                          iterations=1, tasks_per_iteration=1, population=2, workers=1, regime_weights=(0, 1, 0, 0),
                          init=str(tmp_path / "base"), train_only=("wm", "br"), out=str(tmp_path / "pol"))
    train_policy(cfg)
    after = load_policy(tmp_path / "pol").theta
    mask = block_mask(("wm", "br"))
    np.testing.assert_array_equal(after[~mask], base.theta[~mask])
    assert np.abs(after[mask] - base.theta[mask]).max() > 0
    with pytest.raises(UserError, match="unknown weight block"):
        block_mask(("nope",))


def test_frozen_expert_keeps_its_mixture_weights_out_of_es():
    """frozen_experts: ES sees every weight but the frozen expert's mixture column, in flat order,
    so a stage-1 run draws the same noise as before the expert existed (BENCHMARKS.md)."""
    from metacompress.policy.meta_train import MetaTrainConfig, block_mask
    from metacompress.policy.network import EXPERT_RULES, HIDDEN, N_CONTEXT

    mask = block_mask((), ("sensitivity",))
    assert mask.sum() == Shapes.size() - N_CONTEXT
    wm = np.zeros(dict(Shapes.layout())["wm"], dtype=bool)
    wm[:, EXPERT_RULES.index("sensitivity")] = True
    np.testing.assert_array_equal(~mask, np.concatenate([np.zeros(Shapes.size() - wm.size, bool), wm.ravel()]))
    assert block_mask(("w2", "wm"), ("sensitivity", "lamp")).sum() == 2 * HIDDEN + N_CONTEXT * (len(EXPERT_RULES) - 2)
    with pytest.raises(UserError, match="unknown expert"):
        block_mask((), ("oracle",))
    assert MetaTrainConfig.from_dict({"teachers": [], "frozen_experts": ["sensitivity"]}).frozen_experts == (
        "sensitivity",)


def test_anchored_policy_allocates_as_the_expert_and_keeps_its_repair():
    """anchored(theta, 'sensitivity'): the allocation is the expert's ratios (clipped as the
    mixture clips them), the repair settings are those of theta."""
    from metacompress.compress.prune import MAX_RATIO
    from metacompress.policy.network import EXPERT_RULES, anchored

    rng = np.random.default_rng(0)
    theta = rng.normal(0, 0.5, Shapes.size())
    feats = rng.normal(size=(6, NUM_FEATURES))
    experts = rng.uniform(0, MAX_RATIO, size=(6, len(EXPERT_RULES)))
    for regime in (RepairConfig(steps=0), RepairConfig(steps=20), RepairConfig(steps=150)):
        before = decide(theta, feats, 0.3, regime, experts)
        after = decide(anchored(theta, "sensitivity"), feats, 0.3, regime, experts)
        assert after.repair == before.repair
        expected = np.clip(experts[:, EXPERT_RULES.index("sensitivity")], 0.02 * MAX_RATIO, 0.98 * MAX_RATIO)
        np.testing.assert_allclose(after.ratio_fn()(0.5), expected, rtol=1e-9)  # offset c = 0 at scale 0.5
    with pytest.raises(UserError, match="unknown expert"):
        anchored(theta, "oracle")


def test_selection_ships_the_best_scored_iterate(tmp_path, monkeypatch):
    """select_every: the saved policy is the iterate with the best mean reward on the selection
    tasks (an unseen task seed), and that reward is what re-scoring it gives."""
    from metacompress.policy.meta_train import MetaTrainConfig, selection_tasks, train_policy
    from metacompress.policy.tasks import teachers_from

    monkeypatch.setenv("METACOMPRESS_CACHE", str(tmp_path / "cache"))
    teachers = [{"model": "mlp", "data": "digits", "kwargs": [{"hidden": 32, "depth": 1}]}]
    cfg = MetaTrainConfig(teachers=teachers, iterations=2, tasks_per_iteration=1, population=2, workers=1,
                          sigma=0.5, lr=0.5, regime_weights=(0, 1, 0, 0), anchor="sensitivity",
                          select_every=1, select_budgets=(0.3,), out=str(tmp_path / "pol"))
    train_policy(cfg)
    pol = load_policy(tmp_path / "pol")
    sel = pol.provenance["selection"]
    scores = [s["reward"] for s in sel["scores"]]
    assert [s["iteration"] for s in sel["scores"]] == [0, 1, 2] and sel["task_seed"] == 4
    assert sel["selected_iteration"] == sel["scores"][int(np.argmax(scores))]["iteration"]
    tasks = selection_tasks(teachers_from(teachers), (0.3,), 4)
    assert len(tasks) == 4 and all(t.seed == 4 for t in tasks)
    pool = TaskPool(pol.defaults)
    assert np.mean([pool.reward(pol.theta, t) for t in tasks]) == pytest.approx(max(scores), abs=1e-9)


@pytest.mark.parametrize("toward_start", [False, True])
def test_selection_keeps_the_iterate_that_scores_best(tmp_path, monkeypatch, toward_start):
    """With a reward ES can climb, the last iterate ships; with one that only falls away from
    the start, the start ships although ES moved on."""
    from metacompress.policy import meta_train as mt

    start = init_params(0)
    monkeypatch.setenv("METACOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mt, "_score", lambda job: 0.0 if job[0] is None else (  # None: the uniform baseline
        -float(np.abs(job[0] - start).sum()) if toward_start else float(job[0].sum())))
    cfg = mt.MetaTrainConfig(teachers=[{"model": "mlp", "data": "digits", "kwargs": [{"hidden": 16, "depth": 1}]}],
                             iterations=3, tasks_per_iteration=1, population=4, workers=1, lr=0.1,
                             select_every=1, select_budgets=(0.3,), out=str(tmp_path / "pol"))
    mt.train_policy(cfg)
    pol = load_policy(tmp_path / "pol")
    ckpt = torch.load(tmp_path / "pol" / "checkpoint.pt", weights_only=True)
    last = ckpt["es"]["theta"].numpy()  # every weight trains here, so ES's vector is the whole policy
    assert np.abs(last - start).max() > 0.05  # ES moved in both cases
    assert pol.provenance["selection"]["selected_iteration"] == (0 if toward_start else 3)
    np.testing.assert_array_equal(pol.theta, start if toward_start else last)
    cfg.iterations = 4  # resuming keeps the scores and the best iterate so far, and scores only what is new
    mt.train_policy(cfg)
    sel = load_policy(tmp_path / "pol").provenance["selection"]
    assert [s["iteration"] for s in sel["scores"]] == [0, 1, 2, 3, 4]
    assert sel["selected_iteration"] == (0 if toward_start else 4)


def test_fast_adaptation_is_seeded_and_moves_the_policy(tmp_path, monkeypatch):
    from metacompress.policy.meta_train import adapt

    monkeypatch.setenv("METACOMPRESS_CACHE", str(tmp_path))
    pol = load_policy()
    pool = TaskPool(pol.defaults)
    task = CompressionTask(Teacher("mlp", "digits", (("depth", 1), ("hidden", 32))), 0.3, "short", 0)
    a = adapt(pol.theta, pool, task, steps=2, population=4, seed=0)
    b = adapt(pol.theta, pool, task, steps=2, population=4, seed=0)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - pol.theta).max() > 0
    assert pool.reward(a, task) == pool.reward(a, task)  # scoring the adapted policy is seeded too


def test_allocation_only_reward_ignores_the_repair_head(tmp_path, monkeypatch):
    """reward_repair: default trains the allocation alone: the repair head cannot move the reward."""
    from metacompress.policy.meta_train import MetaTrainConfig, block_mask

    monkeypatch.setenv("METACOMPRESS_CACHE", str(tmp_path))
    pol = load_policy()
    pool = TaskPool(pol.defaults)
    task = CompressionTask(Teacher("mlp", "digits", (("depth", 1), ("hidden", 32))), 0.3, "short", 0)
    other = pol.theta.copy()
    head = block_mask(("wr", "br"))
    other[head] += np.random.default_rng(0).normal(0, 1.0, head.sum())  # very different repair settings
    assert pool.reward(other, task, learned_repair=False) == pool.reward(pol.theta, task, learned_repair=False)
    assert pool.reward(other, task) != pool.reward(pol.theta, task)
    with pytest.raises(UserError, match="reward_repair"):
        MetaTrainConfig.from_dict({"teachers": [], "reward_repair": "teacher"})


@pytest.mark.parametrize("name", ["resnet20", "mobilenet-small", "vit-tiny"])
def test_allocation_loss_is_the_loss_of_the_pruned_model(name, digits):
    """Masking every group at once computes what the physically pruned model computes (BatchNorm
    on the batch's statistics in both), so ranking allocations by it ranks the real models."""
    from metacompress.compress.importance import unit_scores
    from metacompress.policy.probes import allocation_loss, batch_statistics

    torch.manual_seed(0)
    model = build_model(name, digits.input_shape, 10, digits.mean, digits.std).eval()
    space = PruningSpace(model, digits.x_train[:1], 10)
    keep = space.project(lambda s: [0.6 * s] * len(space.groups), 0.4)
    x, y = digits.x_train[:64], digits.y_train[:64]
    scores = unit_scores(model, space.groups, "magnitude", example=space.example)
    pruned = space.apply(copy.deepcopy(model), keep, scores=scores).eval()
    with torch.no_grad(), batch_statistics(pruned):
        expected = torch.nn.functional.cross_entropy(pruned(x), y).item()
    assert allocation_loss(model, space, keep, (x, y), scores) == pytest.approx(expected, abs=1e-4)
    assert allocation_loss(model, space, [g.channels for g in space.groups], (x, y), scores) != pytest.approx(
        expected, abs=1e-3)
