"""MNIST-format idx files (plain or gzip), e.g. Fashion-MNIST as Debian's ``dataset-fashion-mnist`` installs it.

The header declares the array's shape; it is checked against a size bound and, for plain files,
against the file's length before anything is allocated, so a forged header cannot make us
reserve memory it does not back with data.
"""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np

from metacompress.errors import UserError

MAX_BYTES = 2**31  # one idx array; Fashion-MNIST's training images take 47 MB
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
# (split, array) -> accepted file-name stems, as MNIST, Fashion-MNIST and KMNIST name them
_STEMS = {
    ("train", "images"): ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    ("train", "labels"): ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    ("test", "images"): ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte", "test-images-idx3-ubyte"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte", "test-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """One idx array, shape and dtype as its header declares."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) != 4 or magic[:2] != b"\0\0" or magic[2] not in _DTYPES or not 1 <= magic[3] <= 4:
                raise UserError(f"{path}: not an idx file (bad magic number)")
            dtype, ndim = np.dtype(_DTYPES[magic[2]]), magic[3]
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            nbytes = math.prod(dims) * dtype.itemsize  # exact: numpy's int64 product wraps on forged dims
            bound = math.prod(max(d, 1) for d in dims) * dtype.itemsize  # an empty 0 x 2^32 x 2^32 too
            if bound > MAX_BYTES:
                raise UserError(f"{path}: header declares shape {dims}, {bound / 2**30:.1f} GiB of data "
                                f"(with empty axes as 1); the limit is {MAX_BYTES / 2**30:.0f} GiB")
            if opener is open and path.stat().st_size != 4 + 4 * ndim + nbytes:
                raise UserError(f"{path}: header declares shape {dims} but the file holds "
                                f"{path.stat().st_size} bytes")
            raw = f.read(nbytes + 1)
    except (OSError, EOFError, struct.error, gzip.BadGzipFile) as exc:
        raise UserError(f"cannot read {path} as an idx file: {exc}") from None
    if len(raw) != nbytes:
        raise UserError(f"{path}: header declares shape {dims} ({nbytes} bytes) but the data holds "
                        f"{len(raw)}{'+' if len(raw) > nbytes else ''} bytes")
    return np.frombuffer(raw, dtype=dtype).reshape(dims)


def _find(root: Path, split: str, array: str) -> Path:
    for stem in _STEMS[(split, array)]:
        for name in (stem, stem + ".gz"):
            if (root / name).is_file():
                return root / name
    raise UserError(f"idx:{root} lacks the {split} {array}: expected one of "
                    f"{', '.join(s + '[.gz]' for s in _STEMS[(split, array)])}")


def _images(x: np.ndarray, path: Path) -> np.ndarray:
    """N x H x W (grey) or N x H x W x C -> float32 N x C x H x W, 8-bit values scaled to [0, 1]."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        x = x.transpose(0, 3, 1, 2)
    else:
        raise UserError(f"{path}: images must be N x H x W or N x H x W x C, got shape {x.shape}")
    out = x.astype(np.float32)
    if x.dtype == np.uint8:
        out /= 255.0
    if not np.isfinite(out).all():
        raise UserError(f"{path}: images hold NaN or infinite values")
    return out


def load_idx_arrays(root: str) -> dict[str, np.ndarray]:
    """x_train, y_train, x_test, y_test from a folder of MNIST-format idx files."""
    base = Path(root)
    if not base.is_dir():
        raise UserError(f"idx data folder not found: {base}")
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        xp, yp = _find(base, split, "images"), _find(base, split, "labels")
        x, y = _images(read_idx(xp), xp), read_idx(yp)
        if y.ndim != 1 or len(y) != len(x):
            raise UserError(f"{yp}: expected {len(x)} labels (one per image in {xp.name}), got shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
            raise UserError(f"{yp}: labels must be integers 0..C-1")
        out[f"x_{split}"], out[f"y_{split}"] = x, y.astype(np.int64)
    if out["x_train"].shape[1:] != out["x_test"].shape[1:]:
        raise UserError(f"idx:{root}: train images {out['x_train'].shape[1:]} and test images "
                        f"{out['x_test'].shape[1:]} differ in shape")
    return out
