"""Meta-learning runs as checkpoints: what ``meta-train`` writes and ``meta-eval`` reads.

``train_checkpoint`` meta-trains a learner and the joint baseline on one task family with the
family's default hyperparameters (MAML paper settings); ``evaluate_checkpoint`` puts both, and the
no-adaptation baseline, on the same meta-test episodes. A checkpoint holds only tensors, numbers
and strings, so it loads with ``weights_only=True``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

from metacompress.meta import checkpoint
from metacompress.meta.baselines import ALGORITHMS, JointPretrain, build_learner, compare, meta_train
from metacompress.meta.errors import UserError
from metacompress.meta.maml import MetaLearner
from metacompress.meta.modules import load_state
from metacompress.meta.tasks import TaskDistribution, TaskSpec, build_distribution, default_model

FORMAT = "metacompress-meta/1"
DEFAULTS = {  # per task family: inner lr, outer lr, inner steps, meta-batch (MAML paper settings)
    "sinusoid": {"inner_lr": 0.01, "outer_lr": 1e-3, "inner_steps": 1, "meta_batch": 25},
    "classification": {"inner_lr": 0.4, "outer_lr": 1e-3, "inner_steps": 1, "meta_batch": 16},
}
REPTILE_OUTER_LR = 0.1  # Reptile's outer lr is an interpolation factor, not an Adam step size


def defaults_for(family: str) -> dict[str, float]:
    """Default hyperparameters of a task family (any labelled-data family is 'classification')."""
    return dict(DEFAULTS["sinusoid" if family == "sinusoid" else "classification"])


def _input_shape(dist: TaskDistribution) -> tuple[int, ...]:
    return tuple(dist.sample(1, torch.Generator().manual_seed(0))[0].x_support.shape[1:])


def train_checkpoint(spec: TaskSpec, algo: str, meta_steps: int, seed: int, inner_lr: float | None = None,
                     outer_lr: float | None = None, inner_steps: int | None = None,
                     meta_batch: int | None = None, joint_steps: int | None = None,
                     progress: Callable[[Iterable[int]], Iterable[int]] = iter,
                     state_path: str | os.PathLike | None = None, checkpoint_every: int = 0,
                     resume: bool = False) -> dict[str, Any]:
    """Meta-train ``algo`` on the meta-train split of ``spec`` *and* the joint baseline.

    The joint model is trained here (``joint_steps`` Adam steps, default ``meta_steps``, batches of
    ``meta_batch`` x the task size) so that a checkpoint alone reproduces every row of
    ``meta-eval``. The result holds only tensors, numbers and strings (``weights_only`` safe).

    With ``state_path`` the meta-training loop's run state is written there every
    ``checkpoint_every`` steps (and after the last); ``resume`` continues from it when it exists,
    ending with the weights an uninterrupted run would have. Under a process group every rank
    runs this with the same arguments: meta-batches are sharded (see ``meta.distributed``).
    """
    if algo not in ALGORITHMS:
        raise UserError(f"unknown algorithm {algo!r}: use one of {', '.join(ALGORITHMS)}")
    hp = defaults_for(spec.family)
    given = {"inner_lr": inner_lr, "outer_lr": outer_lr, "inner_steps": inner_steps, "meta_batch": meta_batch}
    hp.update({k: v for k, v in given.items() if v is not None})
    if algo == "reptile" and outer_lr is None:
        hp["outer_lr"] = REPTILE_OUTER_LR
    if hp["inner_steps"] <= 0 or meta_steps <= 0 or hp["meta_batch"] <= 0 or checkpoint_every < 0:
        raise UserError(f"steps must be positive: meta-steps {meta_steps}, inner steps {hp['inner_steps']}, "
                        f"meta-batch {hp['meta_batch']}, checkpoint every {checkpoint_every}")
    dist = build_distribution(spec, "train")
    shape = _input_shape(dist)
    torch.manual_seed(seed)
    learner = build_learner(algo, default_model(spec.family, shape, dist.n_out), dist.task_type,
                            inner_lr=hp["inner_lr"], outer_lr=hp["outer_lr"], inner_steps=int(hp["inner_steps"]))
    fp = checkpoint.fingerprint({"format": FORMAT, "tasks": spec.text, "algo": algo, "seed": seed, **hp})
    resume_from, on_step = None, None
    if state_path is not None:
        resume_from = _load_run_state(state_path, fp, learner) if resume else None

        def on_step(history: list[float], g: torch.Generator) -> None:
            if len(history) == meta_steps or (checkpoint_every and len(history) % checkpoint_every == 0):
                checkpoint.save({"learner": learner.state_dict(), "history": history, "generator": g.get_state(),
                                 "torch_rng": torch.get_rng_state(), "step": len(history)}, state_path, fp)

    history = meta_train(learner, dist, meta_steps, int(hp["meta_batch"]), seed, progress, resume_from, on_step)
    torch.manual_seed(seed + 1)
    joint = JointPretrain(default_model(spec.family, shape, dist.joint_outputs), dist.task_type)
    task_size = len(dist.sample(1, torch.Generator().manual_seed(0))[0].y_support)
    joint_hist = joint.fit(dist, joint_steps or meta_steps, int(hp["meta_batch"]) * max(task_size, 10), seed)
    return {"format": FORMAT, "tasks": spec.text, "family": spec.family, "n_way": spec.n_way,
            "input_shape": list(shape), "n_out": dist.n_out, "joint_outputs": dist.joint_outputs,
            "seed": seed, "meta_batch": int(hp["meta_batch"]), "config": learner.config(),
            "state": learner.state_dict(), "joint": joint.model.state_dict(),
            "history": {"query_loss": history, "joint_loss": joint_hist}}


def _load_run_state(path: str | os.PathLike, fp: str, learner: MetaLearner) -> dict[str, Any] | None:
    """Restore ``learner`` and the global RNG from the run state at ``path``; the loop's part is returned."""
    try:
        state = checkpoint.load(path, fp)
    except checkpoint.CheckpointMismatch as exc:
        raise UserError(str(exc)) from None
    if state is None:
        return None
    learner.load_state_dict(state["learner"])
    torch.set_rng_state(state["torch_rng"])
    return state


