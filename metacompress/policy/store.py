"""Policy files: weights as safetensors, everything else as JSON; nothing is unpickled.

A policy is a folder (or a ``.safetensors`` path with a ``.json`` beside it) holding the flat
weight vector, the format version, the default repair settings it was trained with, and its
provenance (tasks, iterations, reward curve).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from metacompress.compress.distill import RepairConfig
from metacompress.compress.groups import KINDS
from metacompress.errors import UserError
from metacompress.io import atomic_path, write_json
from metacompress.policy.features import FEATURE_NAMES
from metacompress.policy.network import HIDDEN, Shapes
from metacompress.signals import signals_deferred

VERSION = 3  # 2: expert-rule mixture weights; 3: the sensitivity expert
DEFAULT_DIR = Path(__file__).parent / "default"


@dataclass
class Policy:
    theta: np.ndarray = field(repr=False)
    defaults: RepairConfig = field(default_factory=RepairConfig)
    provenance: dict[str, Any] = field(default_factory=dict, repr=False)
    kinds_seen: tuple[str, ...] | None = None  # group kinds met in meta-training (None: all of them)

    def allocate(self, model: nn.Module, calib: tuple[torch.Tensor, torch.Tensor], target: float,
                 round_to: int = 1) -> dict[str, int]:
        """Kept units per prunable group of ``model`` for ``target`` kept MACs, from a
        calibration batch ``(x, y)`` (about 128 samples); the model is not modified. The groups
        are those ``compress`` prunes (and names in its report's ``kept``): attention blocks are
        converted first, on a copy.

        >>> load_policy().allocate(model, (x[:128], y[:128]), 0.5)
        {'layer1.0.conv1': 32, ...}
        """
        import copy

        from metacompress.budget import MACs, resolve_budget
        from metacompress.compress.attention import split_self_attention
        from metacompress.compress.prune import PruningSpace
        from metacompress.policy.allocate import policy_allocation

        x, y = calib
        model = copy.deepcopy(model).eval()
        split_self_attention(model, x[:1])
        with torch.no_grad():
            classes = int(model(x[:1]).shape[1])
        space = PruningSpace(model, x[:1], classes, round_to)
        keep, _ = policy_allocation(self, model, space, (x, y), resolve_budget(MACs(target), model, space, x.shape[1:]),
                                    self.defaults)
        return {g.name: k for g, k in zip(space.groups, keep)}


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix == ".safetensors":
        return p, p.with_suffix(".json")
    return p / "policy.safetensors", p / "policy.json"


def save_policy(policy: Policy, path: str | Path) -> None:
    weights, meta = _paths(path)
    with signals_deferred():  # both files or neither: new weights beside an old policy.json would load
        _write_policy(policy, weights, meta)


def _write_policy(policy: Policy, weights: Path, meta: Path) -> None:
    with atomic_path(weights) as tmp:
        save_file({"theta": torch.as_tensor(policy.theta, dtype=torch.float64)}, str(tmp))
    write_json(meta, {
        "format": "metacompress.policy", "version": VERSION, "parameters": int(policy.theta.size),
        "hidden": HIDDEN, "features": list(FEATURE_NAMES),
        "repair_defaults": policy.defaults.to_dict(),
        "kinds_seen": list(policy.kinds_seen) if policy.kinds_seen is not None else None,
        "provenance": policy.provenance,
    })


def load_policy(path: str | Path | None = None) -> Policy:
    """Load a policy (the shipped default when ``path`` is None); UserError if it does not fit."""
    weights, meta_path = _paths(path or DEFAULT_DIR)
    if not weights.is_file() or not meta_path.is_file():
        raise UserError(f"policy not found: need {weights} and {meta_path}")
    try:
        meta = json.loads(meta_path.read_text())
        theta = load_file(str(weights))["theta"].double().numpy()
    except Exception as exc:
        raise UserError(f"cannot read policy {weights}: {type(exc).__name__}: {exc}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: not a metacompress policy (a JSON object is expected)")
    if meta.get("format") != "metacompress.policy" or meta.get("version") != VERSION:
        raise UserError(f"{meta_path}: policy format/version {meta.get('format')}/{meta.get('version')} is not "
                        f"supported (this metacompress reads version {VERSION})")
    if theta.shape != (Shapes.size(),) or meta.get("features") != list(FEATURE_NAMES):
        raise UserError(f"{weights}: policy has {theta.size} weights for features {meta.get('features')}; "
                        f"this version expects {Shapes.size()} weights and features {list(FEATURE_NAMES)}")
    defaults = _repair_defaults(meta.get("repair_defaults", {}), meta_path)
    kinds = meta.get("kinds_seen")
    if kinds is not None and (not isinstance(kinds, list) or not set(kinds) <= set(KINDS)):
        raise UserError(f"{meta_path}: kinds_seen must be a list drawn from {', '.join(KINDS)}, got {kinds!r}")
    return Policy(theta, defaults, meta.get("provenance", {}), tuple(kinds) if kinds is not None else None)


def _repair_defaults(given: Any, meta_path: Path) -> RepairConfig:
    """The policy's repair settings, checked like a user's (a hand-edited file fails here, not mid-run)."""
    fields = RepairConfig.__dataclass_fields__
    if not isinstance(given, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for k, v in given.items() if k in fields and v is not None):
        raise UserError(f"{meta_path}: repair_defaults must map {', '.join(fields)} to numbers")
    try:
        return RepairConfig(**{k: v for k, v in given.items() if k in fields}).validate()
    except UserError as exc:
        raise UserError(f"{meta_path}: repair_defaults: {exc}") from None
