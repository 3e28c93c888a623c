"""End-to-end compression: budget, ONNX parity, accuracy after repair, model.pt round trip."""

import copy

import numpy as np
import pytest
import torch

from metacompress.compress.checkpoint import load_compressed, save_compressed
from metacompress.compress.distill import RepairConfig, repair, repair_forked
from metacompress.compress.measure import count_macs
from metacompress.compress.prune import PruningSpace
from metacompress.compress.rules import CHANNEL_IMPORTANCE, RULES, rule_allocation
from metacompress.data import load_dataset
from metacompress.deploy import export_onnx, verify_onnx
from metacompress.pipeline import CompressConfig, run_compress
from metacompress.policy.guard import SCREENED_RULES, SIGNIFICANCE
from metacompress.training import accuracy
from metacompress.zoo import build_model

PARITY_MODELS = ["resnet20", "mlp", "vgg-small", "mobilenet-small", "vit-tiny"]


@pytest.mark.parametrize("name", PARITY_MODELS)
def test_every_allocation_meets_budget_and_onnx_parity(name, digits, tmp_path):
    """Done-when of the foundation: +-2 % MACs, max abs diff <= 1e-4, top-1 agreement >= 99.5 %."""
    torch.manual_seed(0)
    dense = build_model(name, digits.input_shape, 10, digits.mean, digits.std).eval()
    space = PruningSpace(dense, digits.x_train[:1], 10)
    calib = digits.calibration_batch(64)
    for rule in RULES:
        keep = space.project(rule_allocation(rule, space, dense, calib), 0.5)
        student = space.apply(copy.deepcopy(dense), keep, CHANNEL_IMPORTANCE[rule], calib=calib)
        ratio = count_macs(student, digits.x_test[:1]) / space.dense_macs
        assert abs(ratio - 0.5) <= 0.01, (rule, ratio)
        path = tmp_path / f"{rule}.onnx"
        export_onnx(student, digits.x_test[:1], path, dynamo=(rule == "uniform"))
        ver = verify_onnx(path, student, digits.x_test, digits.y_test)
        assert ver["max_abs_diff"] <= 1e-4, (rule, ver["max_abs_diff"])
        assert ver["top1_agreement"] >= 0.995, (rule, ver["top1_agreement"])


@pytest.mark.integration
@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_default_repair_loses_at_most_three_points(name, digits, trained):
    dense = trained(name)
    dense_acc = accuracy(dense, digits.x_test, digits.y_test)
    assert dense_acc > 0.95
    space = PruningSpace(dense, digits.x_train[:1], 10)
    keep = space.project(lambda s: [s * 0.9] * len(space.groups), 0.5)
    student = space.apply(copy.deepcopy(dense), keep)
    repair(student, dense, digits, RepairConfig(), seed=0, progress=False)
    assert accuracy(student, digits.x_test, digits.y_test) >= dense_acc - 0.03


def test_repair_beats_no_repair_with_few_labels(digits, trained):
    dense = trained("mlp")
    space = PruningSpace(dense, digits.x_train[:1], 10)
    keep = space.project(lambda s: [s * 0.9] * len(space.groups), 0.15)
    pruned = space.apply(copy.deepcopy(dense), keep)
    before = accuracy(pruned, digits.x_val, digits.y_val)
    repair(pruned, dense, digits, RepairConfig(steps=50, samples_per_class=10), seed=0, progress=False)
    assert accuracy(pruned, digits.x_val, digits.y_val) > before + 0.02


