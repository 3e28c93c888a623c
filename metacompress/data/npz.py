"""``npz:PATH`` data: bounds checked from the archive's headers before anything is read; big
uncompressed arrays are memory-mapped and read sample by sample."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metacompress.data.datasets import (
    MAX_DATA_BYTES,
    TEST_FRACTION,
    Dataset,
    check_labels,
    check_size,
    make_dataset,
    stratified_split,
)
from metacompress.data.lazy import LazySamples, fits_in_memory
from metacompress.errors import UserError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_ONE_SET = ("x", "y")  # one set of samples and labels: the test split is carved from it here


def _npz_keys(p: Path, names: set[str]) -> tuple[str, ...]:
    """The arrays the archive is read by: the four splits, or one set ``x``, ``y``."""
    for keys in (NPZ_KEYS, NPZ_ONE_SET):
        if all(f"{k}.npy" in names for k in keys):
            return keys
    missing = [k for k in NPZ_KEYS if f"{k}.npy" not in names]
    raise UserError(f"{p} lacks array(s) {', '.join(missing)}: an .npz holds x_train, y_train, x_test and y_test, "
                    f"or x and y ({TEST_FRACTION:.0%} of them, stratified, then held out for test)")


@dataclass(frozen=True)
class _NpyMember:
    """An array inside an .npz archive, from its .npy header. ``offset``: where its values start
    in the archive file when the member is stored uncompressed in C order (it can be mapped)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int | None


