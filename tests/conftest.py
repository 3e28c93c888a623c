"""Shared fixtures: small trained teachers, cached for the whole session (seeded, so deterministic)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("METACOMPRESS_PROGRESS", "0")
# latency models built by tests go to a fresh cache, never the user's
os.environ.setdefault("METACOMPRESS_CACHE", tempfile.mkdtemp(prefix="metacompress-test-cache-"))
# the test models are tiny: one thread is faster than two, and does not thrash a busy machine
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    from metacompress.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def trained(digits):
    """Dense teachers trained once per session: {spec: model}."""
    from metacompress.pipeline import load_dense

    cache: dict = {}

    def get(spec: str, epochs: int = 30):
        if spec not in cache:
            cache[spec] = load_dense(spec, digits, None, seed=0, epochs=epochs)
        return cache[spec]

    return get


@pytest.fixture(scope="session")
def tiny_onnx():
    """Writes a valid one-MatMul ONNX model (input N x 4, output N x 3) to a path; returns its bytes."""
    import numpy as np
    from onnx import TensorProto, helper

    def write(path) -> bytes:
        w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist())
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        raw = model.SerializeToString()
        path.write_bytes(raw)
        return raw

    return write


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """A ``slow`` test is an ``integration`` test too, so that ``-m "not integration"`` (which replaces
    the default ``-m "not slow"`` of pyproject.toml) leaves it out as well."""
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.integration)
