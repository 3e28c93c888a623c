"""Peak memory of ``compress`` on a folder of JPEGs, at two folder sizes.

    python benchmarks/imagefolder_memory.py [--images 2000,8000] [--model resnet18] [--repair-steps 0]

Writes N JPEGs of mixed sizes (sides 96-640 px, any aspect; 10 classes, 80 % train / 20 % test)
into a temporary folder, then runs ``metacompress compress torchvision:MODEL --data
imagefolder:DIR:size=224 --weights none --target-macs 0.5`` on it in a child process and reports
the child's peak resident memory (``wait4``'s ``ru_maxrss``) and wall time. A folder whose float32
copy exceeds ``metacompress.data.lazy.IN_MEMORY_BYTES`` is read batch by batch, so the peak should
not grow with the number of images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES = 10
TRAIN_SHARE = 0.8
SIDES = (96, 640)


def write_folder(root: Path, n: int, seed: int = 0) -> int:
    """``n`` JPEGs: a class colour over smooth random structure, at a random size. Returns bytes written."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 255, (CLASSES, 3))
    total = 0
    for i in range(n):
        split = "train" if i < TRAIN_SHARE * n else "test"
        c = i % CLASSES
        folder = root / split / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = rng.integers(*SIDES, 2)
        coarse = rng.integers(0, 255, (6, 6, 3)).astype(np.float32) * 0.5 + colours[c] * 0.5
        im = Image.fromarray(coarse.astype(np.uint8)).resize((int(w), int(h)), Image.BICUBIC)
        path = folder / f"{i}.jpg"
        im.save(path, quality=90)
        total += path.stat().st_size
    return total


def run(data: str, model: str, repair_steps: int, out: Path) -> dict:
    """One ``compress`` in a child process: exit code, wall time, peak resident memory."""
    cmd = [sys.executable, "-m", "metacompress", "compress", f"torchvision:{model}", "--data", data,
           "--weights", "none", "--target-macs", "0.5", "--repair-steps", str(repair_steps), "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    tail = proc.stderr.read().strip().splitlines()[-1:] if proc.stderr else []
    rc = os.waitstatus_to_exitcode(status)
    report = json.loads((out / "report.json").read_text()) if rc == 0 else {}
    return {"rc": rc, "seconds": seconds, "peak_gb": usage.ru_maxrss / 2**20, "error": " ".join(tail) if rc else "",
            "stages": report.get("timings_s", {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="2000,8000")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--repair-steps", type=int, default=0)
    args = ap.parse_args()
    rows = []
    for n in [int(s) for s in args.images.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "images"
            size = write_folder(root, n)
            r = run(f"imagefolder:{root}:size=224", args.model, args.repair_steps, Path(tmp) / "out")
        rows.append((n, size, r))
        print(f"{n} images ({size / 2**20:.0f} MB of JPEG): exit {r['rc']}, {r['seconds']:.0f} s, "
              f"peak {r['peak_gb']:.2f} GB {r['error']}", file=sys.stderr)
    print("| images | JPEG MB | exit | wall, s | peak resident memory, GB | stages, s |")
    print("|---|---|---|---|---|---|")
    for n, size, r in rows:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages"].items())
        print(f"| {n} | {size / 2**20:.0f} | {r['rc']} | {r['seconds']:.0f} | {r['peak_gb']:.2f} | {stages} |")


if __name__ == "__main__":
    main()
