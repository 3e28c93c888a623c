"""A latency model of the deployment runtime: predicted latency of the exported graph as a
function of every group's kept width, built on the machine that runs it and cached there.

MACs are not time: per-op overhead, memory-bound layers and the runtime's channel blocking
decide. The model therefore describes an allocation by what the runtime computes, summed over
the dense model's layers at their kept widths:

- convolution MACs with channels padded up to the runtime's block (``runtime.channel_block``),
  split by kind (k x k, 1 x 1, depthwise), since each kind runs its own kernel at its own speed;
- the MACs of convolutions the runtime cannot run in its blocked layout, at their real widths:
  onnxruntime's NCHWc path takes a convolution only when its input width is a multiple of the
  block (or below one block) and a depthwise one only when its width is; others run a slower
  generic kernel with layout reorders around them (a dense model with 24-wide layers has some);
- linear and attention MACs;
- activations written, padded alike (memory traffic of the memory-bound ops around the layers);

plus a constant: per-op overhead and what pruning does not touch. The weights of these terms
are fitted, non-negative least squares in relative error, to measurements of pruned variants
of this very model (random allocations on the rounding grid, uniform ones and the floor), each
timed against the dense model in the same interleaved rounds (``bench.benchmark_latency``), at
every batch size the model is asked for. A fit per model and machine costs ~20 exports and a
few seconds of timing, and then answers a budget search in microseconds per candidate.

The model is cached as JSON, keyed by what changes the answer: the model's layer structure, the
input shape, the batch sizes, the rounding grid, the provider, the thread count, the CPU and
the onnxruntime version.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.optimize import nnls
from torch import nn

from metacompress.compress.importance import unit_scores
from metacompress.compress.prune import PruningSpace
from metacompress.deploy.bench import benchmark_latency
from metacompress.deploy.export import export_onnx
from metacompress.deploy.runtime import channel_block, runtime_signature
from metacompress.errors import UserError
from metacompress.io import write_json
from metacompress.progress import track

VERSION = 4
TERMS = ("conv", "pointwise", "depthwise", "linear", "attention", "unblocked", "activations")
PADDED = ("conv", "pointwise", "depthwise")   # kinds the runtime computes in channel blocks
SAMPLES = 20                                  # pruned variants timed per build
SESSIONS = 3                                  # sessions per model when one allocation is checked
TIMING_BUDGET_S = {1: 8.0, 32: 20.0}          # seconds of timing per batch size (others: 20)


@dataclass
class BatchFit:
    """The fitted model at one batch size."""

    batch: int
    dense_ms: float             # the dense model's measured median latency
    coef: list[float]           # constant, then one weight per TERMS entry (relative to dense)
    loo_error: float            # median relative leave-one-out prediction error over the samples
    samples: list[dict] = field(default_factory=list)   # {"keep": [...], "ratio": measured}


class LatencyModel:
    """Predicted latency of ``space``'s model at any allocation; a ``CostModel`` at ``batch``."""

    name = "latency"

    def __init__(self, space: PruningSpace, block: int, fits: dict[int, BatchFit], key: str,
                 signature: dict[str, Any], batch: int, source: str = "built", build_s: float = 0.0):
        self.space, self.block, self.fits, self.key = space, block, fits, key
        self.signature, self.batch, self.source, self.build_s = signature, batch, source, build_s
        layers = space.layers
        self._kind = np.array([TERMS.index(lt.kind) for lt in layers], dtype=int)
        self._macs = np.array([lt.macs for lt in layers], dtype=float)
        self._elems = np.array([lt.out_elems for lt in layers], dtype=float)
        self._out_ch = np.array([lt.out_channels for lt in layers], dtype=float)
        self._in_ch = np.array([lt.in_channels for lt in layers], dtype=float)
        self._outputs = _share_matrix(layers, len(space.groups), out=True)
        self._inputs = _share_matrix(layers, len(space.groups), out=False)
        self._padded = np.isin(self._kind, [TERMS.index(k) for k in PADDED])
        self._dense_terms = self.terms([g.channels for g in space.groups], normalise=False)

    # ----- prediction -----------------------------------------------------------------
    def terms(self, keep: Sequence[int], normalise: bool = True) -> np.ndarray:
        """The allocation's TERMS; ``normalise``: MAC terms over the dense model's MACs (all kinds
        together, so a kind the dense model lacks still counts), activations over its activations."""
        f = self.space.fractions(keep)      # last entry 1.0: index -1 is "not pruned"
        fin, fout = self._inputs @ f, self._outputs @ f
        out_w = self._width(fout, self._out_ch)
        in_w = self._width(fin, self._in_ch)
        # an input narrower than one block is read as it is (NCHW), not padded
        narrow = np.round(fin * self._in_ch) < self.block
        in_w = np.where(narrow, np.round(fin * self._in_ch) / np.maximum(1.0, self._in_ch), in_w)
        depthwise = self._kind == TERMS.index("depthwise")
        scale = np.where(depthwise | (self._kind == TERMS.index("attention")), out_w, out_w * in_w)
        kind = self._kind.copy()
        unblocked = self._unblocked(f)
        kind[unblocked] = TERMS.index("unblocked")
        raw = np.round(fout * self._out_ch) / np.maximum(1.0, self._out_ch)
        raw_in = np.round(fin * self._in_ch) / np.maximum(1.0, self._in_ch)
        scale[unblocked] = np.where(depthwise, raw, raw * raw_in)[unblocked]
        values = np.zeros(len(TERMS))
        np.add.at(values, kind, self._macs * scale)
        values[TERMS.index("activations")] = float(np.sum(self._elems * out_w))
        if not normalise:
            return values
        act = TERMS.index("activations")
        scale = np.full(len(TERMS), max(1.0, float(np.delete(self._dense_terms, act).sum())))  # MACs: one scale
        scale[act] = max(1.0, float(self._dense_terms[act]))
        return values / scale

    def _unblocked(self, f: np.ndarray) -> np.ndarray:
        """Convolutions outside the runtime's blocked layout at these kept fractions."""
        cin = np.round((self._inputs @ f) * self._in_ch)
        cout = np.round((self._outputs @ f) * self._out_ch)
        depthwise = self._kind == TERMS.index("depthwise")
        regular = (cin >= self.block) & (cin % self.block != 0)
        return self._padded & np.where(depthwise, cout % self.block != 0, regular)

    def _width(self, fraction: np.ndarray, channels: np.ndarray) -> np.ndarray:
        """Kept width as a fraction of the dense width, padded to the block where the runtime pads."""
        kept = np.round(fraction * channels)
        padded = np.ceil(kept / self.block) * self.block / np.maximum(1.0, np.ceil(channels / self.block) * self.block)
        return np.where(self._padded, padded, kept / np.maximum(1.0, channels))

    def predict_fraction(self, keep: Sequence[int], batch: int | None = None) -> float:
        """Predicted latency of the allocation over the dense model's measured latency, at ``batch``.

        Not renormalised by the prediction for the dense widths: a dense model can be slower than
        its smooth extrapolation (a 24-wide layer that leaves the blocked layout, a working set
        past a cache), and that must not shift every pruned prediction with it."""
        coef = np.asarray(self._fit(batch).coef)
        return float(coef[0] + coef[1:] @ self.terms(keep))

    def predict_ms(self, keep: Sequence[int], batch: int | None = None) -> float:
        return self.predict_fraction(keep, batch) * self._fit(batch).dense_ms

    def fraction(self, keep: Sequence[int]) -> float:
        return self.predict_fraction(keep, self.batch)

    def dense_ms(self, batch: int | None = None) -> float:
        return self._fit(batch).dense_ms

    def _fit(self, batch: int | None) -> BatchFit:
        b = self.batch if batch is None else int(batch)
        if b not in self.fits:
            raise UserError(f"the latency model was built for batch sizes {sorted(self.fits)}, not {b}")
        return self.fits[b]

    def per_group_ms(self, batch: int | None = None) -> list[float]:
        """Predicted time each group saves when it alone is pruned to its floor (ms)."""
        at_batch = copy.copy(self)
        at_batch.batch = self.batch if batch is None else int(batch)
        return [saved * self.dense_ms(batch) for saved in self.space.group_savings(at_batch)]

    def describe(self) -> dict[str, Any]:
        """What ``inspect --latency`` and the report show."""
        return {"source": self.source, "build_s": round(self.build_s, 2), "key": self.key[:16],
                "block": self.block, "signature": self.signature,
                "fits": {f"b{b}": {"dense_ms": round(f.dense_ms, 4), "loo_error": round(f.loo_error, 4),
                                   "samples": len(f.samples),
                                   "coef": dict(zip(("constant",) + TERMS, (round(c, 4) for c in f.coef)))}
                         for b, f in sorted(self.fits.items())}}


