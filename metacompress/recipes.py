"""YAML recipes with ``key=value`` overrides (torchtune style): plain, readable pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from metacompress.errors import UserError


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (['a', 'b'], 3); the value is read as YAML (numbers, lists, booleans)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"malformed override '{text}': use key=value, e.g. iterations=10")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML mapping and apply overrides; UserError naming the file on any problem."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"malformed recipe {p}: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {p} must be a mapping of option: value")
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{text}': '{k}' is not a section of the recipe")
        node[keys[-1]] = value
    return data
