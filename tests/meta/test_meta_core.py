"""Behaviour of the meta-learning core: tasks, meta-gradients, learners, baselines, ES, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from metacompress.errors import UserError
from metacompress.meta import (
    ALGORITHMS,
    ES,
    FOMAML,
    MAML,
    JointPretrain,
    NWayKShot,
    Sinusoid,
    Task,
    build_distribution,
    build_learner,
    default_model,
    digits_rot,
    distributed,
    mean_ci95,
    meta_train,
    parse_task_spec,
    split_classes,
)
from metacompress.meta.baselines import finetune_evaluate
from metacompress.meta.runner import evaluate_checkpoint, train_checkpoint

torch.set_num_threads(1)


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1)).double()


def _tiny_tasks(n: int = 3) -> list[Task]:
    tasks = Sinusoid(k_shot=4, k_query=5).sample(n, torch.Generator().manual_seed(1))
    return [Task(*(t.double() for t in (x.x_support, x.y_support, x.x_query, x.y_query))) for x in tasks]


def _post_adapt_loss(model: nn.Module, flat: torch.Tensor, tasks: list[Task], lr: float, steps: int) -> float:
    """Plain (non-functional) reference: mean query loss after ``steps`` SGD steps from ``flat``."""
    total = 0.0
    for t in tasks:
        params = [p.clone().requires_grad_(True) for p in _unflatten(model, flat)]
        for _ in range(steps):
            loss = ((_run(params, t.x_support) - t.y_support) ** 2).mean()
            grads = torch.autograd.grad(loss, params)
            params = [(p - lr * g).detach().requires_grad_(True) for p, g in zip(params, grads)]
        with torch.no_grad():
            total += float(((_run(params, t.x_query) - t.y_query) ** 2).mean())
    return total / len(tasks)


def _run(p: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ p[0].T + p[1]) @ p[2].T + p[3]


def _unflatten(model: nn.Module, flat: torch.Tensor) -> list[torch.Tensor]:
    out, i = [], 0
    for p in model.parameters():
        out.append(flat[i:i + p.numel()].view_as(p))
        i += p.numel()
    return out


def _meta_grad(learner: MAML, tasks: list[Task]) -> torch.Tensor:
    learner.meta_gradients(tasks)
    return torch.cat([p.grad.flatten() for p in learner.model.parameters()])


# ----- meta-gradients -----------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("vectorize", ["always", "never"])
def test_second_order_meta_gradient_matches_finite_differences(steps: int, vectorize: str) -> None:
    model, tasks, lr = _tiny(), _tiny_tasks(), 0.3
    learner = MAML(model, "regression", inner_lr=lr, inner_steps=steps, vectorize=vectorize)
    analytic = _meta_grad(learner, tasks)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    h = 1e-6
    numeric = torch.tensor([
        (_post_adapt_loss(model, flat + h * e, tasks, lr, steps)
         - _post_adapt_loss(model, flat - h * e, tasks, lr, steps)) / (2 * h)
        for e in torch.eye(len(flat), dtype=flat.dtype)], dtype=flat.dtype)
    assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-7), (analytic, numeric)


def test_first_order_gradient_is_query_gradient_at_adapted_weights_and_differs_from_second_order() -> None:
    tasks, lr = _tiny_tasks(), 0.3
    second = _meta_grad(MAML(_tiny(), "regression", inner_lr=lr, inner_steps=2), tasks)
    fo = FOMAML(_tiny(), "regression", inner_lr=lr, inner_steps=2)
    first = _meta_grad(fo, tasks)
    expected = torch.zeros_like(first)
    for t in tasks:
        adapted = fo.adapt(t, 2)
        loss = ((adapted(t.x_query) - t.y_query) ** 2).mean()
        expected += torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(adapted.parameters()))])
    assert torch.allclose(first, expected / len(tasks), atol=1e-10)
    assert (first - second).norm() > 0.05 * second.norm()


def test_vmap_and_loop_give_the_same_meta_gradient_and_metrics() -> None:
    tasks = Sinusoid().sample(6, torch.Generator().manual_seed(3))
    grads = []
    for vec in ("always", "never"):
        torch.manual_seed(0)
        learner = MAML(default_model("sinusoid", (1,), 1), "regression", inner_steps=2, vectorize=vec)
        learner.meta_gradients(tasks)
        grads.append(torch.cat([p.grad.flatten() for p in learner.model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_metasgd_learns_inner_rates_and_anil_adapts_only_the_head() -> None:
    tasks = Sinusoid().sample(8, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    msgd = build_learner("metasgd", default_model("sinusoid", (1,), 1), "regression")
    before = {k: v.detach().clone() for k, v in msgd.inner_lrs.items()}
    msgd.meta_step(tasks)
    assert any(not torch.equal(before[k], v) for k, v in msgd.inner_lrs.items())
    torch.manual_seed(0)
    anil = build_learner("anil", default_model("sinusoid", (1,), 1), "regression", inner_lr=0.1)
    assert anil.adapt_names == ["4.weight", "4.bias"]
    adapted = anil.adapt(tasks[0], 3)
    old, new = dict(anil.model.named_parameters()), dict(adapted.named_parameters())
    assert all(torch.equal(old[k], new[k]) for k in old if not k.startswith("4."))
    assert not torch.equal(old["4.weight"], new["4.weight"])


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_each_algorithm_improves_post_adaptation_query_loss_on_sinusoid(algo: str) -> None:
    torch.manual_seed(0)
    hp = {"outer_lr": 0.5, "inner_steps": 5} if algo == "reptile" else {"outer_lr": 3e-3}
    learner = build_learner(algo, default_model("sinusoid", (1,), 1), "regression", inner_lr=0.01, **hp)
    val = Sinusoid().sample(200, torch.Generator().manual_seed(99))
    before = float(learner.evaluate(val, 1)["loss"].mean())
    meta_train(learner, Sinusoid(), meta_steps=150, meta_batch=10, seed=0)
    after = float(learner.evaluate(val, 1)["loss"].mean())
    assert after < 0.85 * before, (before, after)


def test_learners_copy_the_users_module_and_use_the_users_loss() -> None:
    """learn2learn style: the learner wraps a copy (the caller's module is never modified) and the
    inner and outer losses are the user's ``loss_fn``: an L1 loss gives other meta-gradients than MSE."""
    model = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    tasks = _tiny_tasks()
    mse = MAML(model, "regression", inner_lr=0.1, inner_steps=1)
    calls = []

    def l1(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(out.shape)
        return (out - y).abs().mean()

    user = MAML(model, "regression", inner_lr=0.1, inner_steps=1, loss_fn=l1, vectorize="never")
    assert not torch.allclose(_meta_grad(mse, tasks), _meta_grad(user, tasks))
    assert calls  # the user's loss ran (inner and query)
    user.meta_step(tasks)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before, user.model.parameters()))
    with pytest.raises(UserError, match="loss_fn must be callable"):
        MAML(model, "regression", loss_fn="l1")


