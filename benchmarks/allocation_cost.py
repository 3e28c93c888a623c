"""Allocation cost against the number of groups, on torchvision classifiers at 224x224.

    python benchmarks/allocation_cost.py [--models resnet18,resnet50,...] [--baseline] [--repeats 1]

Times the whole allocation stage of ``compress`` (the policy's features and experts, policy,
budget projection) at 0.5 kept MACs, 2 threads, random weights, synthetic data. Also shows how
many groups the probes measured, and the stage's time in dense forward passes at the calibration
batch (128 samples), the unit the issue bounds. ``--baseline`` also times every model, interleaved,
with every group probed by whole forward passes (no prefix reuse, no budget): the previous behaviour.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch

os.environ.setdefault("METACOMPRESS_PROGRESS", "0")
warnings.filterwarnings("ignore", message="Unwrapped parameters")

from policy_vs_baselines import allocation_seconds  # noqa: E402

from metacompress.compress.attention import split_self_attention  # noqa: E402
from metacompress.compress.prune import PruningSpace  # noqa: E402
from metacompress.meta.modules import has_batchnorm  # noqa: E402
from metacompress.policy import probe_plan  # noqa: E402
from metacompress.policy.features import PROBE_RATIOS  # noqa: E402
from metacompress.policy.probes import CURVE_RATIOS, probe_samples  # noqa: E402
from metacompress.zoo import build_model  # noqa: E402

MODELS = ("resnet18", "resnet50", "densenet121", "efficientnet_b0", "convnext_tiny", "vit_b_16")
DATA = "synthetic:3x224x224:n=200"


def forward_seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    """Median time of one dense forward pass of ``x``, per sample."""
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return float(np.median(times)) / len(x)


def describe(name: str) -> dict:
    """Groups, the probe plan and the dense forward time of one model."""
    model = build_model(f"torchvision:{name}", (3, 224, 224), 10).eval()
    x = torch.randn(8, 3, 224, 224)
    split_self_attention(model, x[:1])  # as ``compress`` converts it
    space = PruningSpace(model, x[:1], 10)
    profile = probe_plan.profile_forward(model, x)
    points = len(CURVE_RATIOS) + (len(PROBE_RATIOS) if has_batchnorm(model) else 0)
    plan = probe_plan.plan_probes(space.groups, profile, probe_samples(space), points)
    return {"groups": len(space.groups), "probed": len(plan.probed), "gmacs": space.dense_macs / 1e9,
            "forward_s": forward_seconds(model, x)}


def timed(name: str, baseline: bool, repeats: int) -> float:
    """The allocation stage's median time, as shipped or (``baseline``) probing everything whole."""
    saved = probe_plan.PROBE_COST_BUDGET, probe_plan.PREFIX_CACHE_BYTES
    if baseline:
        probe_plan.PROBE_COST_BUDGET, probe_plan.PREFIX_CACHE_BYTES = float("inf"), 0
    try:
        return allocation_seconds(f"torchvision:{name}", DATA, None, repeats=repeats)
    finally:
        probe_plan.PROBE_COST_BUDGET, probe_plan.PREFIX_CACHE_BYTES = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--baseline", action="store_true", help="also time the previous behaviour, interleaved")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(2)
    head = "| model | groups | probed | GMACs | dense forward, ms/sample | allocation, s | in forwards at batch 128 |"
    rule = "|---|---|---|---|---|---|---|"
    if args.baseline:
        head, rule = head + " before, s |", rule + "---|"
    print(head + "\n" + rule, flush=True)
    for name in args.models.split(","):
        d = describe(name)
        seconds = timed(name, False, args.repeats)
        row = (f"| {name} | {d['groups']} | {d['probed']} | {d['gmacs']:.2f} | {1000 * d['forward_s']:.0f} | "
               f"{seconds:.1f} | {seconds / (128 * d['forward_s']):.1f} |")
        if args.baseline:
            row += f" {timed(name, True, args.repeats):.1f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
