"""A text classifier over token ids, compressed from the command line as a user would.

    python benchmarks/text_tokens.py [--length 64] [--n 4000] [--epochs 4] [--targets latency=0.5,macs=0.5]

Data: generated sentences (``--n`` of ``--length`` token ids, padded with id 0 at the end to a
random length): each of 4 classes has 40 topic words, drawn for 12 % of the tokens, the rest from
a shared vocabulary (``models.TEXT_VOCAB``). Model: ``models.py:text_transformer`` (embedding,
4 pre-norm PyTorch encoder layers of width 256, padding masked). The dense model is trained once
(``metacompress train``); each target is one ``metacompress compress`` run with the default
policy and 20 repair steps, on ``npz:PATH:tokens``. Prints accuracy, measured speedup (b1, b32),
kept MACs, ONNX parity and wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from models import TEXT_VOCAB

HERE = Path(__file__).resolve().parent


def sentences(n: int, length: int, seed: int = 0, classes: int = 4, topic: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (0 pads) and labels, from a fixed seed."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    ids = rng.integers(1 + classes * topic, TEXT_VOCAB, (n, length))
    topical = rng.random((n, length)) < 0.12
    words = 1 + y[:, None] * topic + rng.integers(0, topic, (n, length))
    ids = np.where(topical, words, ids)
    ends = rng.integers(length // 2, length + 1, n)
    ids[np.arange(length)[None, :] >= ends[:, None]] = 0
    return ids.astype(np.int64), y


def cli(*args: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "metacompress", *args, "--json"], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"metacompress {' '.join(args[:2])} failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--targets", default="latency=0.5,macs=0.5")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        x, y = sentences(args.n, args.length)
        np.savez(Path(tmp) / "text.npz", x=x, y=y)
        data, model = f"npz:{Path(tmp) / 'text.npz'}:tokens", f"{HERE / 'models.py'}:text_transformer"
        t0 = time.perf_counter()
        dense = cli("train", model, "--data", data, "--epochs", str(args.epochs), "--out", str(Path(tmp) / "dense.pt"))
        print(f"dense: test accuracy {dense['accuracy']:.4f}, trained in {time.perf_counter() - t0:.0f} s")
        print("| target | accuracy (dense -> compressed) | speedup b1 / b32 | MACs kept | ONNX max abs diff | s |")
        print("|---|---|---|---|---|---|")
        for target in args.targets.split(","):
            kind, value = target.split("=")
            t0 = time.perf_counter()
            r = cli("compress", model, "--data", data, "--weights", str(Path(tmp) / "dense.pt"),
                    f"--target-{kind}", value, "--repair-steps", "20", "--out", str(Path(tmp) / kind))
            s = r["speedup"]
            print(f"| {kind} {value} | {r['dense']['accuracy']:.4f} -> {r['compressed']['accuracy']:.4f} | "
                  f"{s['b1']:.2f}x / {s['b32']:.2f}x | {r['achieved_macs_ratio']:.3f} | "
                  f"{r['onnx']['max_abs_diff']:.1e} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
