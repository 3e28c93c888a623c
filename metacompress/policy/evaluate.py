"""Judge a policy against the built-in allocations on held-out tasks.

Columns per task: ``meta`` (zero-shot policy: allocation + repair settings), ``meta+guard``
(what ``compress`` keeps: policy/guard.py), ``meta+uniform-guard`` (the guard with uniform as
its only fixed rule: one repair fewer), ``meta+screened-guard`` (the best-screened of all four
rules as its only fixed rule, uniform included: one repair fewer), ``meta-alloc`` (the policy's
allocation with the default repair settings), the four built-ins with the default repair
settings, ``oracle`` (per task, the built-in with the best *validation* accuracy),
``sensitivity`` (the policy's probe-based expert alone, default repair: what the learned
mixture adds to it), and optionally ``es-search`` (a per-task ES search over the same
allocation + repair parameterisation from the uniform start, with a fixed number of
evaluations, scored on validation). Every choice uses the validation split; the table reports test accuracy.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from metacompress.compress.distill import RepairConfig
from metacompress.compress.rules import RULES
from metacompress.policy.guard import SCREENED_RULES, guard_choice, screen_config, screened_rule
from metacompress.policy.meta_train import adapt
from metacompress.policy.network import REGIMES, init_params
from metacompress.policy.tasks import CompressionTask, Score, TaskPool, regime_config, teachers_from
from metacompress.progress import track
from metacompress.signals import pool_worker_signals

COLUMNS = ("meta", "meta+guard", "meta+uniform-guard", "meta+screened-guard", "meta-alloc", *RULES, "oracle",
           "sensitivity")
AGGRESSIVE_BUDGETS = (0.3, 0.15)  # kept MACs where a policy's allocation matters most (issue #16's targets)


@dataclass
class EvalConfig:
    teachers: list[dict[str, Any]]
    budgets: tuple[float, ...] = (0.5, 0.3, 0.15)
    regimes: tuple[str, ...] = REGIMES
    seeds: int = 3
    es_search_evals: int = 0          # 0: no per-task search column
    es_search_budgets: tuple[float, ...] = (0.3, 0.15)
    es_search_regimes: tuple[str, ...] = ("bn", "short", "few")
    workers: int = 2
    repair_defaults: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalConfig":
        from metacompress.errors import UserError

        known = {k: (tuple(v) if isinstance(v, list) and k != "teachers" else v)
                 for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise UserError(f"unknown policy-eval option(s): {', '.join(unknown)}")
        return cls(**known)


_POOL: TaskPool | None = None
_THETA: np.ndarray | None = None


def _init(defaults: dict, theta: np.ndarray, kinds_seen: tuple[str, ...] | None, worker: bool = False) -> None:
    global _POOL, _THETA
    if worker:
        pool_worker_signals()
    torch.set_num_threads(1)
    _POOL, _THETA = TaskPool(RepairConfig(**defaults), kinds_seen), theta


def _row(args: tuple[CompressionTask, int]) -> dict[str, Any]:
    task, es_evals = args
    res: dict[str, Score] = {"meta": _POOL.policy(_THETA, task),
                             "meta-alloc": _POOL.policy(_THETA, task, learned_repair=False)}
    for rule in RULES:
        res[rule] = _POOL.rule(task, rule)
    # exactly the guard of compress (students.guard_repair): the same screens and repairs, the same choice
    screen = screen_config(regime_config(task.regime, _POOL.defaults))
    screened = {r: _POOL.rule(task, r, screen).val_correct for r in ("uniform", *SCREENED_RULES)}
    policy = {"policy": res["meta"], "policy-allocation": res["meta-alloc"]}
    best = screened_rule({r: screened[r] for r in SCREENED_RULES})
    res["meta+guard"] = _guarded({**policy, "uniform": res["uniform"], best: res[best]})
    res["meta+uniform-guard"] = _guarded({**policy, "uniform": res["uniform"]})
    alone = screened_rule(screened)
    res["meta+screened-guard"] = _guarded({**policy, alone: res[alone]})
    oracle = max(RULES, key=lambda r: res[r].val)
    res["oracle"] = res[oracle]
    res["sensitivity"] = _POOL.expert(task, "sensitivity")  # the policy's probe-based expert alone
    if es_evals:
        pop = 8
        theta = adapt(init_params(task.seed), _POOL, task, steps=max(1, es_evals // pop), population=pop,
                      sigma=0.1, lr=0.05, seed=task.seed)
        res["es-search"] = _POOL.policy(theta, task)
    return {"teacher": task.teacher.label(), "budget": task.budget, "regime": task.regime, "seed": task.seed,
            "dense_test": _POOL.context(task.teacher).dense_test, "oracle_rule": oracle, "screened_rule": best,
            "val": {k: v.val for k, v in res.items()}, "test": {k: v.test for k, v in res.items()},
            "val_loss": {k: v.val_loss for k, v in res.items()}}


def _guarded(candidates: dict[str, Score]) -> Score:
    return candidates[guard_choice({n: v.val_correct for n, v in candidates.items()},
                                   {n: v.val_loss for n, v in candidates.items()})]


def evaluate(cfg: EvalConfig, theta: np.ndarray, kinds_seen: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """One row per (teacher, budget, regime, seed) with every column's val and test accuracy
    (``theta`` and ``kinds_seen``: the policy's weights and the group kinds it met)."""
    teachers = teachers_from(cfg.teachers)
    jobs = []
    for t in teachers:
        for b in cfg.budgets:
            for r in cfg.regimes:
                for s in range(cfg.seeds):
                    search = cfg.es_search_evals if (b in cfg.es_search_budgets and r in cfg.es_search_regimes
                                                     and s == 0) else 0
                    jobs.append((CompressionTask(t, b, r, s), search))
    if cfg.workers > 1:
        with mp.get_context("fork").Pool(cfg.workers, _init, (cfg.repair_defaults, theta, kinds_seen, True)) as pool:
            rows = list(track(pool.imap(_row, jobs), "evaluating policy", total=len(jobs)))
    else:
        _init(cfg.repair_defaults, theta, kinds_seen)
        rows = [_row(j) for j in track(jobs, "evaluating policy", total=len(jobs))]
    return rows


def _mean_diff(rows: list[dict[str, Any]], col: str, other: str) -> float:
    return 100 * float(np.mean([r["test"][col] - r["test"][other] for r in rows]))


def _targets(rows: list[dict[str, Any]], col: str, best_rule: str) -> dict[str, Any]:
    """The issue's target checks for one column (``meta`` or ``meta+guard``), in points."""
    short = [r for r in rows if r["regime"] in ("bn", "short", "few")]
    gen = [r for r in rows if r["regime"] == "generous"]
    searched = [r for r in rows if "es-search" in r["test"]]
    out: dict[str, Any] = {}
    if short:
        out["short_minus_best_rule"] = _mean_diff(short, col, best_rule)
        out["short_minus_oracle"] = _mean_diff(short, col, "oracle")
    if gen:
        out["generous_minus_best_rule"] = _mean_diff(gen, col, best_rule)
    if searched:
        out["minus_es_search"] = _mean_diff(searched, col, "es-search")
    gaps = [100 * (r["test"][col] - r["test"]["uniform"]) for r in rows]
    worst = rows[int(np.argmin(gaps))]
    out["worst_run_vs_uniform"] = {"points": min(gaps), "teacher": worst["teacher"], "budget": worst["budget"],
                                   "regime": worst["regime"], "seed": worst["seed"]}
    out["runs_below_uniform_by_0.5"] = f"{sum(g < -0.5 for g in gaps)}/{len(gaps)}"
    cells: dict[tuple, list[float]] = {}
    for r, g in zip(rows, gaps):
        cells.setdefault((r["teacher"], r["budget"], r["regime"]), []).append(g)
    means = {k: float(np.mean(v)) for k, v in cells.items()}
    key = min(means, key=means.get)
    out["worst_cell_vs_uniform"] = {"points": means[key], "teacher": key[0], "budget": key[1], "regime": key[2]}
    out["cells_below_uniform_by_0.5"] = f"{sum(v < -0.5 for v in means.values())}/{len(means)}"
    aggressive = [r for r in short if r["budget"] in AGGRESSIVE_BUDGETS]
    if aggressive:
        out["short_aggressive_minus_best_rule"] = _mean_diff(aggressive, col, best_rule)
    out.update(_versus_cell_best_rule(rows, col, ("teacher", "budget", "regime"), "cell"))
    out.update(_versus_cell_best_rule(rows, col, ("regime", "budget"), "regime_budget"))
    return out


def _versus_cell_best_rule(rows: list[dict[str, Any]], col: str, keys: tuple[str, ...], name: str) -> dict[str, Any]:
    """``col`` against the best fixed rule of each cell (rows grouped by ``keys``, means over the
    rest, in points): the worst cell and how many trail theirs by over 0.5 point."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault(tuple(r[k] for k in keys), []).append(r)

    def mean(sel: list[dict[str, Any]], c: str) -> float:
        return 100 * float(np.mean([r["test"][c] for r in sel]))

    gaps = {k: mean(sel, col) - max(mean(sel, rule) for rule in RULES) for k, sel in cells.items()}
    key = min(gaps, key=gaps.get)
    return {f"worst_{name}_vs_{name}_best_rule": {"points": gaps[key], **dict(zip(keys, key))},
            f"{name}s_below_{name}_best_rule_by_0.5": f"{sum(v < -0.5 for v in gaps.values())}/{len(gaps)}"}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean test accuracy per regime and column, and the issue's target checks.

    A cell is one (teacher, budget, regime) averaged over seeds; a run is one seed of it.
    """
    regimes = sorted({r["regime"] for r in rows}, key=lambda x: REGIMES.index(x))
    cols = [c for c in (*COLUMNS, "es-search") if any(c in r["test"] for r in rows)]
    table: dict[str, dict[str, float]] = {}
    for reg in regimes:
        sel = [r for r in rows if r["regime"] == reg]
        table[reg] = {c: 100 * float(np.mean(vals)) if (vals := [r["test"][c] for r in sel if c in r["test"]]) else None
                      for c in cols}
    rule_means = {rule: np.mean([r["test"][rule] for r in rows]) for rule in RULES}
    best_rule = max(rule_means, key=rule_means.get)
    short = [r for r in rows if r["regime"] in ("bn", "short", "few")]
    summary: dict[str, Any] = {"table": table, "best_single_rule": best_rule,
                               "meta": _targets(rows, "meta", best_rule),
                               "meta+guard": _targets(rows, "meta+guard", best_rule),
                               "meta+uniform-guard": _targets(rows, "meta+uniform-guard", best_rule),
                               "meta+screened-guard": _targets(rows, "meta+screened-guard", best_rule)}
    if short:
        summary["meta_alloc_short_minus_best_rule"] = _mean_diff(short, "meta-alloc", best_rule)
        summary["sensitivity_short_minus_best_rule"] = _mean_diff(short, "sensitivity", best_rule)
    return summary


def markdown(summary: dict[str, Any]) -> str:
    table = summary["table"]
    cols = list(next(iter(table.values())).keys())
    lines = ["| regime | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for reg, row in table.items():
        best = max(v for k, v in row.items() if k != "es-search" and v is not None)
        cells = ("-" if v is None else f"**{v:.2f}**" if v == best else f"{v:.2f}" for v in row.values())
        lines.append(f"| {reg} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
