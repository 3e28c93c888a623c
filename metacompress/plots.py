"""Plots of results, drawn headless (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

BATCHES = ("b1", "b32")


def pareto_plot(sweep: dict[str, Any], path: str | Path) -> None:
    """Accuracy against measured speedup (one panel per batch size), one line per allocation
    through its budgets, the dense model marked at 1x: the trade-off a user picks a point from."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(10, 4.2), dpi=110)
    dense = sweep["dense"]["accuracy"]
    allocations = list(dict.fromkeys(r["allocation"] for r in sweep["rows"]))
    for i, batch in enumerate(BATCHES):
        ax = fig.add_subplot(1, len(BATCHES), i + 1)
        for alloc in allocations:
            rows = sorted((r for r in sweep["rows"] if r["allocation"] == alloc), key=lambda r: -r["budget"])
            xs = [r[f"speedup_{batch}"] for r in rows]
            ys = [100 * r["accuracy"] for r in rows]
            ax.plot(xs, ys, marker="o", label=alloc)
            for x, y, r in zip(xs, ys, rows):
                ax.annotate(f"{r['budget']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.scatter([1.0], [100 * dense], marker="*", s=180, color="black", zorder=5, label="dense")
        ax.axhline(100 * dense, color="black", linewidth=0.6, linestyle=":")
        ax.set_xlabel(f"measured speedup over dense, batch {batch[1:]} (x)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
    budgets = ", ".join(f"{b:g}" for b in sorted({r["budget"] for r in sweep["rows"]}, reverse=True))
    fig.suptitle(f"{sweep['model']} on {sweep['data']}: kept {sweep['metric']} {budgets}")
    fig.axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