def test_run_compress_writes_report_and_reloadable_model(tmp_path):
    out = tmp_path / "out"
    cfg = CompressConfig(model="mlp", data="digits", target_macs=0.5, out=str(out), train_epochs=10,
                         repair=RepairConfig(steps=30), latency_repeats=3)
    report = run_compress(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.pt", "report.json"]
    for key in ("dense", "compressed"):
        assert set(report[key]) >= {"macs", "params", "accuracy", "latency_ms", "onnx_bytes"}
        assert set(report[key]["latency_ms"]) == {"b1", "b32"}
    assert abs(report["achieved_macs_ratio"] - 0.5) <= 0.01
    assert report["onnx"]["max_abs_diff"] <= 1e-4 and report["onnx"]["top1_agreement"] >= 0.995
    assert report["onnx"]["dense_max_abs_diff"] <= 1e-4  # against the measure stage's logits of the dense model
    assert set(report["timings_s"]) >= {"load", "allocate", "prune", "repair", "export", "verify"}
    assert report["compressed"]["onnx_bytes"] < report["dense"]["onnx_bytes"]
    model, ckpt = load_compressed(out / "model.pt")
    from metacompress.data import load_dataset

    d = load_dataset("digits")
    ver = verify_onnx(out / "model.onnx", model, d.x_test, d.y_test)
    assert ver["max_abs_diff"] <= 1e-5
    assert ver["accuracy"] == pytest.approx(report["compressed"]["accuracy"])


def test_checkpoint_round_trip_for_pruned_attention_and_depthwise(tmp_path, digits):
    for name in ("vit-tiny", "mobilenet-small"):
        torch.manual_seed(1)
        dense = build_model(name, digits.input_shape, 10, digits.mean, digits.std).eval()
        space = PruningSpace(dense, digits.x_train[:1], 10)
        student = space.apply(copy.deepcopy(dense), space.project(lambda s, n=len(space.groups): [s * 0.9] * n, 0.3))
        save_compressed(tmp_path / f"{name}.pt", student, name, digits.input_shape, 10)
        rebuilt, _ = load_compressed(tmp_path / f"{name}.pt")
        x = digits.x_test[:32]
        assert torch.equal(rebuilt(x), student(x))


def test_compression_is_deterministic_under_a_seed(digits, trained):
    dense = trained("mlp")
    outs = []
    for _ in range(2):
        space = PruningSpace(dense, digits.x_train[:1], 10)
        keep = space.project(lambda s, n=len(space.groups): [s * 0.9] * n, 0.3)
        student = space.apply(copy.deepcopy(dense), keep)
        repair(student, dense, digits, RepairConfig(steps=20), seed=3, progress=False)
        outs.append(student(digits.x_test[:16]).detach().numpy())
    np.testing.assert_array_equal(outs[0], outs[1])


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.integration
def test_forked_students_share_a_trunk(digits, trained):
    """Student 0 is exactly the plain repair; forked students stay closer together than
    independently repaired ones (why their soup works: BENCHMARKS.md, soup of students)."""
    dense = trained("resnet20")
    space = PruningSpace(dense, digits.x_train[:1], 10)
    keep = space.project(lambda s: [s * 0.9] * len(space.groups), 0.3)
    pruned = space.apply(copy.deepcopy(dense), keep)
    cfg = RepairConfig(steps=30)
    forked = repair_forked(pruned, dense, digits, cfg, 3, seed=5, shared=0.5, progress=False)
    alone = [repair(copy.deepcopy(pruned), dense, digits, cfg, seed=s, progress=False) for s in (5, 6, 7)]
    for a, b in zip(forked[0].state_dict().values(), alone[0].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    d_forked = [(_flat(forked[0]) - _flat(m)).norm() for m in forked[1:]]
    d_alone = [(_flat(alone[0]) - _flat(m)).norm() for m in alone[1:]]
    assert min(d_forked) > 0  # they did fork
    assert max(d_forked) < 0.8 * min(d_alone), (d_forked, d_alone)
    same = repair_forked(pruned, dense, digits, cfg, 2, seed=5, shared=1.0, progress=False)
    torch.testing.assert_close(_flat(same[0]), _flat(same[1]), rtol=0, atol=0)


def test_students_soup_and_int8_in_the_report(tmp_path):
    out = tmp_path / "out"
    cfg = CompressConfig(model="mlp", data="digits", target_macs=0.3, allocation="uniform", out=str(out),
                         train_epochs=10, repair=RepairConfig(steps=20), students=3, quantize="auto",
                         latency_repeats=3)
    report = run_compress(cfg)
    assert len(report["students"]) == 3 and all(0.5 < s["test_accuracy"] <= 1 for s in report["students"])
    assert 1 <= len(report["soup"]["ingredients"]) <= 3
    # greedy soup never scores below its best ingredient on the split it was chosen on
    assert report["soup"]["val_accuracy"] >= max(s["val_accuracy"] for s in report["students"]) - 1e-9
    assert report["int8"]["mode"] == "dynamic"
    assert report["int8"]["size_ratio"] <= 0.35
    assert report["int8"]["accuracy"] >= report["compressed"]["accuracy"] - 0.01
    assert (out / "model.int8.onnx").is_file()


@pytest.mark.integration
def test_report_warns_when_whole_units_cannot_meet_the_budget(tmp_path):
    """A 16-unit hidden layer cannot keep 0.3 of the MACs (4 units keep 0.25, 5 keep 0.3125): the
    nearest allocation (5) is used, off the round_to grid, and the report and stderr say both."""
    (tmp_path / "tiny.py").write_text(
        "from torch import nn\n"
        "def factory(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, num_classes))\n")
    report = run_compress(CompressConfig(model=f"{tmp_path / 'tiny.py'}:factory", data="digits", target_macs=0.3,
                                         allocation="uniform", repair=RepairConfig(steps=0), out=str(tmp_path / "o"),
                                         round_to=8))
    assert report["achieved_macs_ratio"] == 0.3125
    assert [g["kept"] for g in report["groups"]] == [5] and not report["groups"][0]["on_grid"]
    budget_warnings = _budget_warnings(report)  # a model this small may also time no faster than dense
    assert len(budget_warnings) == 2
    assert "not reachable in whole units within 2%: the nearest allocation keeps 0.312" in budget_warnings[0]
    assert "off the round_to=8 grid" in budget_warnings[1]
    ok = run_compress(CompressConfig(model=f"{tmp_path / 'tiny.py'}:factory", data="digits", target_macs=0.5,
                                     allocation="uniform", repair=RepairConfig(steps=0), out=str(tmp_path / "ok"),
                                     round_to=8))
    assert _budget_warnings(ok) == [] and ok["groups"][0]["on_grid"]


def _budget_warnings(report: dict) -> list[str]:
    return [w for w in report.get("warnings", []) if "not faster than the dense model" not in w]


def test_meta_policy_with_guard(tmp_path):
    """The default path: the shipped policy decides, the guard keeps the better repair on validation."""
    cfg = CompressConfig(model="mlp", data="digits", target_macs=0.3, out=str(tmp_path / "o"), train_epochs=8,
                         repair=RepairConfig(steps=20), latency_repeats=2)
    assert cfg.allocation == "meta" and cfg.guard
    report = run_compress(cfg)
    g = report["guard"]
    scores = g["val_accuracy"]
    best = g["screened_rule"]
    assert set(g["screen"]) == set(SCREENED_RULES) and g["screen"][best] == max(g["screen"].values())
    assert set(scores) == {"policy", "policy-allocation", "uniform", best} and set(g["val_loss"]) == set(scores)
    # the fallback is the better fixed rule; a policy candidate replaces it only if it wins the paired test
    fallback = g["fallback"]
    assert fallback in ("uniform", best) and scores[fallback] == max(scores["uniform"], scores[best])
    n_val = len(load_dataset("digits").y_val)
    vs = g["vs_fallback"]
    assert set(vs) == {"policy", "policy-allocation"}
    for name, t in vs.items():  # the image-by-image counts agree with the accuracies
        assert t["wins"] - t["losses"] == round((scores[name] - scores[fallback]) * n_val)
    passed = [n for n, t in vs.items() if t["p_value"] < SIGNIFICANCE]
    assert (g["chosen"] == fallback) == (not passed)
    if passed:
        assert g["chosen"] in passed and scores[g["chosen"]] == max(scores[n] for n in passed)
    digits = load_dataset("digits")
    space = PruningSpace(build_model("mlp", digits.input_shape, 10), digits.x_train[:1], 10)
    kept = [grp["kept"] for grp in report["groups"]]
    assert [grp["name"] for grp in report["groups"] if not grp["on_grid"]] == space.off_grid(kept)
    assert abs(report["achieved_macs_ratio"] - 0.3) <= 0.006
    assert report["compressed"]["accuracy"] > 0.8


def test_adapt_steps_run_es_on_the_task_and_still_meet_the_budget(tmp_path, monkeypatch):
    """--adapt-steps: the policy takes ES steps on this task before deciding; features are computed once."""
    import metacompress.policy.features as features
    import metacompress.policy.meta_train as meta_train

    calls = {"features": 0, "adapt": []}
    real_features, real_adapt = features.group_features, meta_train.adapt

    def counted_features(*a, **k):
        calls["features"] += 1
        return real_features(*a, **k)

    def recorded_adapt(theta, pool, task, steps, **k):
        calls["adapt"].append((task.regime, task.budget, steps))
        return real_adapt(theta, pool, task, steps, **k)

    monkeypatch.setattr(features, "group_features", counted_features)
    monkeypatch.setattr(meta_train, "adapt", recorded_adapt)
    report = run_compress(CompressConfig(model="mlp", data="digits", target_macs=0.3, train_epochs=5,
                                         repair=RepairConfig(steps=5), latency_repeats=2, guard=False,
                                         adapt_steps=1, out=str(tmp_path / "adapted")))
    assert calls == {"features": 1, "adapt": [("short", 0.3, 1)]}
    assert abs(report["achieved_macs_ratio"] - 0.3) <= 0.006
    assert report["compressed"]["accuracy"] > 0.5


def test_dense_and_compressed_models_are_timed_as_the_same_kind_of_file(tmp_path):
    """The speedup divides two timings of files made the same way (exported, then simplified):
    at a budget that prunes nothing the two files are the same size, so a speedup cannot come
    from simplifying one side only."""
    report = run_compress(CompressConfig(model="mlp", data="digits", weights="none", target_macs=1.0,
                                         allocation="uniform", repair=RepairConfig(steps=0), out=str(tmp_path / "o")))
    assert report["achieved_macs_ratio"] == 1.0
    assert report["compressed"]["onnx_bytes"] == report["dense"]["onnx_bytes"]


def _guard_setup(monkeypatch, model: str, rule: str):
    """A BN-only guard on ``model`` (one training epoch on digits) whose policy allocation is
    ``rule``'s, with ``students.repair_one`` counting its calls in the returned list."""
    import metacompress.students as students
    from metacompress.pipeline import prepare

    repairs: list[int] = []
    repair_one = students.repair_one
    monkeypatch.setattr(students, "repair_one", lambda *a, **k: repairs.append(1) or repair_one(*a, **k))
    cfg = CompressConfig(model=model, data="digits", target_macs=0.5, repair=RepairConfig(steps=0), train_epochs=1)
    prep = prepare(cfg)
    keep = prep.budget.project(prep.space, rule_allocation(rule, prep.space, prep.dense, None))
    return cfg, prep, keep, students.prune_to(prep, keep, "magnitude"), repairs


def test_guard_repairs_candidates_with_the_same_outcome_once(monkeypatch):
    """BN-only repairs differ only by their BN sample count: a policy that changes the distillation
    settings alone gives the same model as the default, and the guard does not repair it twice (nor
    a screened rule whose allocation is the policy's)."""
    from dataclasses import replace

    import metacompress.students as students

    cfg, prep, keep, pruned, repairs = _guard_setup(monkeypatch, "resnet20", "lamp")
    same = students.guard_repair(cfg, prep, keep, replace(cfg.repair, lr=0.1, temperature=2.0, alpha=0.9), pruned)
    acc, lamp = same.info["val_accuracy"], same.info["screened_rule"] == "lamp"  # lamp: the policy's allocation
    assert len(acc) == 4 and acc["policy-allocation"] == acc["policy"] and len(repairs) == 3 - lamp
    repairs.clear()
    other = students.guard_repair(cfg, prep, keep, replace(cfg.repair, bn_samples=64), pruned)
    assert len(other.info["val_accuracy"]) == 4 and len(repairs) == 4 - (other.info["screened_rule"] == "lamp")
    assert RepairConfig(steps=5, lr=0.1).outcome() != RepairConfig(steps=5).outcome()
    # without BatchNorm a BN-only repair changes nothing, whatever its sample count
    assert RepairConfig(steps=0, bn_samples=64).outcome(batchnorm=False) == RepairConfig(steps=0).outcome(False)


def test_guard_reuses_a_screen_that_was_the_whole_repair(monkeypatch):
    """Without BatchNorm a BN-only repair changes nothing: the screened rule's screen, scored on
    the whole validation split, is its repair, and the guard does not run it again."""
    import metacompress.students as students

    cfg, prep, keep, pruned, repairs = _guard_setup(monkeypatch, "lenet5", "uniform")
    g = students.guard_repair(cfg, prep, keep, cfg.repair, pruned)
    best = g.info["screened_rule"]
    assert g.info["val_accuracy"][best] == pytest.approx(g.info["screen"][best], abs=1e-6)
    assert len(repairs) == 1   # the policy's allocation only: uniform is the same, the screened rule was screened


def test_accuracy_before_repair_counts_an_evenly_spread_subset_when_costly(monkeypatch):
    import metacompress.pipeline as pipeline
    from metacompress.training import accuracy

    data = load_dataset("digits")
    model = build_model("mlp", data.input_shape, 10).eval()
    everything = pipeline.accuracy_before_repair(model, data)
    assert everything == (accuracy(model, data.x_test, data.y_test), len(data.y_test))
    monkeypatch.setattr(pipeline, "CHECK_MACS", 1.0)   # every sample over budget: the floor
    acc, n = pipeline.accuracy_before_repair(model, data)
    index = np.linspace(0, len(data.y_test) - 1, n).round().astype(np.int64)
    assert n == pipeline.MIN_CHECK_SAMPLES and acc == accuracy(model, data.x_test[index], data.y_test[index])
    assert len(np.unique(index)) == n and index[-1] == len(data.y_test) - 1   # spread over the whole split


def test_loss_rose_flags_a_climb_above_the_first_step():
    from metacompress.compress.distill import LOSS_RISE, loss_rose

    assert not loss_rose([])
    assert not loss_rose([2.0, 1.9, 1.2, 0.4])
    assert not loss_rose([2.0, 2.0 * (1 + LOSS_RISE), 1.0])  # batch noise up to the margin
    assert loss_rose([2.0, 3.5, 2.8, 1.0])


@pytest.mark.parametrize("lr,overridden", [(3.0, False), (3.0, True), (1e-3, False)])
def test_a_repair_whose_loss_rises_is_run_again_at_a_tenth_of_the_rate(lr, overridden):
    """A rate far too high for the model (3.0 on an MLP) makes the training loss climb: without an
    explicit --repair-lr, the repair runs again at GENTLE_LR_FACTOR of it and the better on
    validation is kept, with a warning. A sane rate, or one the user set, runs once."""
    from metacompress.pipeline import Timer, compress_stages
    from metacompress.students import GENTLE_LR_FACTOR

    cfg = CompressConfig(model="mlp", data="digits", weights="none", target_macs=0.4, allocation="uniform",
                         repair=RepairConfig(steps=30, lr=lr), repair_overrides=("lr",) if overridden else ())
    c = compress_stages(cfg, Timer())
    if overridden or lr < 0.1:
        assert c.rescue is None and c.repair.lr == lr
        assert not any("loss rose" in w for w in c.warnings)
        return
    assert set(c.rescue["lr"]) == {f"{lr:g}", f"{lr * GENTLE_LR_FACTOR:g}"}
    assert c.repair.lr == c.rescue["chosen_lr"] == lr * GENTLE_LR_FACTOR  # the gentler rate repairs better here
    assert c.students[0]["val_accuracy"] == max(c.rescue["lr"].values())
    assert any("training loss rose at lr 3" in w for w in c.warnings)
