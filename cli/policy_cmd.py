"""Commands: policy train, policy info, policy eval."""

from __future__ import annotations

from typing import List, Optional

import typer

from metacompress.cli.app import JSON_OPTION, app, command, console, emit, table

policy_app = typer.Typer(help="Meta-train, inspect and evaluate the compression policy.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")


@command("train", target=policy_app)
def train(
    config: str = typer.Option(..., "--config", help="YAML recipe, e.g. recipes/policy-default.yaml."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides of the recipe."),
    out: Optional[str] = typer.Option(None, "--out", help="Output folder (default: the recipe's)."),
    resume: bool = typer.Option(True, "--resume/--restart", help="Continue from the output folder's checkpoint "
                                "if there is one (default), or start over."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Meta-train a policy with evolution strategies over the recipe's task distribution.

    Runs on the recipe's ``workers`` processes, or on every rank of ``torchrun --nproc_per_node N -m
    metacompress policy train ...``; rank 0 writes the outputs and prints.
    """
    from metacompress.meta.distributed import is_main
    from metacompress.policy.meta_train import MetaTrainConfig, train_policy
    from metacompress.recipes import load_recipe

    d = load_recipe(config, overrides or [])
    if out:
        d["out"] = out
    result = train_policy(MetaTrainConfig.from_dict(d), resume=resume)
    if not is_main():
        return
    emit({k: v for k, v in result.items() if k != "history"}, as_json, lambda r: console.print(
        f"policy written to {r['out']} after {r['iterations']} iterations; mean reward over the last 10: "
        f"{100 * r['final_mean_reward_last10']:+.2f} points over uniform"))


@command("info", target=policy_app)
def info(
    path: Optional[str] = typer.Argument(None, help="Policy folder (default: the shipped policy)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show a policy's provenance: teachers, iterations, reward, repair defaults."""
    from metacompress.policy.store import DEFAULT_DIR, load_policy

    pol = load_policy(path)
    prov = {k: v for k, v in pol.provenance.items() if k != "history"}
    curve = [h["mean_reward"] for h in pol.provenance.get("history", [])]
    result = {"path": str(path or DEFAULT_DIR), "parameters": int(pol.theta.size), "repair_defaults": pol.defaults.to_dict(),
              "kinds_seen": list(pol.kinds_seen) if pol.kinds_seen is not None else "all",
              "provenance": prov, "reward_first10": float(sum(curve[:10]) / max(1, len(curve[:10]))),
              "reward_last10": float(sum(curve[-10:]) / max(1, len(curve[-10:])))}

    def render(r: dict) -> None:
        console.print(f"[bold]policy[/bold] {r['path']} ({r['parameters']} weights)")
        for k, v in r["provenance"].items():
            console.print(f"  {k}: {v}")
        console.print(f"  reward (points over uniform): first 10 iterations {100 * r['reward_first10']:+.2f}, "
                      f"last 10 {100 * r['reward_last10']:+.2f}")
        if sel := r["provenance"].get("selection"):
            scores = ", ".join(f"{s['iteration']}: {100 * s['reward']:+.2f}" for s in sel["scores"])
            console.print(f"  shipped: iteration {sel['selected_iteration']}, the best on {sel['tasks']} selection "
                          f"tasks (task seed {sel['task_seed']}, points over uniform by iteration: {scores})")
        console.print(f"  repair defaults: {r['repair_defaults']}")
        console.print(f"  group kinds met in meta-training: {r['kinds_seen']} (others are shown as the closest of these)")

    emit(result, as_json, render)


@command("eval", target=policy_app)
def evaluate(
    config: str = typer.Option("recipes/policy-eval.yaml", "--config", help="YAML list of held-out tasks."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides of the recipe."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Policy folder (default: the shipped policy)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Compare the policy with the built-in allocations (and an oracle, and an ES search) on held-out tasks."""
    from metacompress.policy.evaluate import EvalConfig, markdown, summarise
    from metacompress.policy.evaluate import evaluate as run_eval
    from metacompress.policy.store import load_policy
    from metacompress.recipes import load_recipe

    pol = load_policy(policy)
    cfg = EvalConfig.from_dict(load_recipe(config, overrides or []))
    cfg.repair_defaults = cfg.repair_defaults or pol.defaults.to_dict()
    rows = run_eval(cfg, pol.theta, pol.kinds_seen)
    summary = summarise(rows)

    def render(r: dict) -> None:
        t = table(title="mean test accuracy (%) on held-out tasks")
        cols = list(next(iter(r["summary"]["table"].values())).keys())
        t.add_column("regime")
        for c in cols:
            t.add_column(c, justify="right")
        for reg, row in r["summary"]["table"].items():
            t.add_row(reg, *["-" if row[c] is None else f"{row[c]:.2f}" for c in cols])
        console.print(t)
        console.print({k: v for k, v in r["summary"].items() if k != "table"})

    emit({"summary": summary, "markdown": markdown(summary), "rows": rows}, as_json, render)
