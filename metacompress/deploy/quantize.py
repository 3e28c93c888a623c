"""int8 quantization of an exported ONNX model with onnxruntime's quantization tools.

Which scheme depends on the ops: dynamic quantization turns convolutions into ``ConvInteger``,
which onnxruntime runs slower than float Conv (BENCHMARKS.md, "Deployment"), so convolutional
models get static QDQ quantization (activation ranges calibrated on
the task's data, per-channel int8 weights), which onnxruntime fuses into ``QLinearConv``. Models
built only from Linear layers (MatMul/Gemm) get dynamic quantization: no calibration data needed,
activation ranges computed per batch, and MatMulInteger is fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from metacompress.data.inputs import onnx_feed
from metacompress.deploy.simplify import compact_names, strip_debug_info
from metacompress.deploy.verify import check_input, load_session, model_facts
from metacompress.errors import UserError
from metacompress.io import atomic_path, require_file

MODES = ("auto", "static", "dynamic")
CONV_OPS = frozenset({"Conv", "ConvTranspose"})
LINEAR_OPS = frozenset({"MatMul", "Gemm"})
CALIBRATION_BATCH = 32


class _ArrayReader(CalibrationDataReader):
    """Feeds calibration samples to onnxruntime's calibrator in fixed-size batches, in order."""

    def __init__(self, input_name: str, data: np.ndarray, batch_size: int = CALIBRATION_BATCH):
        self._batches: Iterator[np.ndarray] = iter(
            [data[i:i + batch_size] for i in range(0, len(data), batch_size)])
        self._name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._name: batch}


def choose_mode(ops: dict[str, int]) -> str:
    """``static`` when the model has convolutions, ``dynamic`` when its weights are only MatMul/Gemm."""
    if any(op in CONV_OPS for op in ops):
        return "static"
    if any(op in LINEAR_OPS for op in ops):
        return "dynamic"
    raise UserError("the model has no Conv, MatMul or Gemm layers: nothing to quantize")


def _calibration_array(calibration: Any, src: Path) -> np.ndarray:
    """Validate the calibration samples against the model's input and return them as its input
    type (float32, or int64 token ids)."""
    if calibration is None:
        raise UserError("static quantization needs calibration data (--data)")
    session = load_session(src, threads=1)
    data = onnx_feed(calibration, session.get_inputs()[0].type)
    if data.ndim < 1 or len(data) == 0:
        raise UserError("calibration data is empty")
    if not np.isfinite(data).all():
        raise UserError("calibration data holds NaN or infinite values")
    check_input(session, tuple(data.shape[1:]), what="calibration")
    return data


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantizer logs advice to the root logger; keep stderr clean, then restore."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, mode: str = "auto",
                  calibration: np.ndarray | None = None) -> dict[str, Any]:
    """Quantize ``src`` to int8 and write ``dst`` atomically.

    ``mode``: ``static`` (QDQ, per-channel int8 weights in a 7-bit range, uint8 activations
    calibrated with MinMax over ``calibration``, raw input samples shaped like the model's input),
    ``dynamic`` (int8 weights of MatMul/Gemm) or ``auto`` (chosen by the op mix, see
    ``choose_mode``). The graph is first run through onnxruntime's quantization pre-processing
    (shape inference + optimisation) so that every tensor has the shape information the
    quantizer needs. The 7-bit weight range
    (``reduce_range``) is what keeps a static model accurate on x86 CPUs without VNNI, where
    onnxruntime multiplies uint8 by int8 with an instruction whose 16-bit sums saturate; the file
    may run on any machine, so it is always used.
    Returns ``{"mode", "src_bytes", "bytes", "size_ratio", "calibration_samples", "ops"}``.
    """
    if mode not in MODES:
        raise UserError(f"unknown quantization mode '{mode}': use {', '.join(MODES)}")
    src = require_file(src, "ONNX model")
    facts = model_facts(src)
    load_session(src, threads=1)  # a truncated or non-ONNX file fails here with a UserError
    chosen = choose_mode(facts["ops"]) if mode == "auto" else mode
    data = _calibration_array(calibration, src) if chosen == "static" else None
    with _quiet_root_logger(), tempfile.TemporaryDirectory(prefix="mc-quant-") as work, \
            atomic_path(dst) as tmp:
        prepped = Path(work) / "prepped.onnx"
        quant_pre_process(str(src), str(prepped), skip_symbolic_shape=False)
        out = Path(work) / "quantized.onnx"
        if chosen == "static":
            input_name = onnx.load(str(prepped), load_external_data=False).graph.input[0].name
            quantize_static(
                str(prepped), str(out), _ArrayReader(input_name, data), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True,
                calibrate_method=CalibrationMethod.MinMax,
            )
        else:
            quantize_dynamic(str(prepped), str(out), op_types_to_quantize=sorted(LINEAR_OPS),
                             weight_type=QuantType.QInt8)
        onnx.save(compact_names(strip_debug_info(onnx.load(str(out)))), str(tmp))
        load_session(tmp, threads=1)  # the quantized graph must load before it replaces anything
    after = model_facts(dst)
    return {
        "mode": chosen, "src_bytes": facts["bytes"], "bytes": after["bytes"],
        "size_ratio": after["bytes"] / facts["bytes"],
        "calibration_samples": 0 if data is None else len(data), "ops": after["ops"],
    }

