"""Command: robustify (prune-robust meta-training of a dense model)."""

from __future__ import annotations

from typing import List, Optional

import typer

from metacompress.cli.app import JSON_OPTION, SEED_OPTION, command, console, emit
from metacompress.cli.compress_cmd import MODEL_HELP
from metacompress.compress.robust import RobustConfig


@command("robustify")
def robustify(
    model: str = typer.Argument(..., help=MODEL_HELP),
    weights: Optional[str] = typer.Option(None, "--weights", help="Dense state dict (.pt). Omit to train first."),
    data: str = typer.Option("digits", "--data", help="Data spec: digits, digits@32, synthetic:SHAPE, npz:PATH, idx:DIR, ..."),
    budgets: str = typer.Option("0.15-0.7", "--budgets", help="Range of kept MACs fractions the sub-networks are trained for."),
    steps: int = typer.Option(RobustConfig.steps, "--steps",
                              help="Outer (Reptile) steps, each (tasks + 1) x inner-steps training batches; "
                                   "small models keep gaining from more (BENCHMARKS.md)."),
    inner_steps: int = typer.Option(RobustConfig.inner_steps, "--inner-steps", help="Repair steps per task (k)."),
    tasks: int = typer.Option(RobustConfig.tasks, "--tasks",
                              help="Sub-networks per outer step (smallest and largest budget included)."),
    allocation: List[str] = typer.Option(
        ["meta", "uniform"], "--allocation",
        help="Allocations the tasks draw from (repeat): meta, uniform, global-magnitude, global-taylor, lamp."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Policy folder for --allocation meta (default: shipped)."),
    max_drop: float = typer.Option(RobustConfig.max_drop, "--max-drop",
                                   help="Largest fall of the dense validation accuracy allowed (0.005: half a point); "
                                        "on a small validation split one image can weigh more than that."),
    round_to: str = typer.Option("auto", "--round-to",
                                 help="Keep channel counts multiples of this; auto: the runtime's channel block."),
    out: str = typer.Option(..., "--out", help="Where to write the robust state dict (.pt)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow --weights files that unpickle code."),
    seed: int = SEED_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Meta-train MODEL so that it prunes well at any budget in --budgets (dense accuracy kept within --max-drop)."""
    from metacompress.compress.robust import parse_budgets
    from metacompress.dense import robustify_and_save

    rc = RobustConfig(budgets=parse_budgets(budgets), steps=steps, inner_steps=inner_steps, tasks=tasks,
                      max_drop=max_drop)
    result = robustify_and_save(model, data, weights, out, rc, allocation, policy, round_to, seed, trust_pickle)
    emit(result, as_json, _render)


def _render(r: dict) -> None:
    console.print(f"robustified [bold]{r['model']}[/bold] on {r['data']} for kept MACs {r['budgets'][0]:g}-{r['budgets'][1]:g} "
                  f"in {r['seconds']:.1f} s ({r['kept_step']} of {r['steps']} steps kept): dense test accuracy "
                  f"{r['dense_test_accuracy_before']:.4f} -> {r['dense_test_accuracy_after']:.4f} -> {r['out']}")
    for w in r["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}")
