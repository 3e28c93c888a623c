"""Sharded training over torch.distributed ranks: same result as one process, exact resume, clear failures."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from metacompress.errors import UserError
from metacompress.meta import distributed, parse_task_spec
from metacompress.meta.runner import train_checkpoint
from metacompress.policy.meta_train import MetaTrainConfig, train_policy

TEACHERS = [{"model": "mlp", "data": "digits", "kwargs": [{"hidden": 32, "depth": 1}]}]


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory):
    """One teacher cache for the module: the tiny teacher is trained once."""
    return str(tmp_path_factory.mktemp("teachers"))


def _es_cfg(out, **kw) -> MetaTrainConfig:
    base = dict(teachers=TEACHERS, iterations=3, tasks_per_iteration=1, population=4, workers=1,
                regime_weights=(1, 1, 0, 0), out=str(out))
    return MetaTrainConfig(**{**base, **kw})


def _es_theta(out) -> torch.Tensor:
    return torch.load(out / "checkpoint.pt", weights_only=True)["es"]["theta"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "METACOMPRESS_PROGRESS": "0", "OMP_NUM_THREADS": "1", **extra}


# ----- ES: sharded rewards -------------------------------------------------------------------
def test_es_on_two_ranks_takes_the_steps_of_one_process(tmp_path, monkeypatch, teacher_cache):
    monkeypatch.setenv("METACOMPRESS_CACHE", teacher_cache)
    one = train_policy(_es_cfg(tmp_path / "w1"))
    two = train_policy(_es_cfg(tmp_path / "w2", workers=2))
    assert [h["mean_reward"] for h in one["history"]] == [h["mean_reward"] for h in two["history"]]
    theta1, theta2 = _es_theta(tmp_path / "w1"), _es_theta(tmp_path / "w2")
    assert (theta1 - theta2).abs().max() < 1e-5
    assert (theta1 - _es_theta_start()).abs().max() > 1e-3  # ES moved: the comparison is not of two starts


def _es_theta_start() -> torch.Tensor:
    from metacompress.policy.network import init_params

    return torch.as_tensor(init_params(0))


def test_es_resume_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch, teacher_cache):
    monkeypatch.setenv("METACOMPRESS_CACHE", teacher_cache)
    train_policy(_es_cfg(tmp_path / "full"))
    train_policy(_es_cfg(tmp_path / "cut", iterations=2, workers=2))  # stopped after 2, on another world size
    train_policy(_es_cfg(tmp_path / "cut"))
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["iteration"] == 3 and len(ckpt["history"]) == 3
    assert torch.equal(_es_theta(tmp_path / "full"), _es_theta(tmp_path / "cut"))
    with pytest.raises(UserError, match="other settings"):
        train_policy(_es_cfg(tmp_path / "cut", iterations=4, sigma=0.2))


def test_a_killed_rank_is_named(tmp_path):
    def work() -> list[float]:
        rank, _ = distributed.rank_and_world()
        out = []
        for i in range(3):
            if i == 1 and rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            out += distributed.sharded_map(float, [1.0, 2.0, 3.0])
        return out

    with pytest.raises(distributed.WorkerLost, match=r"rank 1 \(pid \d+\) was killed by SIGKILL; rank 0 of 2"):
        distributed.launch_local(work, 2)
    assert distributed.launch_local(lambda: distributed.sharded_map(float, [1, 2, 3]), 2) == [1.0, 2.0, 3.0]

    def fails_on_rank_1() -> None:
        if distributed.rank_and_world()[0] == 1:
            raise ValueError("disk full")
        distributed.barrier()

    with pytest.raises(distributed.WorkerLost, match=r"rank 1 \(pid \d+\) exited with code 1: ValueError: disk full"):
        distributed.launch_local(fails_on_rank_1, 2)


# ----- MAML family: sharded meta-batches -----------------------------------------------------
@pytest.mark.parametrize("algo", ["maml", "reptile"])
def test_meta_batches_on_two_ranks_give_the_weights_of_one_process(algo):
    spec = parse_task_spec("sinusoid")
    args = (spec, algo, 3, 0)
    kw = dict(meta_batch=5, joint_steps=1)  # 5 tasks: shards of 3 and 2
    one = train_checkpoint(*args, **kw)
    two = distributed.launch_local(functools.partial(train_checkpoint, *args, **kw), 2)  # picklable: spawned ranks
    for name, p in one["state"]["model"].items():
        assert (p - two["state"]["model"][name]).abs().max() < 1e-5, name
    assert one["history"]["query_loss"] == pytest.approx(two["history"]["query_loss"], abs=1e-6)


def test_maml_resume_refuses_a_state_from_other_settings(tmp_path):
    spec = parse_task_spec("sinusoid")
    state = tmp_path / "m.pt.ckpt"
    train_checkpoint(spec, "fomaml", 2, 0, meta_batch=2, joint_steps=1, state_path=state, checkpoint_every=1)
    with pytest.raises(UserError, match="other settings"):
        train_checkpoint(spec, "fomaml", 4, 0, meta_batch=3, joint_steps=1, state_path=state, resume=True)


# ----- the command line, under torchrun and killed mid-way -------------------------------------
def _mc(*args: str, env: dict | None = None, torchrun: int = 0) -> subprocess.CompletedProcess:
    launcher = [sys.executable]  # torchrun is `python -m torch.distributed.run`
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    return subprocess.run([*launcher, "-m", "metacompress", *args], capture_output=True, text=True,
                          env=env or _env(), timeout=300, check=False)


@pytest.mark.integration
def test_torchrun_policy_train_matches_one_process(tmp_path, monkeypatch, teacher_cache):
    monkeypatch.setenv("METACOMPRESS_CACHE", teacher_cache)
    one = train_policy(_es_cfg(tmp_path / "one"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"teachers": TEACHERS, "iterations": 3, "tasks_per_iteration": 1, "population": 4,
                                  "regime_weights": [1, 1, 0, 0]}))
    two = _mc("policy", "train", "--config", str(recipe), "--out", str(tmp_path / "two"), "--json",
              env=_env(METACOMPRESS_CACHE=teacher_cache), torchrun=2)
    assert two.returncode == 0, two.stderr
    assert len(two.stdout.strip().splitlines()) == 1  # rank 0 alone prints
    assert json.loads(two.stdout)["final_mean_reward_last10"] == one["final_mean_reward_last10"]
    assert (_es_theta(tmp_path / "one") - _es_theta(tmp_path / "two")).abs().max() < 1e-5


@pytest.mark.integration
def test_torchrun_meta_train_matches_one_process(tmp_path):
    one = train_checkpoint(parse_task_spec("sinusoid"), "maml", 3, 0, meta_batch=5, joint_steps=1)["state"]["model"]
    r = _mc("meta-train", "--tasks", "sinusoid", "--meta-steps", "3", "--meta-batch", "5", "--joint-steps", "1",
            "--out", str(tmp_path / "two.pt"), "--json", torchrun=2)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1  # rank 0 alone prints
    two = torch.load(tmp_path / "two.pt", weights_only=True)["state"]["model"]
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5


@pytest.mark.integration
def test_meta_train_killed_mid_way_resumes_to_the_uninterrupted_weights(tmp_path):
    steps = 100
    full = train_checkpoint(parse_task_spec("sinusoid"), "fomaml", steps, 0, meta_batch=2, joint_steps=1)
    common = ("meta-train", "--algo", "fomaml", "--tasks", "sinusoid", "--meta-steps", str(steps), "--meta-batch", "2",
              "--joint-steps", "1", "--checkpoint-every", "5", "--out", str(tmp_path / "cut.pt"))
    out, state = tmp_path / "cut.pt", tmp_path / "cut.pt.ckpt"
    proc = subprocess.Popen([sys.executable, "-m", "metacompress", *common], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(state, weights_only=True)["step"]
    assert not out.exists() and 5 <= step < steps  # killed mid-way, after a checkpoint
    resumed = _mc(*common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    cut = torch.load(out, weights_only=True)
    assert all(torch.equal(v, cut["state"]["model"][k]) for k, v in full["state"]["model"].items())
    assert full["history"]["query_loss"] == cut["history"]["query_loss"]
    other = _mc(*common, "--resume", "--seed", "1")
    assert other.returncode == 2 and "other settings" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1 and "Traceback" not in other.stderr


def test_policy_recipe_schema_knows_every_training_option():
    from metacompress.cli.run_cmd import PolicyTrain

    assert set(PolicyTrain.model_fields) - {"pipeline"} == set(MetaTrainConfig.__dataclass_fields__)



# ----- compression: data-parallel training and repair ------------------------------------------
DATA_PARALLEL_SCRIPT = '''
import copy, functools, json
import torch
from metacompress.compress.distill import RepairConfig, repair
from metacompress.data import load_dataset
from metacompress.meta import data_parallel, distributed
from metacompress.training import train_dense
from metacompress.zoo import build_model


def job():
    data = load_dataset("digits")
    for split in ("train", "val", "test"):  # float64: the comparison sees the algorithm, not float32 noise
        setattr(data, f"x_{split}", getattr(data, f"x_{split}").double())
    torch.manual_seed(0)
    model = build_model("resnet20", data.input_shape, data.num_classes, data.mean, data.std).double()
    start = copy.deepcopy(model.state_dict())
    with data_parallel.data_parallel():
        train_dense(model, data, epochs=1, batch_size=50, seed=0, progress=False)  # shares of 17, 17 and 16
        student = copy.deepcopy(model)
        with torch.no_grad():
            for p in student.parameters():
                p.mul_(0.9)
        # batches of 2 on 3 ranks: each rank computes the whole batch at a third of the weight
        repair(student, model, data, RepairConfig(steps=5, batch_size=2), seed=0, progress=False)
    return start, model.state_dict(), student.state_dict()


def diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())


if __name__ == "__main__":
    torch.set_num_threads(1)
    one = job()
    two = distributed.launch_local(job, 3)
    print(json.dumps({"dense": diff(one[1], two[1]), "student": diff(one[2], two[2]), "moved": diff(one[0], one[1])}))
'''


@pytest.mark.integration
def test_data_parallel_training_and_repair_take_the_steps_of_one_process(tmp_path):
    """Shares of unequal sizes, BatchNorm statistics over all ranks, summed gradients, teacher
    logits gathered, batches smaller than the ranks: in float64, three ranks end where one
    process ends."""
    script = tmp_path / "dp.py"
    script.write_text(DATA_PARALLEL_SCRIPT)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(), timeout=600,
                       check=False, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["moved"] > 1e-3 and d["dense"] < 1e-9 and d["student"] < 1e-9, d


@pytest.mark.integration
def test_torchrun_compress_gives_the_report_of_one_process(tmp_path):
    from metacompress.compress.distill import RepairConfig
    from metacompress.dense import train_and_save
    from metacompress.pipeline import CompressConfig, run_compress

    weights = str(tmp_path / "w.pt")
    train_and_save("resnet20", "digits", weights, epochs=2)
    common = dict(model="resnet20", data="digits", weights=weights, target_macs=0.5)
    one = run_compress(CompressConfig(**common, repair=RepairConfig(steps=20), out=str(tmp_path / "one")))
    r = _mc("compress", "resnet20", "--data", "digits", "--weights", weights, "--target-macs", "0.5",
            "--repair-steps", "20", "--out", str(tmp_path / "two"), "--json", torchrun=2)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1  # rank 0 alone prints
    two = json.loads(r.stdout)
    assert two["ranks"] == 2 and "ranks" not in one
    assert two["groups"] == one["groups"] and two["compressed"]["macs"] == one["compressed"]["macs"]
    assert two["guard"]["chosen"] == one["guard"]["chosen"]
    # float32 sums in another order: the repaired models differ by float noise, not by a sample's worth
    assert abs(two["compressed"]["accuracy"] - one["compressed"]["accuracy"]) <= 0.01
    refused = _mc("compress", "resnet20", "--data", "digits", "--weights", weights, "--target-latency", "0.5",
                  "--out", str(tmp_path / "lat"), torchrun=2)
    assert refused.returncode != 0 and "a latency budget is measured on one process" in refused.stderr
    assert not (tmp_path / "lat").exists()
