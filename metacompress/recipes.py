"""YAML recipes with ``key=value`` overrides (torchtune style): plain, readable pipelines.

A recipe is read with the line of every key kept (``Recipe.line``), so that a schema error can
say where the bad value is; dotted overrides (``repair_steps=20``, ``steps.1.epochs=2``,
``vars.out=out/x``) replace values after reading and are remembered, so that an error in an
overridden value names the override instead of a line. ``${name}`` in a value is replaced by
``vars.name`` (the whole value keeps its type; inside a longer string it is spliced in).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metacompress.errors import UserError

VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
Key = tuple  # a path into the document: ('steps', 0, 'epochs')
MAX_VALUES = 100_000  # values in a recipe once YAML aliases are expanded: a 2 KB alias bomb expands to 10^8


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (['a', 'b'], 3); the value is read as YAML (numbers, lists, booleans)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or any(not k for k in key.strip().split(".")):
        raise UserError(f"malformed override '{text}': use key=value, e.g. iterations=10")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


@dataclass
class Recipe:
    """A recipe document with where each key came from: a line of the file or an override."""

    path: Path
    data: dict[str, Any]
    lines: dict[Key, int] = field(default_factory=dict)        # 1-based line of each key
    overridden: dict[Key, str] = field(default_factory=dict)   # key -> the override that set it

    def where(self, key: Key) -> str:
        """' (line N)' or ' (override k=v)' for the key or its closest enclosing key."""
        for n in range(len(key), 0, -1):
            sub = tuple(key[:n])
            if sub in self.overridden:
                return f" (override {self.overridden[sub]})"
            if sub in self.lines:
                return f" (line {self.lines[sub]})"
        return ""


def _expanded_size(node: yaml.Node) -> int:
    """Values under ``node`` with every alias expanded, counted up to just past ``MAX_VALUES``."""
    count, stack = 0, [node]
    while stack and count <= MAX_VALUES:
        node = stack.pop()
        count += 1
        if isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in node.value for n in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return count


def _key_lines(node: yaml.Node, prefix: Key, out: dict[Key, int], seen: set[int]) -> None:
    """Record the line of every mapping key and sequence item under ``node``; refuse duplicate keys."""
    if id(node) in seen:  # an alias met again: a recursive document
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                raise UserError(f"line {k.start_mark.line + 1}: keys must be plain names")
            key = (*prefix, k.value)
            if key in out:
                raise UserError(f"key '{'.'.join(map(str, key))}' appears twice (lines {out[key]} and "
                                f"{k.start_mark.line + 1})")
            out[key] = k.start_mark.line + 1
            _key_lines(v, key, out, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[(*prefix, i)] = v.start_mark.line + 1
            _key_lines(v, (*prefix, i), out, seen)


def read_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML mapping, its key lines, apply overrides and ``${var}`` substitution; UserError
    naming the file and the line on any problem."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe not found: {p}")
    try:
        text = p.read_text()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise UserError(f"recipe {p} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())[:200]
        raise UserError(f"malformed recipe {p}{where}: {problem}") from None
    except RecursionError:
        raise UserError(f"malformed recipe {p}: nested too deeply") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {p} must be a mapping of key: value, got {type(data).__name__}")
    if _expanded_size(node) > MAX_VALUES:  # before anything walks the document value by value
        raise UserError(f"recipe {p} expands to more than {MAX_VALUES:,} values (YAML aliases of aliases?)")
    lines: dict[Key, int] = {}
    try:
        _key_lines(node, (), lines, set())
    except UserError as exc:
        raise UserError(f"recipe {p}: {exc}") from None
    recipe = Recipe(p, data, lines)
    for text in overrides or []:
        _override(recipe, text)
    _substitute(recipe)
    return recipe


def _override(recipe: Recipe, text: str) -> None:
    keys, value = parse_override(text)
    node: Any = recipe.data
    path: list[Any] = []
    for k in keys[:-1]:
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise UserError(f"override '{text}': '{'.'.join([*map(str, path), k])}' is not an item of the list "
                                f"(0..{len(node) - 1})")
            node, k = node[int(k)], int(k)
        else:
            node = node.setdefault(k, {})
        path.append(k)
        if not isinstance(node, (dict, list)):
            raise UserError(f"override '{text}': '{'.'.join(map(str, path))}' is not a section of the recipe")
    last: Any = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise UserError(f"override '{text}': no item {last} in '{'.'.join(map(str, path))}'")
        last = int(last)
    node[last] = value
    recipe.overridden[(*path, last)] = text


def _substitute(recipe: Recipe) -> None:
    """Replace ``${name}`` by ``vars.name`` everywhere but in ``vars`` itself."""
    variables = recipe.data.get("vars", {})
    if not isinstance(variables, dict):
        raise UserError(f"recipe {recipe.path}: 'vars' must be a mapping of name: value{recipe.where(('vars',))}")

    def sub(value: Any, key: Key) -> Any:
        if isinstance(value, dict):
            return {k: sub(v, (*key, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [sub(v, (*key, i)) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        for name in VAR.findall(value):
            if name not in variables:
                raise UserError(f"recipe {recipe.path}: '{'.'.join(map(str, key))}' uses ${{{name}}} but vars has no "
                                f"'{name}' (vars: {', '.join(map(str, variables)) or 'none'}){recipe.where(key)}")
        whole = VAR.fullmatch(value)
        return variables[whole.group(1)] if whole else VAR.sub(lambda m: str(variables[m.group(1)]), value)

    recipe.data = {k: (v if k == "vars" else sub(v, (k,))) for k, v in recipe.data.items()}


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML mapping and apply overrides (commands that read a recipe of their own: policy
    train/eval, fuse). Its ``pipeline`` key is for ``metacompress run`` and is left out here."""
    data = read_recipe(path, overrides).data
    data.pop("pipeline", None)
    data.pop("vars", None)
    return data
