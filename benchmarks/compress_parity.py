"""Foundation figures: every zoo family x every allocation at 0.5 kept MACs on digits.

    python benchmarks/compress_parity.py [--quick]

Per (model, allocation): achieved MACs ratio, ONNX max abs diff and top-1 agreement against
PyTorch (onnxruntime, test split), and test accuracy after the default repair, next to the
dense model's. Dense models are trained here (seeded), as `metacompress compress` would.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("METACOMPRESS_PROGRESS", "0")

from metacompress.allocation import allocate
from metacompress.compress.distill import repair  # noqa: E402
from metacompress.compress.measure import count_macs  # noqa: E402
from metacompress.compress.rules import RULES  # noqa: E402
from metacompress.deploy import export_onnx, verify_onnx  # noqa: E402
from metacompress.pipeline import CompressConfig, prepare
from metacompress.students import prune_to  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="mlp only, uniform only")
    args = ap.parse_args()
    torch.set_num_threads(2)
    models = ["mlp"] if args.quick else ["mlp", "resnet20", "vgg-small", "mobilenet-small", "vit-tiny"]
    rules = ["uniform"] if args.quick else list(RULES)
    print("| model | allocation | MACs ratio | max abs diff | top-1 agreement | dense acc | compressed acc | loss (points) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            base = CompressConfig(model=m, data="digits", target_macs=0.5, allocation="uniform")
            prep = prepare(base)
            for rule in rules:
                cfg = CompressConfig(model=m, data="digits", target_macs=0.5, allocation=rule)
                keep, importance, rcfg = allocate(cfg, prep)
                student = prune_to(prep, keep, importance)
                repair(student, prep.dense, prep.data, rcfg, progress=False)
                path = Path(tmp) / f"{m}-{rule}.onnx"
                export_onnx(student, prep.data.x_test[:1], path)
                ver = verify_onnx(path, student, prep.data.x_test, prep.data.y_test)
                ratio = count_macs(student, prep.data.x_test[:1]) / prep.space.dense_macs
                loss = 100 * (prep.dense_accuracy - ver["accuracy"])
                print(f"| {m} | {rule} | {ratio:.3f} | {ver['max_abs_diff']:.1e} | {100 * ver['top1_agreement']:.1f} % | "
                      f"{100 * prep.dense_accuracy:.2f} | {100 * ver['accuracy']:.2f} | {loss:+.2f} |", flush=True)


if __name__ == "__main__":
    main()