def _share_matrix(layers, n_groups: int, out: bool) -> np.ndarray:
    """(layers x groups+1): row l times the groups' kept fractions (last entry 1.0) is layer l's
    kept output (``out``) or input fraction; a width set by several groups (a concatenated input, a
    residual stream of concatenated channels) mixes them by their share of the width."""
    m = np.zeros((len(layers), n_groups + 1))
    for i, lt in enumerate(layers):
        shares = lt.out_shares if out else lt.in_shares
        if shares:
            for gi, share in shares:
                m[i, gi] += share
            m[i, -1] += max(0.0, 1.0 - sum(s for _, s in shares))
        else:
            m[i, lt.out_group if out else lt.in_group] = 1.0
    return m


# ----- fitting --------------------------------------------------------------------------
def fit_terms(terms: np.ndarray, ratios: np.ndarray) -> np.ndarray:
    """Non-negative weights (constant first) so that ``const + terms @ w`` matches ``ratios`` (each
    variant's latency over the dense model's) in relative error; the dense model (all terms 1,
    ratio 1) is one of the rows."""
    a = np.column_stack([np.ones(len(terms)), terms]) / ratios[:, None]
    coef, _ = nnls(a, np.ones(len(ratios)))
    return coef


def loo_error(terms: np.ndarray, ratios: np.ndarray) -> float:
    """Median relative error predicting each measured sample from a fit on the others."""
    errors = []
    for i in range(1, len(ratios)):       # row 0 is the dense model, always kept
        rest = np.arange(len(ratios)) != i
        coef = fit_terms(terms[rest], ratios[rest])
        pred = coef[0] + terms[i] @ coef[1:]
        errors.append(abs(pred - ratios[i]) / ratios[i])
    return float(np.median(errors)) if errors else 0.0


