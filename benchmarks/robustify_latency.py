"""Budgets in measured latency as robustify's task draws: `compress --robustify --target-latency`
against the plain dense model and against the plain model given robustify's compute as plain training.

    python benchmarks/robustify_latency.py --data idx:/usr/share/datasets/fashion-mnist:n=3000:size=16 \
        [--model resnet20] [--targets 0.5,0.3] [--steps 0,20] [--epochs 30] [--robustify-steps 100]
        [--workdir DIR] [--out FILE]

One seed. The dense model is trained once (`metacompress train`). For each latency target and
repair regime, `metacompress compress MODEL --weights W --target-latency T --repair-steps S`
runs with (a) W = the dense model and `--robustify`, (b) W = the dense model, (c) W = the dense
model trained further with plain cross-entropy for as many batches as the first robustify run
spent (forward + backward), so that a gain is not just more training. CLI default allocation
(policy + guard). Prints a markdown table of test accuracy, measured latency, kept MACs and
robustify's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

os.environ.setdefault("METACOMPRESS_PROGRESS", "0")

from robustify import train_extra  # noqa: E402  (benchmarks/robustify.py: condition (c) as the MACs benchmark trains it)

from metacompress.data import load_dataset  # noqa: E402
from metacompress.pipeline import load_dense  # noqa: E402
from metacompress.training import accuracy  # noqa: E402

CLI = [sys.executable, "-m", "metacompress"]


def cli(*args: str) -> None:
    subprocess.run([*CLI, *args], check=True, stdout=subprocess.DEVNULL)


def compress(model: str, data: str, weights: Path, target: float, steps: int, robust_steps: int | None,
             out: Path) -> dict:
    """One `compress` run (``robust_steps``: with `--robustify` of that many steps); the fields of
    its report.json the table shows."""
    robust = ["--robustify", "--robustify-steps", str(robust_steps)] if robust_steps else []
    cli("compress", model, "--data", data, "--weights", str(weights), "--target-latency", str(target),
        "--repair-steps", str(steps), "--out", str(out), *robust)
    report = json.loads((out / "report.json").read_text())
    robust_info = report.get("robustify") or {}
    return {"accuracy": report["compressed"]["accuracy"], "latency_b1": report["latency"]["measured_fraction"]["b1"],
            "macs": report["achieved_macs_ratio"], "warnings": report.get("warnings", []),
            "robustify_s": robust_info.get("seconds"), "forward_backward": robust_info.get("forward_backward"),
            "dense_accuracy": robust_info.get("dense_test_accuracy")}


def extra_trained(model: str, data_spec: str, dense: Path, batches: int, out: Path) -> Path:
    """(c): the dense model trained ``batches`` more batches of 64 with plain cross-entropy."""
    torch.set_num_threads(os.cpu_count() or 1)
    data = load_dataset(data_spec)
    net = load_dense(model, data, str(dense), seed=0)
    epochs, _ = train_extra(net, data, batches, seed=1)
    torch.save(net.state_dict(), out)
    print(f"(c): {epochs} extra epochs; dense test accuracy {accuracy(net, data.x_test, data.y_test):.4f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--data", required=True)
    ap.add_argument("--targets", default="0.5,0.3")
    ap.add_argument("--steps", default="0,20", help="repair steps of each regime (0: BN recalibration only)")
    ap.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    ap.add_argument("--robustify-steps", type=int, default=100, help="outer steps of --robustify")
    ap.add_argument("--workdir", default="/tmp/robustify-latency")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    dense = work / "dense.pt"
    if not dense.exists():
        cli("train", args.model, "--data", args.data, "--epochs", str(args.epochs), "--out", str(dense))
    targets = [float(t) for t in args.targets.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    rows, extra = [], None
    for t in targets:
        for s in steps:
            cell = {"target": t, "steps": s}
            cell["robust"] = compress(args.model, args.data, dense, t, s, args.robustify_steps, work / f"robust-{t}-{s}")
            cell["plain"] = compress(args.model, args.data, dense, t, s, None, work / f"plain-{t}-{s}")
            if extra is None:
                extra = extra_trained(args.model, args.data, dense, cell["robust"]["forward_backward"], work / "extra.pt")
            cell["extra"] = compress(args.model, args.data, extra, t, s, None, work / f"extra-{t}-{s}")
            rows.append(cell)
            print(json.dumps(cell), flush=True)
    print("\n| target latency | repair | (b) plain | (a) robustified | (c) plain + extra training | (a)-(b) | (a)-(c) "
          "| measured latency b1, b / a / c | kept MACs, b / a / c | robustify, s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in rows:
        a, b, e = c["robust"], c["plain"], c["extra"]
        regime = "BN only" if c["steps"] == 0 else f"{c['steps']} steps"
        print(f"| {c['target']} | {regime} | {100 * b['accuracy']:.2f} % | {100 * a['accuracy']:.2f} % "
              f"| {100 * e['accuracy']:.2f} % | {100 * (a['accuracy'] - b['accuracy']):+.1f} "
              f"| {100 * (a['accuracy'] - e['accuracy']):+.1f} "
              f"| {b['latency_b1']:.3f} / {a['latency_b1']:.3f} / {e['latency_b1']:.3f} "
              f"| {b['macs']:.3f} / {a['macs']:.3f} / {e['macs']:.3f} | {a['robustify_s']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