def _npz_headers(p: Path) -> dict[str, _NpyMember]:
    """Each array's shape, dtype and position, read from the .npy headers inside the archive and
    checked against the bounds and the member's size before numpy allocates anything."""
    import zipfile

    out = {}
    try:
        with zipfile.ZipFile(p) as zf:
            for key in _npz_keys(p, set(zf.namelist())):
                info = zf.getinfo(f"{key}.npy")
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, fortran, dtype = read_header(f)
                    header = f.tell()
                if dtype.hasobject or dtype.kind not in "biuf":
                    raise UserError(f"{p}: {key} has dtype {dtype}; numbers are needed")
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                stored = info.compress_type == zipfile.ZIP_STORED and not fortran
                if header + nbytes != info.file_size:
                    raise UserError(f"{p}: {key} declares shape {shape} ({nbytes:,} bytes of {dtype}) but holds "
                                    f"{info.file_size - header:,} bytes")
                if nbytes > MAX_DATA_BYTES and not stored:  # a stored member is mapped, never allocated
                    raise UserError(f"{p}: compressed {key} holds {nbytes:,} bytes, over the limit of "
                                    f"{MAX_DATA_BYTES:,} for arrays read whole; save it with np.savez "
                                    "(uncompressed, C order) to have it memory-mapped")
                out[key] = _NpyMember(tuple(shape), dtype, _member_start(p, info) + header if stored else None)
    except UserError:
        raise
    except Exception as exc:  # zipfile, numpy's header parser and zlib raise several types
        raise UserError(f"cannot read {p} as .npz: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    return out


def _member_start(p: Path, info) -> int:
    """Where a zip member's bytes start: after its local header, whose name and extra field
    lengths may differ from the central directory's."""
    import struct

    with open(p, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise ValueError(f"no local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def load_npz(path: str, tokens: bool = False) -> Dataset:
    """``npz:PATH``: arrays x_train, y_train, x_test, y_test, or x and y (split here, stratified
    and seeded): flat N x F, sequences N x C x L, images NCHW or NHWC, volumes N x C x D x H x W.
    ``tokens`` (``npz:PATH:tokens``): the x arrays are N x L integer token ids, kept as int64."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file not found: {p}")
    members = _npz_headers(p)
    xkeys, ykeys = [k for k in members if k.startswith("x")], [k for k in members if k.startswith("y")]
    for key in xkeys:
        shape = members[key].shape
        if not 2 <= len(shape) <= 5:
            raise UserError(f"{p}: {key} must be N x F (flat), sequences N x C x L, images N x C x H x W / "
                            f"N x H x W x C or volumes N x C x D x H x W, got shape {shape}")
        check_size(f"{p}: {key}", shape[0], shape[1:], whole=not _mapped(members[key]))
        if tokens and (len(shape) != 2 or members[key].dtype.kind not in "iu"):
            raise UserError(f"{p}: {key} has shape {shape} and dtype {members[key].dtype}; token ids (npz:PATH:tokens) "
                            "are N x L integers")
    with _reading(p) as z:
        ys = [check_labels(f"{p}: {k}", z[k]) for k in ykeys]
        xs = [_npz_samples(p, z, key, members[key], tokens) for key in xkeys]
    if any(len(y) != len(x) for x, y in zip(xs, ys)):
        counts = ", ".join(f"{k} {len(a)}" for k, a in zip([*xkeys, *ykeys], [*xs, *ys]))
        raise UserError(f"{p}: label and sample counts differ ({counts})")
    if len(xs) == 1:
        x_tr, x_te, y_tr, y_te = stratified_split(xs[0], ys[0], TEST_FRACTION, seed=0)
        return make_dataset(f"npz:{p}", x_tr, y_tr, x_te, y_te)
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise UserError(f"{p}: x_train samples {tuple(xs[0].shape[1:])} and x_test samples {tuple(xs[1].shape[1:])} "
                        "differ")
    return make_dataset(f"npz:{p}", xs[0], ys[0], xs[1], ys[1])


@contextmanager
def _reading(p: Path) -> Iterator[Any]:
    """The archive opened by numpy; any read error inside is the one-line UserError."""
    try:
        with np.load(p, allow_pickle=False) as z:
            yield z
    except UserError:
        raise
    except Exception as exc:  # zipfile, zlib and numpy raise several types
        raise UserError(f"cannot read {p} as .npz: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None


def _sample_shape(shape: tuple[int, ...]) -> tuple[tuple[int, ...], bool]:
    """The float32 sample shape (C x H x W for images) and whether the array is N x H x W x C."""
    nhwc = len(shape) == 4 and shape[-1] in (1, 3, 4) and shape[1] not in (1, 3, 4)
    return ((shape[3], shape[1], shape[2]) if nhwc else shape[1:]), nhwc


def _mapped(member: _NpyMember) -> bool:
    """Whether the member is read through a memory map: stored uncompressed, and too big to hold."""
    return member.offset is not None and not fits_in_memory(member.shape[0], _sample_shape(member.shape)[0])


def _npz_samples(p: Path, z: Any, key: str, member: _NpyMember, tokens: bool = False):
    """``key``'s samples as float32 N x C x H x W (from NHWC too) or N x F, or (``tokens``) int64
    N x L token ids (``data.inputs``): read whole from the open
    archive ``z``, or, when the float32 copy is too big to hold and the member is stored
    uncompressed, memory-mapped and converted sample by sample. Non-finite values are refused
    either way."""
    shape = member.shape
    sample, nhwc = _sample_shape(shape)
    if _mapped(member):
        mapped = np.memmap(p, dtype=member.dtype, mode="r", offset=member.offset, shape=shape)
        for i in range(0, shape[0], 256):
            _check_values(p, key, mapped[i:i + 256], tokens)
        return LazySamples(lambda i: mapped[i].transpose(2, 0, 1) if nhwc else mapped[i], shape[0], sample,
                           dtype=np.int64 if tokens else np.float32)
    x = z[key].astype(np.int64 if tokens else np.float32)
    _check_values(p, key, x, tokens)
    return x.transpose(0, 3, 1, 2) if nhwc else x


def _check_values(p: Path, key: str, x: np.ndarray, tokens: bool) -> None:
    """Token ids must be >= 0 (an embedding looks them up); other samples finite."""
    if tokens and x.size and x.min() < 0:
        raise UserError(f"{p}: {key} holds integer sequences, read as token ids, and token ids must be >= 0; "
                        f"found {int(x.min())}")
    if not tokens and not np.isfinite(x).all():
        raise UserError(f"{p}: {key} holds NaN or infinite values")