def sample_allocations(space: PruningSpace, n: int, seed: int = 0) -> list[list[int]]:
    """Allocations on the rounding grid that span the space: the floor, three uniform levels and
    random ones (a random overall level, each group scattered around it)."""
    rng = np.random.default_rng(seed)
    channels = np.array([g.channels for g in space.groups], dtype=float)
    floor = np.array(space.floor_keep(), dtype=float)
    levels = [np.full(len(channels), u) for u in (0.25, 0.5, 0.75)]
    while len(levels) < n - 1:
        u = rng.uniform(0.0, 1.0)
        levels.append(np.clip(u + rng.normal(0.0, 0.3, len(channels)), 0.0, 1.0))
    out = [space.floor_keep()]
    for t in levels:
        kept = floor + t * (channels - floor)
        out.append(space.keep_counts(list(1.0 - kept / channels)))
    return out


# ----- building -------------------------------------------------------------------------
@dataclass
class Measured:
    """Interleaved medians of the dense model and the variants at each batch size."""

    dense_ms: dict[int, float]
    ratios: dict[int, list[float]]


def export_variants(dense: nn.Module, space: PruningSpace, allocations: list[list[int]], folder: Path) -> list[Path]:
    """Export the dense model and one pruned variant per allocation (structure is what is timed:
    channels are picked by the dense model's magnitude, computed once)."""
    scores = unit_scores(dense, space.groups, "magnitude", example=space.example)
    paths = [folder / "dense.onnx"]
    export_onnx(dense, space.example, paths[0], dynamo=False)
    for i, keep in enumerate(track(allocations, "latency model: pruning variants")):
        variant = space.apply(copy.deepcopy(dense), keep, scores=scores)
        paths.append(folder / f"v{i}.onnx")
        export_onnx(variant, space.example, paths[-1], dynamo=False)
    return paths


def time_variants(paths: list[Path], input_shape: Sequence[int], batches: Sequence[int], threads: int,
                  provider: str) -> Measured:
    """Time all files interleaved, with repeats sized to each batch size's timing budget. The dense
    model (``paths[0]``), which every ratio divides by, is timed in SESSIONS sessions (median)."""
    dense_ms: dict[int, float] = {}
    ratios: dict[int, list[float]] = {}
    names = {f"d{i}": paths[0] for i in range(SESSIONS)} | {f"m{i}": p for i, p in enumerate(paths[1:])}
    for b in batches:
        res = benchmark_latency(names, input_shape, batches=(b,), threads=threads, repeats=5, warmup=2,
                                provider=provider, min_seconds=TIMING_BUDGET_S.get(b, 20.0))
        dense_ms[b] = float(np.median([res[f"d{i}"][f"b{b}"]["median_ms"] for i in range(SESSIONS)]))
        ratios[b] = [1.0] + [res[f"m{i}"][f"b{b}"]["median_ms"] / dense_ms[b] for i in range(len(paths) - 1)]
    return Measured(dense_ms, ratios)


