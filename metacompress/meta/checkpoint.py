"""Run-state checkpoints: everything a training loop needs to continue as if never stopped.

A run state is a dict of tensors, numbers and strings (loads with ``weights_only=True``) that
the loop fills in (weights, optimiser or ES state, random generator states, history, iteration)
plus a *fingerprint* of the settings that shape the trajectory. Resuming under other settings
would silently mix two runs, so a state whose fingerprint differs is refused
(``CheckpointMismatch``). Settings that do not change the trajectory (the number of iterations,
the world size, output paths) stay out of the fingerprint: a run can be extended, or continued
on more or fewer ranks.

Only rank 0 reads and writes: it broadcasts what it read (or the refusal) so that every rank
continues from the same state or stops with the same error, and checkpoints need no shared disk.
Writes are atomic (a temporary file beside the target, then ``os.replace``): a run killed while
saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from metacompress.meta import distributed
from metacompress.meta.errors import first_line


class CheckpointMismatch(ValueError):
    """A checkpoint exists but was written by a run with different settings (or is unreadable)."""


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A short stable hash of the settings (JSON with sorted keys)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save(state: dict[str, Any], path: str | os.PathLike, fp: str) -> None:
    """Write ``state`` (with its fingerprint) atomically; only rank 0 writes, the others return."""
    if not distributed.is_main():
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        torch.save({**state, "fingerprint": fp}, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read(path: Path, fp: str, legacy_ok: bool) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        first = first_line(exc)
        raise CheckpointMismatch(f"cannot read checkpoint {path}: {first}") from None
    if not isinstance(state, dict):
        raise CheckpointMismatch(f"{path} is not a run-state checkpoint")
    found = state.get("fingerprint")
    if found != fp and not (found is None and legacy_ok):
        raise CheckpointMismatch(f"checkpoint {path} was written by a run with other settings (fingerprint "
                                 f"{found} != {fp}): resume with the same settings, or remove it to start over")
    return state


def load(path: str | os.PathLike, fp: str, legacy_ok: bool = False) -> dict[str, Any] | None:
    """The run state at ``path`` (``None`` if there is none), read by rank 0 and sent to every rank.

    Raises ``CheckpointMismatch`` on every rank when the fingerprint differs from ``fp``
    (``legacy_ok``: also accept a state written before fingerprints existed).
    """
    payload: list[Any] = [None]
    if distributed.is_main():
        p = Path(path)
        try:
            payload[0] = ("ok", _read(p, fp, legacy_ok) if p.is_file() else None)
        except CheckpointMismatch as exc:
            payload[0] = ("error", str(exc))
    if distributed.active():
        distributed.collective("checkpoint broadcast", lambda: dist.broadcast_object_list(payload, src=0))
    status, value = payload[0]
    if status == "error":
        raise CheckpointMismatch(value)
    return value
