"""``npz:PATH`` data: bounds checked from the archive's headers before anything is read; big
uncompressed arrays are memory-mapped and read sample by sample."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metacompress.data.datasets import MAX_DATA_BYTES, Dataset, check_labels, check_size, make_dataset
from metacompress.data.lazy import LazySamples, fits_in_memory
from metacompress.errors import UserError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


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
            names = set(zf.namelist())
            missing = [k for k in NPZ_KEYS if f"{k}.npy" not in names]
            if missing:
                raise UserError(f"{p} lacks array(s) {', '.join(missing)}")
            for key in NPZ_KEYS:
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


def load_npz(path: str) -> Dataset:
    """``npz:PATH``: arrays x_train, y_train, x_test, y_test: flat N x F, sequences N x C x L,
    images NCHW or NHWC, volumes N x C x D x H x W."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file not found: {p}")
    members = _npz_headers(p)
    for key in ("x_train", "x_test"):
        shape = members[key].shape
        if not 2 <= len(shape) <= 5:
            raise UserError(f"{p}: {key} must be N x F (flat), sequences N x C x L, images N x C x H x W / "
                            f"N x H x W x C or volumes N x C x D x H x W, got shape {shape}")
        check_size(f"{p}: {key}", shape[0], shape[1:], whole=not _mapped(members[key]))
    with _reading(p) as z:
        ys = {k: z[k] for k in ("y_train", "y_test")}
        xs = [_npz_samples(p, z, key, members[key]) for key in ("x_train", "x_test")]
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise UserError(f"{p}: x_train samples {tuple(xs[0].shape[1:])} and x_test samples {tuple(xs[1].shape[1:])} "
                        "differ")
    y_tr, y_te = check_labels(f"{p}: y_train", ys["y_train"]), check_labels(f"{p}: y_test", ys["y_test"])
    if len(y_tr) != len(xs[0]) or len(y_te) != len(xs[1]):
        raise UserError(f"{p}: label and sample counts differ (x_train {len(xs[0])}, y_train {len(y_tr)}, "
                        f"x_test {len(xs[1])}, y_test {len(y_te)})")
    return make_dataset(f"npz:{p}", xs[0], y_tr, xs[1], y_te)


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


def _npz_samples(p: Path, z: Any, key: str, member: _NpyMember):
    """``key``'s samples as float32 N x C x H x W (from NHWC too) or N x F: read whole from the open
    archive ``z``, or, when the float32 copy is too big to hold and the member is stored
    uncompressed, memory-mapped and converted sample by sample. Non-finite values are refused
    either way."""
    shape = member.shape
    sample, nhwc = _sample_shape(shape)
    if _mapped(member):
        mapped = np.memmap(p, dtype=member.dtype, mode="r", offset=member.offset, shape=shape)
        for i in range(0, shape[0], 256):
            if not np.isfinite(mapped[i:i + 256]).all():
                raise UserError(f"{p}: {key} holds NaN or infinite values")
        return LazySamples(lambda i: mapped[i].transpose(2, 0, 1) if nhwc else mapped[i], shape[0], sample)
    x = z[key].astype(np.float32)
    if not np.isfinite(x).all():
        raise UserError(f"{p}: data holds NaN or infinite values")
    return x.transpose(0, 3, 1, 2) if nhwc else x