def test_meta_training_is_deterministic_under_a_seed() -> None:
    def run() -> list[float]:
        torch.manual_seed(0)
        learner = MAML(default_model("sinusoid", (1,), 1), "regression")
        return meta_train(learner, Sinusoid(), meta_steps=5, meta_batch=4, seed=7)

    assert run() == run()


def test_batchnorm_uses_per_task_statistics_under_vmap() -> None:
    dist = build_distribution(parse_task_spec("digits-rot:5w1s"), "train", k_query=3)
    torch.manual_seed(0)
    learner = MAML(default_model("digits-rot", (1, 8, 8), 5), "classification", inner_lr=0.4,
                   vectorize="always")
    tasks = dist.sample(3, torch.Generator().manual_seed(0))
    alone = learner.evaluate(tasks[:1], 1)["loss"]
    batched = learner.evaluate(tasks, 1)["loss"]
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    before = learner.evaluate(tasks)  # the outer step reports the query metrics of the weights it starts from
    metrics = learner.meta_step(tasks)
    assert metrics["query_accuracy"] == pytest.approx(float(before["accuracy"].mean()))
    assert metrics["query_loss"] == pytest.approx(float(before["loss"].mean()), rel=1e-5)
    assert learner.vectorize == "always"


def test_adapt_returns_a_model_scoring_what_evaluate_reports() -> None:
    torch.manual_seed(0)
    learner = MAML(default_model("sinusoid", (1,), 1), "regression", inner_lr=0.05)
    task = Sinusoid().sample(1, torch.Generator().manual_seed(5))[0]
    model = learner.adapt(task, 3)
    with torch.no_grad():
        direct = float(((model(task.x_query) - task.y_query) ** 2).mean())
    assert direct == pytest.approx(float(learner.evaluate([task], 3)["loss"][0]), rel=1e-5)
    assert direct < float(learner.evaluate([task], 0)["loss"][0])


