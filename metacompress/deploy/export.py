"""PyTorch -> ONNX export: one self-contained file with a dynamic batch axis, written atomically.

The dynamo exporter (``torch.export`` + onnxscript) is the default because it is the maintained
path and handles modern graph constructs; it takes seconds. When it fails on a model (an
unsupported op, data-dependent control flow, ...) the legacy TorchScript exporter, which takes
under a second and matches to < 1e-5 on the models we ship, is tried with a warning, so a
compression run is not lost to an exporter limitation.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from metacompress.data.inputs import model_input
from metacompress.errors import UserError
from metacompress.io import atomic_path
from metacompress.meta.modules import eval_mode

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress prints and warnings so ``--json`` stdout stays clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _example_batch(example: torch.Tensor) -> torch.Tensor:
    """A batch of at least 2: ``torch.export`` specialises a size-1 dimension to the constant 1."""
    if example.dim() == 0:
        raise UserError("the export example must have a batch dimension")
    example = model_input(example.detach())
    if example.shape[0] >= 2:
        return example[:2]
    return example[:1].expand(2, *example.shape[1:]).contiguous()


def _export_dynamo(model: nn.Module, example: torch.Tensor, tmp: Path, opset: int | None) -> None:
    batch = torch.export.Dim(BATCH_DIM, min=1, max=1 << 16)
    with _quiet():
        program = torch.onnx.export(
            model, (example,), None, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            opset_version=opset, dynamic_shapes=({0: batch},), external_data=False, verbose=False,
        )
        program.save(str(tmp), external_data=False)


def _export_legacy(model: nn.Module, example: torch.Tensor, tmp: Path, opset: int | None) -> None:
    with _quiet():
        torch.onnx.export(
            model, (example,), str(tmp), dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            opset_version=opset, do_constant_folding=True,
            dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
        )


def _self_contained(tmp: Path) -> int:
    """Check the file is one valid ONNX model with all weights inside and a batch axis of any
    size; return its opset."""
    model = onnx.load(str(tmp), load_external_data=False)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise RuntimeError(f"the exporter wrote {len(external)} tensor(s) to external data")
    onnx.checker.check_model(model)
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    if batch.HasField("dim_value"):
        raise UserError(f"the exported model only runs at batch size {batch.dim_value}: the model's forward turns "
                        "the batch size into a constant (len(x) in a view or reshape, say); write x.size(0), "
                        "x.shape[0] or x.flatten(1) instead")
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
                dynamo: bool = True, opset: int | None = None) -> dict[str, Any]:
    """Export ``model`` (in eval mode) to ``path`` as one ONNX file taking ``input`` -> ``logits``.

    The batch axis is dynamic so the same file serves batch 1 and batch 32. ``dynamo=True`` tries
    the dynamo exporter first and falls back to the legacy one with a warning; ``dynamo=False``
    uses the legacy exporter only. Returns ``{"exporter", "opset", "bytes"}``.
    """
    if not isinstance(example, torch.Tensor):
        raise UserError("the export example must be a tensor of input samples")
    batch = _example_batch(example)
    with eval_mode(model), atomic_path(path) as tmp:
        exporter = "legacy"
        if dynamo:
            try:
                _export_dynamo(model, batch, tmp, opset)
                opset_used = _self_contained(tmp)
                exporter = "dynamo"
            except UserError:  # a fixed batch size: the legacy exporter would bake it in without a trace
                raise
            except Exception as exc:  # any exporter failure: fall back rather than lose the run
                reason = " ".join(str(exc).split())[:200] or type(exc).__name__
                warnings.warn(f"dynamo ONNX export failed ({type(exc).__name__}: {reason}); "
                              "falling back to the legacy exporter", RuntimeWarning, stacklevel=2)
        if exporter == "legacy":
            _export_legacy(model, batch, tmp, opset)
            opset_used = _self_contained(tmp)
        size = tmp.stat().st_size
    return {"exporter": exporter, "opset": int(opset_used), "bytes": int(size)}
