"""What a model's input is fed as: integer samples other than bytes are token ids (an
``nn.Embedding`` looks them up), fed as int64; everything else, uint8 images included, as float32.

The rule is the input's dtype, decided once where data enters (the user's tensors, a loader's
batches) and kept by every stage: PyTorch passes, ONNX export, onnxruntime feeds and timing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from metacompress.errors import UserError

ONNX_INT64 = "tensor(int64)"


def is_token_ids(x: torch.Tensor | np.ndarray) -> bool:
    """Whether samples of this dtype are indices: signed or wide integers (uint8 holds pixels)."""
    if isinstance(x, torch.Tensor):
        return not x.dtype.is_floating_point and not x.dtype.is_complex and x.dtype not in (torch.uint8, torch.bool)
    return bool(np.issubdtype(x.dtype, np.integer)) and x.dtype != np.uint8


def model_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the model takes it: int64 token ids, or float32."""
    return x.long() if is_token_ids(x) else x.float()


def onnx_feed(batch: Any, onnx_type: str) -> np.ndarray:
    """A batch (tensor or array) as an onnxruntime feed of the input's type."""
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().numpy()
    batch = np.asarray(batch)
    if onnx_type == ONNX_INT64 and not np.issubdtype(batch.dtype, np.integer):
        raise UserError(f"the model takes int64 token ids; the data holds {batch.dtype} values")
    return np.ascontiguousarray(batch, dtype=np.int64 if onnx_type == ONNX_INT64 else np.float32)


def timing_feed(shape: tuple[int, ...], onnx_type: str, rng: np.random.Generator) -> np.ndarray:
    """An input to time a model with: random values, or token id 0 (valid for every vocabulary;
    a static graph's time does not depend on which ids it looks up)."""
    if onnx_type == ONNX_INT64:
        return np.zeros(shape, dtype=np.int64)
    return rng.standard_normal(shape).astype(np.float32)
