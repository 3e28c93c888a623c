"""Two-task merge on digits: average, task arithmetic, TIES, DARE and Fisher merging compared.

Design (see BENCHMARKS.md, "Model fusion"):
- one base mlp is trained briefly on all ten digits (a generic, imperfect starting point);
- model A is fine-tuned from it on digits 0-4 only, model B on digits 5-9 only (same 10-way head,
  same steps, same optimiser): each becomes good at its own task and forgets the other;
- every merge of (A, B) is scored on both tasks: task A = test digits 0-4, task B = test digits
  5-9, 10-way top-1 accuracy; the headline is their mean;
- Fisher: each model's diagonal empirical Fisher on its own task's training data (512 samples);
  once with equal model weights, once with Matena & Raffel's model weights (w_A, 1 - w_A) tuned;
- hyperparameters (lambda, density, p, w_A) are chosen per seed on the validation split (mean of both
  tasks), never on the test split; the test split is used once per chosen setting;
- references: the base, A and B alone, and a multi-task model fine-tuned from the base on 0-9
  with the same number of steps (what merging tries to approach without joint training);
- several seeds: each seed changes the base initialisation, the batch order and the DARE masks.

Run: ``.venv/bin/python benchmarks/fusion_merge.py [--quick] [--seeds N] [--json F] [--export DIR]``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacompress.data import load_dataset
from metacompress.io import save_torch, write_json
from metacompress.meta.fusion import (
    dare,
    estimate_fisher,
    fisher_merge,
    task_arithmetic,
    ties_merge,
    uniform_soup,
)
from metacompress.meta.fusion import state_dict_accuracy as accuracy
from metacompress.zoo import build_model

TASK_A = (0, 1, 2, 3, 4)
TASK_B = (5, 6, 7, 8, 9)
BASE_STEPS = 40  # about two epochs of batch 64: a base well short of convergence
FT_STEPS = 150
LR = 1e-3
BATCH = 64

GRID = {
    "task arithmetic": [{"lam": v} for v in (0.2, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2)],
    "TIES": [{"density": d, "lam": v}
             for d, v in itertools.product((0.1, 0.2, 0.5), (0.6, 0.8, 1.0, 1.5, 2.0))],
    "DARE": [{"p": p, "lam": v} for p, v in itertools.product((0.3, 0.5, 0.7, 0.9), (1.0, 1.5, 2.0))],
    "DARE+TIES": [{"p": p, "lam": v}
                  for p, v in itertools.product((0.3, 0.5, 0.7, 0.9), (0.6, 0.8, 1.0, 1.5))],
    "Fisher, tuned model weights": [{"w_a": v} for v in (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)],
}
QUICK_GRID = {
    "task arithmetic": [{"lam": v} for v in (0.4, 0.8, 1.0)],
    "TIES": [{"density": d, "lam": v} for d, v in itertools.product((0.2, 0.5), (1.0, 1.5))],
    "DARE": [{"p": p, "lam": v} for p, v in itertools.product((0.5, 0.9), (1.0, 2.0))],
    "DARE+TIES": [{"p": p, "lam": v} for p, v in itertools.product((0.5, 0.9), (1.0, 1.5))],
    "Fisher, tuned model weights": [{"w_a": v} for v in (0.2, 0.5, 0.8)],
}


def _subset(x: Tensor, y: Tensor, classes: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    keep = torch.isin(y, torch.tensor(classes))
    return x[keep], y[keep]


def _train(model: nn.Module, x: Tensor, y: Tensor, steps: int, seed: int) -> dict[str, Tensor]:
    """Adam on shuffled batches (order from ``seed``); returns a copy of the final state dict."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    model.train()
    order = torch.randperm(len(x), generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + BATCH > len(order):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos:pos + BATCH]
        pos += BATCH
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_seed(seed: int, grid: dict[str, list[dict]]) -> tuple[dict[str, dict], dict[str, dict[str, Tensor]]]:
    """All references and merges for one seed, and the base and fine-tuned weights.

    Scores are {name: {"val", "A", "B", "mean", "params"}}; weights {"base", "task_a", "task_b"}.
    """
    ds = load_dataset("digits")
    torch.manual_seed(seed)
    model = build_model("mlp", ds.input_shape, ds.num_classes, ds.mean, ds.std)
    base = _train(model, ds.x_train, ds.y_train, BASE_STEPS, seed)

    def finetune(classes: tuple[int, ...], salt: int) -> dict[str, Tensor]:
        model.load_state_dict(base)
        x, y = _subset(ds.x_train, ds.y_train, classes)
        return _train(model, x, y, FT_STEPS, seed * 100 + salt)

    ft_a, ft_b = finetune(TASK_A, 1), finetune(TASK_B, 2)
    joint = finetune(TASK_A + TASK_B, 3)

    splits = {
        name: (_subset(x, y, TASK_A), _subset(x, y, TASK_B))
        for name, (x, y) in {"val": (ds.x_val, ds.y_val), "test": (ds.x_test, ds.y_test)}.items()
    }

    def score(sd: dict[str, Tensor], split: str) -> tuple[float, float]:
        (xa, ya), (xb, yb) = splits[split]
        return accuracy(model, sd, xa, ya), accuracy(model, sd, xb, yb)

    def record(sd: dict[str, Tensor], params: dict | None = None) -> dict:
        a, b = score(sd, "test")
        return {"val": sum(score(sd, "val")) / 2, "A": a, "B": b, "mean": (a + b) / 2, "params": params or {}}

    def tuned(merge: Callable[..., dict[str, Tensor]], settings: list[dict]) -> dict:
        """Pick the setting with the best validation mean (first wins ties), report its test scores."""
        best = max(settings, key=lambda s: sum(score(merge(**s), "val")) / 2)
        return record(merge(**best), best)

    xa, ya = _subset(ds.x_train, ds.y_train, TASK_A)
    xb, yb = _subset(ds.x_train, ds.y_train, TASK_B)
    fishers = [estimate_fisher(model, ft_a, xa, ya), estimate_fisher(model, ft_b, xb, yb)]
    pair = [ft_a, ft_b]
    scores = {
        "base": record(base),
        "fine-tuned A": record(ft_a),
        "fine-tuned B": record(ft_b),
        "multi-task (joint fine-tune)": record(joint),
        "average": record(uniform_soup(pair)),
        "task arithmetic": tuned(lambda lam: task_arithmetic(base, pair, lam), grid["task arithmetic"]),
        "TIES": tuned(lambda density, lam: ties_merge(base, pair, density, lam), grid["TIES"]),
        "DARE": tuned(lambda p, lam: dare(base, pair, p, seed=seed, lam=lam), grid["DARE"]),
        "DARE+TIES": tuned(lambda p, lam: dare(base, pair, p, seed=seed, merge="ties", lam=lam),
                           grid["DARE+TIES"]),
        "Fisher": record(fisher_merge(pair, fishers)),
        "Fisher, tuned model weights": tuned(lambda w_a: fisher_merge(pair, fishers, weights=[w_a, 1 - w_a]),
                                             grid["Fisher, tuned model weights"]),
    }
    return scores, {"base": base, "task_a": ft_a, "task_b": ft_b}


