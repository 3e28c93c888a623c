"""The held-out summary's target checks, on rows whose answers are known."""

import pytest

from metacompress.compress.rules import RULES
from metacompress.policy.evaluate import COLUMNS, summarise


def _row(teacher: str, budget: float, regime: str, seed: int, meta: float, rules: dict[str, float]) -> dict:
    test = {c: 0.5 for c in COLUMNS}
    test.update(rules)
    test.update({"meta": meta, "meta+guard": meta})
    return {"teacher": teacher, "budget": budget, "regime": regime, "seed": seed, "test": test, "val": test}


def test_summary_compares_with_the_best_rule_per_cell_and_per_regime_budget_cell():
    rules = {r: 0.5 for r in RULES}
    rows = []
    for seed in (0, 1):
        # teacher a at 0.3: meta 4 points over every rule; at 0.15 lamp is best there and meta 2 below it
        rows.append(_row("a", 0.3, "short", seed, 0.54, rules))
        rows.append(_row("a", 0.15, "short", seed, 0.52, {**rules, "lamp": 0.54}))
        # teacher b at 0.15: global magnitude best in this cell, meta 1 point above it; at 0.5 no gain
        rows.append(_row("b", 0.15, "short", seed, 0.56, {**rules, "global-magnitude": 0.55}))
        rows.append(_row("b", 0.5, "short", seed, 0.5, rules))
    s = summarise(rows)
    meta = s["meta+guard"]
    # over all rows global magnitude averages 51.25, lamp 51.0, the others 50
    assert s["best_single_rule"] == "global-magnitude"
    # 0.3 and 0.15 only, against global magnitude: a@0.3 +4, a@0.15 +2, b@0.15 +1
    assert meta["short_aggressive_minus_best_rule"] == pytest.approx(7 / 3)
    assert meta["worst_cell_vs_cell_best_rule"]["points"] == pytest.approx(-2.0)
    assert meta["worst_cell_vs_cell_best_rule"]["teacher"] == "a"
    assert meta["cells_below_cell_best_rule_by_0.5"] == "1/4"
    # per (regime, budget): at 0.15 meta averages 54, lamp 52 and global magnitude 52.5 -> +1.5
    assert meta["worst_regime_budget_vs_regime_budget_best_rule"]["points"] == pytest.approx(0.0)
    assert meta["worst_regime_budget_vs_regime_budget_best_rule"]["budget"] == 0.5
    assert meta["regime_budgets_below_regime_budget_best_rule_by_0.5"] == "0/3"
