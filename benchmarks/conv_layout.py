"""PyTorch CPU passes in channels-last against NCHW layout, on torchvision classifiers at 224x224.

    python benchmarks/conv_layout.py [--models resnet18,resnet50,...] [--repeats 5] [--batch 32]

What ``training.convolution_layout`` buys: per sample, an evaluation pass (eval mode, no
gradient), a BN-recalibration pass (train mode, no gradient) and a training step (forward,
backward, Adam), each timed in both layouts, interleaved (NCHW then channels-last, repeat), median
of ``--repeats``. Random weights and inputs, torch's default threads. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121", "regnet_y_400mf",
          "convnext_tiny")
LAYOUTS = {"NCHW": torch.contiguous_format, "channels-last": torch.channels_last}


def _passes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], None]]:
    opt = torch.optim.Adam(model.parameters(), 1e-4)

    def evaluate() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    def recalibrate() -> None:
        model.train()
        with torch.no_grad():
            model(x)

    def step() -> None:
        model.train()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return {"eval": evaluate, "BN recalibration": recalibrate, "train step": step}


def measure(name: str, batch: int, repeats: int) -> dict[tuple[str, str], float]:
    """Median ms per sample of each pass in each layout."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 10, (batch,))
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(repeats + 1):  # the first round warms up
        for layout, fmt in LAYOUTS.items():
            model.to(memory_format=fmt)
            xx = x.contiguous(memory_format=fmt)
            for kind, run in _passes(model, xx, y).items():
                start = time.perf_counter()
                run()
                if r:
                    times.setdefault((kind, layout), []).append((time.perf_counter() - start) / batch * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    kinds = ("eval", "BN recalibration", "train step")
    print("| model | " + " | ".join(f"{k}: NCHW / channels-last, ms per sample | speedup" for k in kinds) + " |")
    print("|---|" + "---|---|" * len(kinds))
    for name in args.models.split(","):
        t = measure(name, args.batch, args.repeats)
        cells = [f"{t[k, 'NCHW']:.1f} / {t[k, 'channels-last']:.1f} | **{t[k, 'NCHW'] / t[k, 'channels-last']:.2f}x**"
                 for k in kinds]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
