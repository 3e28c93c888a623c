"""Check an exported ONNX model in onnxruntime: does it answer like the PyTorch model it came from?

Export, simplification and quantization all rewrite the graph; the only proof that the deployed
file still does the job is to run it in the runtime users deploy with and compare, on real data,
against the reference network: largest logit difference, top-1 agreement and accuracy.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from metacompress.data.inputs import model_input, onnx_feed
from metacompress.data.lazy import LazySamples, Samples
from metacompress.errors import UserError
from metacompress.io import require_file
from metacompress.meta.modules import eval_mode
from metacompress.progress import batched

MAX_ONNX_BYTES = 2**31  # protobuf's limit for one file; larger models keep their weights as external data


def check_onnx(path: str | os.PathLike) -> Path:
    """Refuse a file that is not a valid ONNX model before onnxruntime parses it.

    ONNX files given by users come from anywhere: the size is bounded first, then
    ``onnx.checker`` validates the graph (it also refuses external-data paths that leave the
    model's folder). Files the toolkit wrote itself skip this and go straight to ``load_session``.
    """
    p = require_file(path, "ONNX model")
    size = p.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise UserError(f"{p} holds {size / 2**30:.1f} GiB; an ONNX file is at most {MAX_ONNX_BYTES / 2**30:.0f} GiB "
                        "(store larger weights as external data)")
    try:
        onnx.checker.check_model(str(p))
    except Exception as exc:  # ValidationError, DecodeError, ...: all mean the file is not usable
        raise UserError(f"{p} is not a valid ONNX model: {' '.join(str(exc).split())[:200] or type(exc).__name__}") from None
    return p


def declared_image_size(path: str | os.PathLike) -> int | None:
    """S when the ONNX model's first input is N x C x S x S with S fixed (the size to read an
    image folder of mixed sizes at), else None."""
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in graph.input[0].type.tensor_type.shape.dim]
    return dims[2] if len(dims) == 4 and dims[2] > 0 and dims[2] == dims[3] else None


def load_session(path: str | os.PathLike, threads: int | None = None, spin: bool = True,
                 provider: str = "cpu") -> ort.InferenceSession:
    """Open ``path`` in onnxruntime (on the CPU unless ``provider`` says otherwise: ``cuda``, ...);
    a missing, truncated or non-ONNX file is a UserError.

    ``threads`` fixes the intra-op thread count (None: onnxruntime's default, all cores); inter-op
    parallelism stays at 1 so that ``threads`` is the whole budget and latencies are comparable.
    ``spin=False`` makes worker threads sleep instead of spin-waiting between ops: on cores shared
    with other work (or with the next session of an interleaved benchmark) spinning threads fight
    over the cores, and the timing measures the contention (BENCHMARKS.md, "Does half the MACs
    run twice as fast?").
    """
    from metacompress.deploy.runtime import PROVIDERS, provider_name

    p = require_file(path, "ONNX model")
    providers = list(dict.fromkeys([provider_name(provider), PROVIDERS["cpu"]]))  # CPU runs what the other cannot
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.inter_op_num_threads = 1
    if threads is not None:
        if threads < 1:
            raise UserError(f"threads must be at least 1, got {threads}")
        opts.intra_op_num_threads = int(threads)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(p), sess_options=opts, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types for bad files
        first = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(f"{p} is not a loadable ONNX model (truncated or not ONNX?): {first}") from None


def model_facts(path: str | os.PathLike) -> dict[str, Any]:
    """Opset, file size and operator counts of an ONNX file (subgraphs and functions included)."""
    p = require_file(path, "ONNX model")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        raise UserError(f"cannot parse {p} as ONNX: {' '.join(str(exc).split())[:200]}") from None
    ops: Counter[str] = Counter()

    def count(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            ops[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    count(attr.g)
                for g in attr.graphs:
                    count(g)

    count(model.graph)
    for fn in model.functions:
        for node in fn.node:
            ops[node.op_type] += 1
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return {"opset": int(opset), "bytes": int(p.stat().st_size), "ops": dict(sorted(ops.items()))}


def check_input(session: ort.InferenceSession, sample_shape: tuple[int, ...], what: str = "data") -> None:
    """Raise a UserError when samples of ``sample_shape`` do not fit the model's (first) input."""
    declared = session.get_inputs()[0].shape[1:]
    fits = len(declared) == len(sample_shape) and all(
        not isinstance(d, int) or d <= 0 or d == s for d, s in zip(declared, sample_shape))
    if not fits:
        shown = "x".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in declared)
        raise UserError(f"{what} samples have shape {'x'.join(map(str, sample_shape)) or 'scalar'}; "
                        f"the model takes {shown or 'scalar'}")


def run_batched(session: ort.InferenceSession, x: Any, batch_size: int = 256) -> np.ndarray:
    """Logits of ``x`` (an array, a tensor or lazy samples) from ``session``, ``batch_size``
    samples per call (bounded memory)."""
    name, kind = session.get_inputs()[0].name, session.get_inputs()[0].type
    outs = [session.run(None, {name: onnx_feed(x[i:i + batch_size], kind)})[0]
            for i in batched(len(x), batch_size, "evaluating in onnxruntime")]
    return np.concatenate(outs, axis=0)


@torch.no_grad()
def _reference_logits(reference: nn.Module, x: Any, batch_size: int) -> np.ndarray:
    with eval_mode(reference):
        outs = [reference(model_input(torch.as_tensor(x[i:i + batch_size]))).float()
                for i in range(0, len(x), batch_size)]
    return torch.cat(outs).numpy()


def verify_onnx(path: str | os.PathLike, reference: nn.Module | None, x: Samples,
                y: torch.Tensor | None, batch_size: int | None = None, threads: int | None = None,
                parity_samples: int | None = None, reference_logits: torch.Tensor | None = None) -> dict[str, Any]:
    """Run ``path`` on ``x`` (a tensor, an array or lazy samples, read batch by batch) in
    onnxruntime and compare it with ``reference`` (a PyTorch module).

    Returns ``accuracy`` (None without labels), ``max_abs_diff``, ``max_rel_diff`` and
    ``top1_agreement`` (None without a reference), ``opset``, ``bytes`` and ``ops`` ({op_type:
    count}). ``max_rel_diff`` is the largest difference over the largest reference logit: float32
    rounding grows with the logits' scale, so a model whose logits reach 1e7 differs by whole units
    and still matches to float precision. ``batch_size``:
    samples per call, by default at most 256 and fewer for big samples. ``parity_samples``: compare
    with the reference on the first this many samples only (the accuracy still counts all): a
    wrong export differs on every input, and the reference's passes are what costs on big models.
    ``reference_logits``: ``reference``'s logits of the first samples of ``x``, computed already;
    where they cover the compared samples, ``reference`` is not run again.
    """
    from metacompress.training import eval_batch_size

    if not isinstance(x, (torch.Tensor, LazySamples)):
        x = torch.as_tensor(x)
    batch_size = eval_batch_size(x.shape[1:], most=256) if batch_size is None else batch_size
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if len(x) == 0:
        raise UserError("no samples to verify on")
    if parity_samples is not None and parity_samples < 1:
        raise UserError(f"parity samples must be at least 1, got {parity_samples}")
    session = load_session(path, threads)  # the arguments are checked before the file is opened
    check_input(session, tuple(x.shape[1:]))
    if y is not None and len(y) != len(x):
        raise UserError(f"{len(y)} labels for {len(x)} samples")
    logits = run_batched(session, x, batch_size)
    pred = logits.argmax(axis=1)
    result: dict[str, Any] = {"accuracy": None, "max_abs_diff": None, "max_rel_diff": None, "top1_agreement": None}
    if y is not None:
        result["accuracy"] = float((pred == torch.as_tensor(y).numpy()).mean())
    if reference is not None:
        n = len(x) if parity_samples is None else min(parity_samples, len(x))
        if reference_logits is not None and len(reference_logits) >= n:
            ref = reference_logits[:n].detach().float().numpy()
        else:
            ref = _reference_logits(reference, x[:n], batch_size)
        logits, pred = logits[:n], pred[:n]
        result["parity_samples"] = n
        if ref.shape != logits.shape:
            raise UserError(f"the reference gives outputs of shape {ref.shape}, the ONNX model {logits.shape}")
        result["max_abs_diff"] = float(np.abs(ref - logits).max())
        result["max_rel_diff"] = result["max_abs_diff"] / max(float(np.abs(ref).max()), float(np.finfo(np.float32).tiny))
        result["top1_agreement"] = float((ref.argmax(axis=1) == pred).mean())
    result.update(model_facts(Path(path)))
    result["samples"] = len(x)
    return result
