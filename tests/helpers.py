"""Helpers shared by test modules of several packages (fixtures live in conftest.py)."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys

import numpy as np

MC = [sys.executable, "-m", "metacompress.cli.main"]
ENV = {**os.environ, "METACOMPRESS_PROGRESS": "0"}


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess (the tree on PYTHONPATH), output captured as text."""
    return subprocess.run([*MC, *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


def assert_user_error(res, *fragments) -> None:
    """Exit code 2, one line on stderr holding every fragment, no traceback."""
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip() and "Warning" not in ln]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def write_idx(path, arr: np.ndarray, gz: bool = False, dims=None) -> None:
    """An MNIST-format idx file of ``arr`` (uint8 or int32); ``dims`` overrides the header's sizes."""
    code = {np.uint8: 0x08, np.int32: 0x0C}[arr.dtype.type]
    dims = arr.shape if dims is None else dims
    head = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    body = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(head + body)
