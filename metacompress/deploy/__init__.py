"""Deployment: ONNX export, onnxruntime verification and benchmarks, int8 quantization, simplification.

The compress pipeline exports with ``export_onnx`` and checks the file with ``verify_onnx``; the
``verify``, ``bench`` and ``quantize`` commands expose the same functions to users.
"""

from metacompress.deploy.export import export_onnx
from metacompress.deploy.verify import load_session, model_facts, verify_onnx

__all__ = ["export_onnx", "load_session", "model_facts", "verify_onnx"]
