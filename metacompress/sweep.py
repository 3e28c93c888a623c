"""A sweep: one dense model compressed to every budget x allocation, each point exported, verified
and timed against the dense model, so that a user chooses from the accuracy-speed curve rather
than from one number.

The dense model is prepared once (trained or loaded, measured; a latency budget's latency model
built once and read from its cache for the other budgets) and every point goes through the
pipeline's own stages (``compress_stages``, ``export_and_verify``, ``compress_report``), so a
sweep point is exactly what ``metacompress compress`` would give. Outputs (``sweep.csv``,
``sweep.json``, ``sweep.png``) are staged and moved into place only when every point succeeded.
"""

from __future__ import annotations

import copy
import csv
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from metacompress.budget import resolve_budget
from metacompress.compress.rules import RULES
from metacompress.errors import UserError
from metacompress.io import write_json
from metacompress.pipeline import (
    CompressConfig,
    Prepared,
    Timer,
    _publish,
    _stage_dir,
    compress_stages,
    export_and_verify,
    prepare,
)
from metacompress.progress import track

ALLOCATIONS = ("meta", *RULES)
SWEEP_METRICS = ("macs", "latency")
OUTPUTS = ("sweep.csv", "sweep.json", "sweep.png")
COLUMNS = ("metric", "budget", "allocation", "accuracy", "accuracy_delta", "macs", "macs_ratio", "params",
           "params_ratio", "latency_b1_ms", "latency_b32_ms", "dense_latency_b1_ms", "dense_latency_b32_ms",
           "speedup_b1", "speedup_b32", "onnx_bytes", "size_ratio")


@dataclass
class SweepConfig:
    """A sweep: ``base`` holds everything but the budget and the allocation (which vary)."""

    base: CompressConfig
    budgets: Sequence[float] = (0.8, 0.6, 0.4, 0.3, 0.2)
    allocations: Sequence[str] = ALLOCATIONS
    metric: str = "macs"
    out: str = "out/sweep"

    def validate(self) -> None:
        if self.metric not in SWEEP_METRICS:
            raise UserError(f"unknown sweep metric '{self.metric}': use {' or '.join(SWEEP_METRICS)}")
        if not self.budgets:
            raise UserError("give at least one budget, e.g. --budgets 0.8,0.5,0.3")
        bad = [b for b in self.budgets if not 0.0 < b <= 1.0]
        if bad:
            raise UserError(f"budgets are kept fractions in (0, 1], got {', '.join(f'{b:g}' for b in bad)}")
        if len(set(self.budgets)) != len(self.budgets):
            raise UserError("budgets repeat: give each once")
        unknown = [a for a in self.allocations if a not in ALLOCATIONS]
        if unknown or not self.allocations:
            raise UserError(f"unknown allocation(s) {', '.join(unknown) or '(none given)'}: use {', '.join(ALLOCATIONS)}")
        if len(set(self.allocations)) != len(self.allocations):
            raise UserError("allocations repeat: give each once")

    def point(self, budget: float, allocation: str) -> CompressConfig:
        """The compress configuration of one point (its own copy of the repair settings)."""
        targets: dict[str, float | None] = {"target_macs": None, "target_params": None, "target_latency": None,
                                            "target_ms": None, f"target_{self.metric}": budget}
        return replace(self.base, allocation=allocation, repair=copy.deepcopy(self.base.repair), **targets)


def parse_list(text: str, what: str, number: bool = False) -> list[Any]:
    """``"0.8,0.5"`` -> [0.8, 0.5] (``number``) or ``"meta,lamp"`` -> ['meta', 'lamp']."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not number:
        return items
    try:
        return [float(t) for t in items]
    except ValueError:
        raise UserError(f"--{what} must be numbers separated by commas, e.g. 0.8,0.5,0.3; got '{text}'") from None


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Compress the dense model to every budget x allocation; write sweep.csv, sweep.json and
    sweep.png into ``cfg.out``. Returns the dense model's figures and one row per point."""
    cfg.validate()
    budgets = sorted(cfg.budgets, reverse=True)
    timer = Timer()
    prep = prepare(cfg.point(budgets[0], cfg.allocations[0]), timer)
    out = Path(cfg.out)
    tmp = _stage_dir(out)
    try:
        rows, dense = _points(cfg, prep, budgets, tmp)
        result = {"model": cfg.base.model, "data": cfg.base.data, "metric": cfg.metric, "out": str(out),
                  "dense": dense, "rows": rows, "seed": cfg.base.seed}
        _write(result, tmp)
        _publish(tmp, out, list(OUTPUTS))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _points(cfg: SweepConfig, prep: Prepared, budgets: list[float], tmp: Path) -> tuple[list[dict], dict]:
    """Every point in budget order (most kept first); the dense figures from the first point."""
    from metacompress.report import compress_report

    grid = [(b, a) for b in budgets for a in cfg.allocations]
    rows: list[dict[str, Any]] = []
    dense: dict[str, Any] = {}
    budget_prep: dict[float, Prepared] = {budgets[0]: prep}
    try:
        for b, alloc in track(grid, "sweep", total=len(grid)):
            point = cfg.point(b, alloc)
            if b not in budget_prep:
                spec = point.budget()
                budget_prep[b] = replace(prep, budget=resolve_budget(spec, prep.dense, prep.space, prep.data.input_shape))
            timer = Timer()
            c = compress_stages(point, timer, prep=budget_prep[b])
            work = tmp / "points"
            work.mkdir(exist_ok=True)
            report = compress_report(point, c, export_and_verify(point, c, work, timer))
            dense = dense or {k: report["dense"][k] for k in ("macs", "params", "accuracy", "onnx_bytes")}
            rows.append(_row(cfg.metric, b, alloc, report))
    finally:
        for p in budget_prep.values():
            if p.budget.latency is not None:
                p.budget.latency.close()
        shutil.rmtree(tmp / "points", ignore_errors=True)
    return rows, dense


def _row(metric: str, budget: float, allocation: str, r: dict[str, Any]) -> dict[str, Any]:
    """One CSV row from a point's report: what was asked, what it measured, ratios to dense."""
    d, c = r["dense"], r["compressed"]
    return {
        "metric": metric, "budget": budget, "allocation": allocation,
        "accuracy": round(c["accuracy"], 4), "accuracy_delta": round(c["accuracy"] - d["accuracy"], 4),
        "macs": c["macs"], "macs_ratio": r["achieved_macs_ratio"],
        "params": c["params"], "params_ratio": r["achieved_params_ratio"],
        "latency_b1_ms": round(c["latency_ms"]["b1"], 4), "latency_b32_ms": round(c["latency_ms"]["b32"], 4),
        "dense_latency_b1_ms": round(d["latency_ms"]["b1"], 4), "dense_latency_b32_ms": round(d["latency_ms"]["b32"], 4),
        "speedup_b1": r["speedup"]["b1"], "speedup_b32": r["speedup"]["b32"],
        "onnx_bytes": c["onnx_bytes"], "size_ratio": round(c["onnx_bytes"] / d["onnx_bytes"], 4),
    }


def _write(result: dict[str, Any], folder: Path) -> None:
    from metacompress.plots import pareto_plot

    with open(folder / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(result["rows"])
    write_json(folder / "sweep.json", result)
    pareto_plot(result, folder / "sweep.png")