def build_latency_model(dense: nn.Module, space: PruningSpace, input_shape: Sequence[int], batch: int = 1,
                        batches: Sequence[int] = (1, 32), threads: int = 1, provider: str = "cpu",
                        cache: bool = True, samples: int | None = None, seed: int = 0) -> LatencyModel:
    """The latency model of ``dense`` (on ``space``'s groups) at ``batch`` (and ``batches``):
    from the cache when one matches, else measured and fitted here (and cached)."""
    if batch < 1 or threads < 1:
        raise UserError(f"latency batch and threads must be >= 1, got {batch} and {threads}")
    batches = tuple(sorted({int(batch), *(int(b) for b in batches)}))
    block = channel_block(provider)
    signature = runtime_signature(provider, threads)
    key = cache_key(space, input_shape, batches, signature)
    path = cache_dir() / f"{key}.json"
    if cache and path.is_file():
        fits = _read_cache(path)
        if fits is not None:
            return LatencyModel(space, block, fits, key, signature, batch, source="cached")
    t0 = time.perf_counter()
    allocations = sample_allocations(space, samples or SAMPLES, seed)
    with tempfile.TemporaryDirectory(prefix="mc-latency-") as tmp:
        paths = export_variants(dense, space, allocations, Path(tmp))
        measured = time_variants(paths, input_shape, batches, threads, provider)
    model = LatencyModel(space, block, {}, key, signature, batch)
    terms = np.stack([model.terms([g.channels for g in space.groups])] + [model.terms(k) for k in allocations])
    for b in batches:
        ratios = np.array(measured.ratios[b])
        coef = fit_terms(terms, ratios)
        model.fits[b] = BatchFit(b, measured.dense_ms[b], [float(c) for c in coef], loo_error(terms, ratios),
                                 [{"keep": k, "ratio": float(r)} for k, r in zip(allocations, ratios[1:])])
    model.build_s = time.perf_counter() - t0
    if cache:
        write_json(path, {"version": VERSION, "key": key, "signature": signature, "batches": list(batches),
                          "build_s": model.build_s, "fits": [asdict(f) for f in model.fits.values()]})
    return model


def cache_dir() -> Path:
    """``$METACOMPRESS_CACHE/latency``, else ``~/.cache/metacompress/latency``."""
    root = os.environ.get("METACOMPRESS_CACHE") or Path.home() / ".cache" / "metacompress"
    return Path(root) / "latency"


def cache_key(space: PruningSpace, input_shape: Sequence[int], batches: Sequence[int], signature: dict) -> str:
    structure = [[lt.name, lt.kind, lt.macs, lt.out_channels, lt.in_channels, lt.out_group, lt.in_group, lt.in_shares,
                  lt.out_shares] for lt in space.layers]
    groups = [[g.name, g.channels, g.step] for g in space.groups]
    blob = json.dumps({"version": VERSION, "layers": structure, "groups": groups, "dense_macs": space.dense_macs,
                       "input": [int(d) for d in input_shape], "batches": list(batches), "runtime": signature},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_cache(path: Path) -> dict[int, BatchFit] | None:
    """The fits of a cache file, or None when it is unreadable or from another version."""
    try:
        blob = json.loads(path.read_text())
        if blob.get("version") != VERSION:
            return None
        return {int(f["batch"]): BatchFit(**f) for f in blob["fits"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def measure_ratio(dense_path: Path, path: Path, input_shape: Sequence[int], batch: int, threads: int,
                  provider: str = "cpu", budget_s: float = 4.0) -> tuple[float, float]:
    """(latency of ``path`` over the dense model's, dense ms), interleaved medians at ``batch``,
    each over SESSIONS sessions of the file (``bench.benchmark_latency``)."""
    res = benchmark_latency({"d": dense_path, "c": path}, input_shape, batches=(batch,), threads=threads,
                            repeats=7, warmup=2, provider=provider, min_seconds=budget_s,
                            sessions_per_model=SESSIONS)
    d, c = res["d"][f"b{batch}"]["median_ms"], res["c"][f"b{batch}"]["median_ms"]
    return c / d, d
