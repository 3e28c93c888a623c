"""File I/O with the toolkit's guarantees: atomic writes and no unpickling by default."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from metacompress.errors import UserError, first_line

MAX_CHECKPOINT_BYTES = 2**34  # 16 GiB unpacked: far above any model this toolkit compresses on a CPU


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A failed run therefore never leaves a half-written output file behind.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600: give the usual file mode
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically. Saved through a file object, so that the archive's inner folder
    is always ``archive`` and not the random temporary name: the same weights give the same bytes."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return ``path`` as a Path, or raise a UserError naming the missing file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    return p


def load_weights(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """Load a checkpoint without unpickling code (``weights_only=True``) unless trusted.

    Only tensors, containers and primitive values can be read by default; a pickled whole
    module needs ``trust_pickle=True`` (the CLI's ``--trust-pickle``). A zip checkpoint whose
    entries unpack to more than ``MAX_CHECKPOINT_BYTES`` is refused before it is read.
    """
    p = require_file(path, "weights file")
    _check_archive(p)
    try:
        return torch.load(p, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        blocked = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln), None)
        if blocked is None or trust_pickle:  # not a refused object: a corrupt file
            raise UserError(f"cannot load weights from {p} (not a PyTorch checkpoint?): {_unpickler_reason(exc)}") from None
        raise UserError(f"refusing to unpickle {p}: it holds objects other than tensors ({blocked}); loading it "
                        "can run code: pass --trust-pickle only if you trust where it came from") from None
    except Exception as exc:  # torch raises several types for corrupt files
        raise UserError(f"cannot load weights from {p} (not a PyTorch checkpoint?): {first_line(exc)}") from None


def state_dict_from(obj: Any, what: str) -> dict[str, torch.Tensor]:
    """The state dict in a loaded checkpoint (plain, ``{"state_dict": ...}``, or a trusted whole
    module), refused unless it maps names to tensors with finite floating-point values."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{what} is not a state dict (a mapping of names to tensors)")
    bad = [str(k) for k, v in obj.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{what} holds NaN or infinite values in: {', '.join(bad[:5])}")
    return obj


def _unpickler_reason(exc: BaseException) -> str:
    """What stopped the weights-only unpickler, without torch's advice to retry with
    ``weights_only=False``: wrong for a corrupt file, and unsafe for an untrusted one."""
    text = str(exc)
    if "WeightsUnpickler error:" not in text:
        return first_line(exc)
    reason = next((ln.strip() for ln in text.split("WeightsUnpickler error:", 1)[1].splitlines() if ln.strip()), "")
    return reason or "the unpickler stopped"


def _check_archive(p: Path) -> None:
    """Refuse a zip checkpoint (torch's format) that declares more unpacked bytes than the bound."""
    if not zipfile.is_zipfile(p):
        return
    try:
        with zipfile.ZipFile(p) as zf:
            unpacked = sum(info.file_size for info in zf.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserError(f"cannot load weights from {p}: corrupt archive: {first_line(exc)}") from None
    if unpacked > MAX_CHECKPOINT_BYTES:
        raise UserError(f"{p} unpacks to {unpacked / 2**30:.1f} GiB; the limit is {MAX_CHECKPOINT_BYTES / 2**30:.0f} GiB")


def refuse_output_over_inputs(out: str | os.PathLike, inputs: list[str | os.PathLike], flag: str = "--out") -> None:
    """Refuse an output path that is, or would hold, one of the run's inputs (or lies inside an
    input folder): publishing there could overwrite or mix with what the run reads. Also refuse
    an output folder that exists as a file. Checked before any work is done."""
    target = Path(out).resolve()
    for given in inputs:
        src = Path(given).resolve()
        if src == target or target in src.parents or (src.is_dir() and src in target.parents):
            raise UserError(f"{flag} {out} holds or lies inside the input {given}: choose another output path")
