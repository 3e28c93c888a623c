"""Peak memory of ``compress`` on a folder of JPEGs, at two folder sizes, and the rate at which
lazy batches are decoded with and without threads.

    python benchmarks/imagefolder_memory.py [--images 2000,8000] [--model resnet18] [--repair-steps 0]
        [--decode-rounds 3]

Writes N JPEGs of mixed sizes (sides 96-640 px, any aspect; 10 classes, 80 % train / 20 % test)
into a temporary folder, then runs ``metacompress compress torchvision:MODEL --data
imagefolder:DIR --weights none --target-macs 0.5`` on it in a child process (no size given: the
images are read at the model's own input size) and reports the child's peak resident memory
(``wait4``'s ``ru_maxrss``) and wall time. A folder whose float32 copy exceeds
``metacompress.data.lazy.IN_MEMORY_BYTES`` is read batch by batch, so the peak should not grow
with the number of images. On the first folder it then times reading the training split lazily in
batches of 32, with one decoding thread and with ``lazy.DECODE_THREADS``, interleaved rounds.
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


def decode_rates(root: Path, size: int, rounds: int) -> dict[int, list[float]]:
    """Images per second reading the training split lazily in batches of 32, by decoding threads
    (1 and ``DECODE_THREADS``), ``rounds`` interleaved rounds each."""
    import metacompress.data.imagefolder as imagefolder
    from metacompress.data import load_dataset
    from metacompress.data.lazy import DECODE_THREADS

    rates: dict[int, list[float]] = {1: [], DECODE_THREADS: []}
    for _ in range(rounds):
        for threads in rates:
            imagefolder.DECODE_THREADS = threads
            x = load_dataset(f"imagefolder:{root}:size={size}").x_train
            start = time.perf_counter()
            for i in range(0, len(x), 32):
                x[i:i + 32]
            rates[threads].append(len(x) / (time.perf_counter() - start))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="2000,8000")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--repair-steps", type=int, default=0)
    ap.add_argument("--decode-rounds", type=int, default=3, help="0: skip the decoding rates")
    args = ap.parse_args()
    rows, rates = [], {}
    for n in [int(s) for s in args.images.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "images"
            size = write_folder(root, n)
            r = run(f"imagefolder:{root}", args.model, args.repair_steps, Path(tmp) / "out")
            if not rates and args.decode_rounds:
                rates = decode_rates(root, 224, args.decode_rounds)
        rows.append((n, size, r))
        print(f"{n} images ({size / 2**20:.0f} MB of JPEG): exit {r['rc']}, {r['seconds']:.0f} s, "
              f"peak {r['peak_gb']:.2f} GB {r['error']}", file=sys.stderr)
    print("| images | JPEG MB | exit | wall, s | peak resident memory, GB | stages, s |")
    print("|---|---|---|---|---|---|")
    for n, size, r in rows:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages"].items())
        print(f"| {n} | {size / 2**20:.0f} | {r['rc']} | {r['seconds']:.0f} | {r['peak_gb']:.2f} | {stages} |")
    if rates:
        print("\n| decoding threads | images/s (median) | rounds | speedup |\n|---|---|---|---|")
        base = float(np.median(rates[1]))
        for threads, values in rates.items():
            print(f"| {threads} | {np.median(values):.0f} | {len(values)} | {np.median(values) / base:.2f}x |")


if __name__ == "__main__":
    main()
