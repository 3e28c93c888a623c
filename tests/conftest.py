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