def test_state_dict_round_trip_resumes_identically() -> None:
    tasks = Sinusoid().sample(4, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    a = build_learner("metasgd", default_model("sinusoid", (1,), 1), "regression")
    a.meta_step(tasks)
    torch.manual_seed(1)
    b = build_learner("metasgd", default_model("sinusoid", (1,), 1), "regression")
    b.load_state_dict(a.state_dict())
    assert a.meta_step(tasks) == b.meta_step(tasks)


# ----- tasks ----------------------------------------------------------------------------------
def test_sinusoid_tasks_follow_the_maml_paper_ranges() -> None:
    tasks = Sinusoid(k_shot=10).sample(500, torch.Generator().manual_seed(0))
    x = torch.cat([t.x_support for t in tasks])
    amp = torch.stack([torch.cat([t.y_support, t.y_query]).abs().max() for t in tasks])
    assert tasks[0].x_support.shape == (10, 1) and tasks[0].x_query.shape == (10, 1)
    assert -5 <= float(x.min()) < -4.9 and 4.9 < float(x.max()) <= 5
    assert float(amp.max()) <= 5.0 and float(amp.max()) > 4.5


def test_digits_rot_has_40_classes_split_24_16_by_digit() -> None:
    x, y, splits = digits_rot()
    assert x.shape[1:] == (1, 8, 8) and len(torch.unique(y)) == 40
    assert len(splits["train"]) == 24 and len(splits["test"]) == 16
    assert not set(splits["train"]) & set(splits["test"])
    assert {c // 4 for c in splits["test"]} == {6, 7, 8, 9}
    zero = x[y == 0][0]
    assert torch.equal(x[y == 2][0], torch.rot90(zero, 2, dims=(1, 2)))


def test_n_way_k_shot_episodes_use_only_their_split_and_relabel() -> None:
    x, y, splits = digits_rot()
    dist = NWayKShot(x, y, splits["test"], n_way=5, k_shot=2, k_query=3)
    t = dist.sample(1, torch.Generator().manual_seed(0))[0]
    assert t.x_support.shape == (10, 1, 8, 8) and t.x_query.shape == (15, 1, 8, 8)
    assert t.y_support.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    test_images = x[torch.isin(y, torch.tensor(splits["test"]))]
    train_images = x[torch.isin(y, torch.tensor(splits["train"]))]
    for img in t.x_support:
        assert (test_images == img).flatten(1).all(1).any()
        assert not (train_images == img).flatten(1).all(1).any()


def test_split_classes_is_disjoint_and_seeded() -> None:
    y = torch.arange(30).repeat(3)
    s = split_classes(y, (18, 6, 6), seed=0)
    assert sorted(s["train"] + s["val"] + s["test"]) == list(range(30))
    assert s == split_classes(y, (18, 6, 6), seed=0) and s != split_classes(y, (18, 6, 6), seed=1)


@pytest.mark.parametrize("bad, message", [
    (lambda: NWayKShot(*digits_rot()[:2], list(range(4)), n_way=5, k_shot=1), "5-way tasks need 5 classes"),
    (lambda: NWayKShot(*digits_rot()[:2], list(range(10)), n_way=5, k_shot=200), "exceed the smallest class"),
    (lambda: parse_task_spec("omniglot:5w1s"), "bad task spec"),
    (lambda: build_learner("protonet", nn.Linear(1, 1), "regression"), "unknown algorithm"),
    (lambda: MAML(nn.Linear(1, 1), "regression", inner_steps=0), "inner steps must be a positive"),
    (lambda: ES(4, population=3), "population must be a positive even"),
])
def test_bad_input_raises_user_error(bad, message: str) -> None:
    with pytest.raises(UserError, match=message):
        bad()


# ----- baselines and checkpoints ---------------------------------------------------------------
def test_joint_pretraining_learns_the_pooled_data_and_finetune_swaps_the_head() -> None:
    spec = parse_task_spec("digits-rot:5w1s")
    train = build_distribution(spec, "train", k_query=5)
    torch.manual_seed(0)
    joint = JointPretrain(default_model("digits-rot", (1, 8, 8), train.joint_outputs), "classification", lr=3e-3)
    losses = joint.fit(train, steps=60, batch_size=64, seed=0)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    tasks = build_distribution(spec, "test", k_query=5).sample(20, torch.Generator().manual_seed(0))
    acc = joint.evaluate(tasks, steps=1, lr=0.4, n_out=5)["accuracy"]
    assert float(acc.mean()) > 0.4  # chance is 0.2: pre-trained features transfer to new digits
    zero = finetune_evaluate(joint.model, "classification", tasks, 0, 0.4, 5)["accuracy"]
    assert torch.all(zero == 0.2)  # a zero head predicts class 0 everywhere: exactly chance


def test_mean_ci95_matches_the_normal_formula() -> None:
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    m, c = mean_ci95(v)
    assert m == 2.5 and c == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)


def test_checkpoint_loads_weights_only_and_meta_learner_beats_no_adapt(tmp_path) -> None:
    ckpt = train_checkpoint(parse_task_spec("sinusoid"), "maml", meta_steps=300, seed=0, outer_lr=3e-3,
                            joint_steps=50)
    path = tmp_path / "c.pt"
    torch.save(ckpt, path)
    loaded = torch.load(path, weights_only=True)
    res = evaluate_checkpoint(loaded, parse_task_spec("sinusoid"), episodes=100, steps=1, seed=0)
    assert set(res["results"]) == {"maml", "joint", "no-adapt"}
    assert res["results"]["maml"]["mse"] < res["results"]["no-adapt"]["mse"]
    assert res == evaluate_checkpoint(loaded, parse_task_spec("sinusoid"), episodes=100, steps=1, seed=0)
    with pytest.raises(UserError, match="do not match"):
        evaluate_checkpoint(loaded, parse_task_spec("digits-rot:5w1s"), episodes=10, steps=1, seed=0)


# ----- ES ------------------------------------------------------------------------------------
def _run_es(steps: int, seed: int = 0) -> tuple[ES, float, float]:
    target = np.linspace(-1, 1, 10)
    es = ES(np.zeros(10), sigma=0.1, lr=0.05, population=20, seed=seed)
    start = float(np.linalg.norm(es.theta - target))
    for _ in range(steps):
        es.tell([-float(np.sum((v - target) ** 2)) for v in es.ask()])
    return es, start, float(np.linalg.norm(es.theta - target))


def test_es_converges_on_a_quadratic_and_is_deterministic() -> None:
    es, start, end = _run_es(300)
    assert end < start / 10
    assert isinstance(es.theta, np.ndarray)
    assert np.array_equal(es.theta, _run_es(300)[0].theta)
    assert not np.array_equal(es.theta, _run_es(300, seed=1)[0].theta)


def test_es_asks_antithetic_pairs_and_resumes_from_state_dict(tmp_path) -> None:
    es = ES(torch.ones(3), sigma=0.5, population=4, seed=0)
    a, b, c, d = es.ask()
    assert torch.allclose(a + b, 2 * torch.ones(3)) and torch.allclose(c + d, 2 * torch.ones(3))
    es.tell([1.0, 0.0, 0.5, 0.2])
    torch.save(es.state_dict(), tmp_path / "es.pt")
    twin = ES(3, population=4, seed=123)
    twin.load_state_dict(torch.load(tmp_path / "es.pt", weights_only=True))
    for e in (es, twin):
        e.tell([float(v.sum()) for v in e.ask()])
    assert torch.equal(es.theta, twin.theta)


# ----- distributed -------------------------------------------------------------------------------
def test_shard_covers_every_item_once() -> None:
    items = list(range(11))
    shards = [distributed.shard(items, r, 3) for r in range(3)]
    assert sorted(x for s in shards for x in s) == items and [len(s) for s in shards] == [4, 4, 3]


@pytest.mark.integration
def test_two_rank_gradient_average_equals_single_process_meta_gradient(tmp_path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(f"""
import sys, torch, torch.distributed as dist
from metacompress.meta import MAML, Sinusoid, default_model
from metacompress.meta import distributed
torch.set_num_threads(1)
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=rank, world_size=2)
torch.manual_seed(0)
learner = MAML(default_model("sinusoid", (1,), 1), "regression")
tasks = Sinusoid().sample(4, torch.Generator().manual_seed(0))
learner.meta_gradients(distributed.shard(tasks))
distributed.average_gradients(learner.optimizer)
if rank == 0:
    torch.save([p.grad for p in learner.model.parameters()], "{tmp_path / 'g.pt'}")
dist.destroy_process_group()
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], env=env) for r in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    torch.manual_seed(0)
    single = MAML(default_model("sinusoid", (1,), 1), "regression")
    single.meta_gradients(Sinusoid().sample(4, torch.Generator().manual_seed(0)))
    dist_grads = torch.load(tmp_path / "g.pt", weights_only=True)
    for p, g in zip(single.model.parameters(), dist_grads):
        assert torch.allclose(p.grad, g, atol=1e-6)


# ----- CLI ------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "METACOMPRESS_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "metacompress.cli.main", *args], check=False,
                          capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.integration
def test_cli_meta_train_then_meta_eval_json(tmp_path) -> None:
    out = tmp_path / "m.pt"
    r = _cli("meta-train", "--algo", "fomaml", "--tasks", "digits-rot:5w1s", "--meta-steps", "5",
             "--meta-batch", "2", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["algo"] == "fomaml" and out.is_file()
    r = _cli("meta-eval", str(out), "--tasks", "digits-rot:5w5s", "--episodes", "10", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["tasks"] == "digits-rot:5w5s" and set(res["results"]) == {"fomaml", "joint", "no-adapt"}
    assert res["results"]["no-adapt"]["accuracy"] == pytest.approx(0.2, abs=0.05)  # chance, 5-way
    assert all(v["ci95"] > 0 for v in res["results"].values())  # 10 episodes that differ
    assert res["results"]["joint"]["accuracy"] > res["results"]["no-adapt"]["accuracy"] + 0.1  # adapting helps


@pytest.mark.integration
@pytest.mark.parametrize("args, message", [
    (["--algo", "protonet"], "unknown algorithm"),
    (["--tasks", "digits-rot:50w1s"], "50-way tasks need 50 classes"),
    (["--tasks", "digits-rot:5w500s"], "exceed the smallest class"),
    (["--meta-steps", "0"], "--meta-steps must be positive"),
    (["--inner-steps", "-1"], "--inner-steps must be positive"),
    (["--tasks", "npz:/nonexistent.npz:5w1s"], "npz file not found"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args: list[str], message: str) -> None:
    r = _cli("meta-train", "--out", str(tmp_path / "x.pt"), *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.integration
def test_cli_npz_tasks(tmp_path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(300, 6)).astype(np.float32), y=np.repeat(np.arange(15), 20))
    out = tmp_path / "n.pt"
    r = _cli("meta-train", "--tasks", f"npz:{tmp_path / 'd.npz'}:3w2s", "--meta-steps", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    r = _cli("meta-eval", str(out), "--episodes", "4", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["tasks"] == f"npz:{tmp_path / 'd.npz'}:3w2s", r.stderr
