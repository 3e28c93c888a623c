"""Big torchvision classifiers compressed end to end, as a new user would run them.

    python benchmarks/big_models.py [--models convnext_tiny,vit_b_16,...] [--timeout 600]

Each model: ``metacompress compress torchvision:NAME --data synthetic:3x224x224 --weights none
--target-macs 0.5 --repair-steps 0`` (the default meta policy with its guard, export and
onnxruntime verification included). Prints the wall time of the whole command and
the report's per-stage times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("convnext_tiny", "vit_b_16", "swin_t", "efficientnet_b0", "resnet50")
STAGES = ("load", "measure", "allocate", "prune", "guard", "export", "verify")


def run(name: str, timeout: float) -> dict:
    """Wall time, exit code and the report of one ``compress`` run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "metacompress", "compress", f"torchvision:{name}",
               "--data", "synthetic:3x224x224", "--weights", "none", "--target-macs", "0.5",
               "--repair-steps", "0", "--out", str(out)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"seconds": time.perf_counter() - t0, "rc": "timeout", "report": {}}
        seconds = time.perf_counter() - t0
        report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
        tail = proc.stderr.strip().splitlines()[-1:] if proc.returncode else []
        return {"seconds": seconds, "rc": proc.returncode, "report": report, "error": " ".join(tail)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    print("| model | exit | total, s | MACs kept | ONNX max abs diff | " + " | ".join(STAGES) + " |")
    print("|---|---|---|---|---|" + "---|" * len(STAGES), flush=True)
    for name in args.models.split(","):
        r = run(name, args.timeout)
        rep = r["report"]
        times = rep.get("timings_s", {})
        kept = rep.get("achieved_macs_ratio", "")
        diff = rep.get("onnx", {}).get("max_abs_diff", "")
        stages = " | ".join(f"{times[s]:.1f}" if s in times else "" for s in STAGES)
        kept, diff = (f"{kept:.3f}" if kept != "" else ""), (f"{diff:.1e}" if diff != "" else "")
        print(f"| {name} | {r['rc']} {r.get('error', '')} | {r['seconds']:.0f} | {kept} | {diff} | {stages} |",
              flush=True)


if __name__ == "__main__":
    main()