def _fmt(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    sd = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}"


def table(runs: list[dict[str, dict]]) -> str:
    """Markdown table: test accuracy (%) mean ± std over seeds, and the most chosen setting."""
    lines = ["| model | task A (0-4) | task B (5-9) | mean of A, B | chosen on val (mode) |",
             "|---|---:|---:|---:|---|"]
    for name in runs[0]:
        rows = [r[name] for r in runs]
        chosen = Counter(tuple(sorted(r["params"].items())) for r in rows).most_common(1)[0][0]
        setting = ", ".join(f"{k}={v}" for k, v in chosen) or "-"
        lines.append(f"| {name} | {_fmt([r['A'] for r in rows])} | {_fmt([r['B'] for r in rows])} | "
                     f"**{_fmt([r['mean'] for r in rows])}** | {setting} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds and a small grid (smoke run)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 10, quick 2)")
    parser.add_argument("--json", default=None, help="also write every run's numbers to this file")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="write seed 0's base.pt, task_a.pt, task_b.pt here "
                             "(the inputs of benchmarks/recipes/fuse-example.yaml)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(args.seeds or (2 if args.quick else 10)))
    grid = QUICK_GRID if args.quick else GRID
    start = time.perf_counter()
    results = [run_seed(s, grid) for s in seeds]
    runs = [scores for scores, _ in results]
    print(f"digits, mlp, seeds {seeds}, test accuracy % (mean ± std over seeds), "
          f"{time.perf_counter() - start:.0f} s\n")
    print(table(runs))
    if args.json:
        write_json(args.json, {"seeds": seeds, "runs": runs})
    if args.export:
        for name, sd in results[0][1].items():
            save_torch(sd, Path(args.export) / f"{name}.pt")


if __name__ == "__main__":
    main()