def load_checkpoint(ckpt: dict[str, Any]) -> tuple[MetaLearner, JointPretrain]:
    """Rebuild the meta-learner and the joint baseline from ``train_checkpoint``'s dict."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"not a meta-learning checkpoint (expected format {FORMAT})")
    cfg, shape = ckpt["config"], tuple(ckpt["input_shape"])
    learner = build_learner(cfg["algo"], default_model(ckpt["family"], shape, ckpt["n_out"]), cfg["task_type"],
                            inner_lr=cfg["inner_lr"], outer_lr=cfg["outer_lr"], inner_steps=cfg["inner_steps"])
    learner.load_state_dict(ckpt["state"])
    joint = JointPretrain(default_model(ckpt["family"], shape, ckpt["joint_outputs"]), cfg["task_type"])
    load_state(joint.model, ckpt["joint"])
    return learner, joint


def evaluate_checkpoint(ckpt: dict[str, Any], spec: TaskSpec, episodes: int, steps: int | None,
                        seed: int) -> dict[str, Any]:
    """``meta-eval``: the learner and both baselines on ``episodes`` meta-test tasks of ``spec``.

    ``spec`` may change the shots but not the family or the number of ways the model was built for.
    """
    learner, joint = load_checkpoint(ckpt)
    if spec.family != ckpt["family"] or (spec.family != "sinusoid" and spec.n_way != ckpt["n_way"]):
        raise UserError(f"tasks {spec.text} do not match the checkpoint's {ckpt['tasks']} "
                        "(same family and number of ways needed)")
    steps = learner.inner_steps if steps is None else steps
    results = compare(learner, joint, build_distribution(spec, "test"), episodes, steps, seed)
    return {"tasks": spec.text, "algo": learner.name, "episodes": episodes, "steps": steps, "results": results}
