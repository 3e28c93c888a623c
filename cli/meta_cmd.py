"""Commands: meta-train, meta-eval (the meta-learning core, ``metacompress.meta``)."""

from __future__ import annotations

from pathlib import Path

import typer

from metacompress.cli.app import JSON_OPTION, SEED_OPTION, command, console, emit, table
from metacompress.errors import UserError
from metacompress.io import load_weights, save_torch
from metacompress.meta import ALGORITHMS, distributed, parse_task_spec
from metacompress.meta.runner import evaluate_checkpoint, train_checkpoint
from metacompress.progress import track

OUT_OPTION = typer.Option(..., "--out", help="Checkpoint to write (.pt).")
CHECKPOINT_ARG = typer.Argument(..., help="Checkpoint written by meta-train.")
TASKS_HELP = "sinusoid | digits-rot:5w1s | digits-rot:5w5s | npz:PATH:5w1s"


def _positive(value: int | None, name: str) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{name} must be positive, got {value}")


@command("meta-train")
def meta_train(
    algo: str = typer.Option("maml", "--algo", help=f"One of: {', '.join(ALGORITHMS)}."),
    tasks: str = typer.Option("sinusoid", "--tasks", help=TASKS_HELP),
    meta_steps: int = typer.Option(1000, "--meta-steps", help="Outer updates."),
    meta_batch: int = typer.Option(None, "--meta-batch", help="Tasks per outer update (family default)."),
    inner_steps: int = typer.Option(None, "--inner-steps", help="Inner SGD steps (family default)."),
    inner_lr: float = typer.Option(None, "--inner-lr", help="Inner learning rate (family default)."),
    outer_lr: float = typer.Option(None, "--outer-lr", help="Outer learning rate (default per algorithm)."),
    joint_steps: int = typer.Option(None, "--joint-steps", help="Joint-baseline steps (default --meta-steps)."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Write the run state (OUT.ckpt) every "
                                         "so many meta-steps (0: never)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT.ckpt if it exists (same settings)."),
    out: Path = OUT_OPTION,
    seed: int = SEED_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Meta-train an algorithm (and the joint transfer baseline) on a task family's meta-train split.

    Under ``torchrun`` each rank computes the meta-gradient of its shard of every meta-batch;
    rank 0 writes the outputs.
    """
    for value, name in ((meta_steps, "--meta-steps"), (meta_batch, "--meta-batch"),
                        (inner_steps, "--inner-steps"), (joint_steps, "--joint-steps")):
        _positive(value, name)
    if checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be 0 or positive, got {checkpoint_every}")
    spec = parse_task_spec(tasks)
    distributed.init_from_env()
    state = Path(f"{out}.ckpt") if checkpoint_every or resume else None
    ckpt = train_checkpoint(spec, algo, meta_steps, seed, inner_lr, outer_lr, inner_steps, meta_batch,
                            joint_steps, progress=lambda it: track(it, f"meta-train {algo}", meta_steps),
                            state_path=state, checkpoint_every=checkpoint_every, resume=resume)
    if not distributed.is_main():
        return
    save_torch(ckpt, out)
    losses = ckpt["history"]["query_loss"]
    tail = losses[-max(1, len(losses) // 10):]
    result = {"algo": algo, "tasks": spec.text, "meta_steps": meta_steps, "out": str(out),
              "first_query_loss": losses[0], "final_query_loss": sum(tail) / len(tail)}
    emit(result, as_json, lambda r: console.print(
        f"{r['algo']} on {r['tasks']}: query loss {r['first_query_loss']:.4f} -> "
        f"{r['final_query_loss']:.4f} after {r['meta_steps']} meta-steps; wrote {r['out']}"))


def _render_eval(r: dict) -> None:
    t = table(title=f"{r['tasks']}: {r['episodes']} meta-test episodes, {r['steps']} adaptation step(s)")
    t.add_column("method")
    metric = next(k for k in next(iter(r["results"].values())) if k != "ci95")
    t.add_column(f"{metric} (95 % CI)", justify="right")
    for name, row in r["results"].items():
        scale, unit = (100, " %") if metric == "accuracy" else (1, "")
        t.add_row(name, f"{row[metric] * scale:.3f}{unit} ± {row['ci95'] * scale:.3f}")
    console.print(t)


@command("meta-eval")
def meta_eval(
    checkpoint: Path = CHECKPOINT_ARG,
    tasks: str = typer.Option(None, "--tasks", help=f"{TASKS_HELP} (default: the checkpoint's)."),
    episodes: int = typer.Option(600, "--episodes", help="Meta-test tasks to average over."),
    steps: int = typer.Option(None, "--steps", help="Adaptation steps at test (default: training's)."),
    seed: int = SEED_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Mean accuracy (or MSE) with 95 % CI on meta-test tasks: the algorithm, joint and no-adapt."""
    _positive(steps, "--steps")
    if episodes < 2:
        raise UserError(f"--episodes must be at least 2, got {episodes}")
    ckpt = load_weights(checkpoint)
    if not isinstance(ckpt, dict):
        raise UserError(f"{checkpoint} is not a meta-train checkpoint (it holds a {type(ckpt).__name__})")
    spec = parse_task_spec(tasks if tasks is not None else str(ckpt.get("tasks", "")))
    emit(evaluate_checkpoint(ckpt, spec, episodes, steps, seed), as_json, _render_eval)
