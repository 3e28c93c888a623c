"""Latency of ONNX models in onnxruntime, measured so that comparisons between models hold.

On a shared or throttling machine the noise is large and drifts over seconds, so measuring model A
then model B can show a "speedup" that is only the machine. Here every repeat runs each model
once, round-robin (starting with a different model each repeat), so drift hits all models alike,
and the median over repeats is reported with the min and max so the spread is visible.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from metacompress.data.inputs import timing_feed
from metacompress.deploy.verify import check_input, load_session
from metacompress.errors import UserError

MAX_REPEATS = 5000
MIN_TIMINGS = 3  # fewest timings of each model (over all its sessions) a time cap (``max_seconds``) may leave
LONG_PASS_S = 1.0  # passes at least this long count from their first run (a first run's one-off costs are lost in them)


def _session(ref: Any, threads: int | None, spin: bool, provider: str) -> ort.InferenceSession:
    return ref if isinstance(ref, ort.InferenceSession) else load_session(ref, threads, spin, provider)


def benchmark_latency(models: dict[str, Any], input_shape: Sequence[int], batches: Sequence[int] = (1, 32),
                      threads: int | None = None, repeats: int = 20, warmup: int = 3,
                      seed: int = 0, spin: bool = False, provider: str = "cpu", min_seconds: float = 0.0,
                      sessions_per_model: int = 1, max_seconds: float = float("inf")
                      ) -> dict[str, dict[str, dict[str, float]]]:
    """Time one forward pass of each model per batch size, interleaved across models.

    ``models`` maps a name to an ONNX path or an open session (a session keeps its own thread
    setting; paths are opened with ``threads`` and, unless ``spin``, with worker threads that
    sleep rather than spin-wait, so that sessions timed in turn do not steal each other's cores;
    on ``provider``). Each session keeps its own memory arena, as a deployed one does: sessions
    sharing one measured a few percent slower for the dense model (BENCHMARKS.md).
    ``input_shape`` is one sample's shape. ``min_seconds``: repeat more than ``repeats`` times
    until the timed rounds of a batch size last this long (fast models need thousands of
    repeats before a burst of other work on the machine stops moving the median). ``max_seconds``:
    repeat fewer than ``repeats`` times where the rounds of a batch size would last longer, down to
    MIN_TIMINGS timings of each model over its sessions: a ViT-B at batch 32 takes seconds per
    pass, and its median moves little.
    ``sessions_per_model``: open each path this many times and report the median of the
    sessions' medians: one session of a model can run a few percent faster or slower than
    another of the same file for as long as it lives (BENCHMARKS.md, "Latency budgets"), which
    no number of repeats averages out. Returns ``{name: {"b1":
    {"median_ms", "min_ms", "max_ms", "rounds"}, "b32": {...}}}``.
    """
    if not models:
        raise UserError("no models to benchmark")
    if repeats < 1 or warmup < 0:
        raise UserError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if not batches or any(int(b) < 1 for b in batches):
        raise UserError(f"batch sizes must be positive integers, got {list(batches)}")
    shape = tuple(int(d) for d in input_shape)
    copies = max(1, int(sessions_per_model))
    sessions = {(name, i): _session(ref, threads, spin, provider)
                for name, ref in models.items() for i in range(copies if not isinstance(ref, ort.InferenceSession) else 1)}
    for (name, _), sess in sessions.items():
        check_input(sess, shape, what=f"benchmark input for '{name}'")
    names = list(sessions)
    rng = np.random.default_rng(seed)
    result: dict[str, dict[str, dict[str, float]]] = {name: {} for name in models}
    for batch in batches:
        kind = next(iter(sessions.values())).get_inputs()[0].type
        x = timing_feed((int(batch), *shape), kind, rng)
        feeds = {name: {sess.get_inputs()[0].name: x} for name, sess in sessions.items()}
        per_round, last = _warm_up(sessions, feeds, warmup, max_seconds)
        rounds = _rounds(per_round, repeats, min_seconds, max_seconds, copies)
        counted = min(last.values()) >= LONG_PASS_S * 1e3
        times: dict[tuple[str, int], list[float]] = {key: [last[key]] if counted else [] for key in names}
        for r in range(int(counted), rounds):
            for k in range(len(names)):
                key = names[(r + k) % len(names)]
                start = time.perf_counter()
                sessions[key].run(None, feeds[key])
                times[key].append((time.perf_counter() - start) * 1e3)
        for name in models:
            runs = [ts for (n, _), ts in times.items() if n == name]
            result[name][f"b{batch}"] = {"median_ms": statistics.median(statistics.median(ts) for ts in runs),
                                         "min_ms": min(map(min, runs)), "max_ms": max(map(max, runs)),
                                         "rounds": rounds}
    return result


def _warm_up(sessions: dict, feeds: dict, warmup: int, max_seconds: float) -> tuple[float, dict]:
    """Untimed rounds over every session: ``warmup`` of them, or fewer (at least one) where they
    would take over a tenth of ``max_seconds``. Returns the seconds one round takes, and each
    session's ms in the last round: where every pass takes LONG_PASS_S or more, that round counts
    as the first timed one (ViT-B/16 at batch 32: a fresh session's first pass is within the
    spread of its next three; BENCHMARKS.md), which saves a round of passes that last seconds."""
    done, start, last = 0, time.perf_counter(), {}
    while done < max(1, warmup):
        for key, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, feeds[key])
            last[key] = (time.perf_counter() - t0) * 1e3
        done += 1
        if (time.perf_counter() - start) / done * max(1, warmup) > max_seconds / 10:
            break
    return (time.perf_counter() - start) / done, last


def _rounds(per_round: float, repeats: int, min_seconds: float, max_seconds: float, copies: int) -> int:
    """Timed rounds: ``repeats``, more to last ``min_seconds``, fewer to stay within
    ``max_seconds`` but enough for MIN_TIMINGS timings of each model (``copies`` sessions each)."""
    rounds = max(repeats, min(MAX_REPEATS, int(min_seconds / max(per_round, 1e-9))))
    if max_seconds < rounds * per_round:
        fewest = -(-MIN_TIMINGS // copies)
        rounds = min(rounds, max(fewest, int(max_seconds / max(per_round, 1e-9))))
    return rounds


def speedups(result: dict[str, dict[str, dict[str, float]]], baseline: str) -> dict[str, dict[str, float]]:
    """``baseline`` median / model median for every other model and batch size (> 1: faster)."""
    if baseline not in result:
        raise UserError(f"no benchmark result named '{baseline}'")
    base = result[baseline]
    return {name: {b: base[b]["median_ms"] / stats["median_ms"] for b, stats in per_batch.items()}
            for name, per_batch in result.items() if name != baseline}
