"""docs/cli.md, written from the Typer app's declarations (a test fails when the file is stale).

    python -m metacompress.cli.docs            # rewrite docs/cli.md
    python -m metacompress.cli.docs --check    # exit 1 if docs/cli.md differs from the commands
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

from metacompress.cli.introspect import Param, commands, params_of

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
HEADER = ("# metacompress command line\n\n"
          "Generated from the commands' declarations by `python -m metacompress.cli.docs`; do not edit.\n"
          "Recipes (`metacompress run`) take the same options as keys: the flag without dashes, `-` as `_`.\n")


def _type(p: Param) -> str:
    kind = p.base_type
    if kind is bool:
        return "flag"
    return {int: "integer", float: "number", list: "list"}.get(kind, "text")


def _default(p: Param) -> str:
    d = p.info.default
    if d is ...:
        return "required"
    if p.base_type is bool:
        on, off = p.flags
        return (on if d else off) or ("off" if not d else on)
    return "" if d is None else f"`{d}`"


def _cell(text: Any) -> str:
    return " ".join(str(text or "").split()).replace("|", "\\|")


def command_markdown(path: tuple[str, ...], info: Any) -> str:
    """One command: what it does, how to call it, a table of its arguments and options."""
    params = params_of(info.callback)
    about = info.help or inspect.getdoc(info.callback) or ""
    args = " ".join(p.name.upper() for p in params if p.is_argument)
    lines = [f"## `metacompress {' '.join(path)}`", "", _cell(about.split("\n\n")[0]), "",
             f"`metacompress {' '.join(path)} [OPTIONS]{' ' + args if args else ''}`", "",
             "| argument / option | type | default | what it does |", "|---|---|---|---|"]
    for p in params:
        name = p.name.upper() if p.is_argument else " / ".join(f"`{f}`" for f in p.flags if f)
        lines.append(f"| {name} | {_type(p)} | {_default(p)} | {_cell(p.info.help)} |")
    return "\n".join(lines) + "\n"


def markdown() -> str:
    """docs/cli.md's text, from the app as it is now."""
    from metacompress.cli.main import app

    return HEADER + "".join("\n" + command_markdown(path, info) for path, info in commands(app))


def main(argv: list[str]) -> int:
    from metacompress.io import atomic_path

    text = markdown()
    if "--check" in argv:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is stale: run python -m metacompress.cli.docs", file=sys.stderr)
            return 1
        return 0
    with atomic_path(DOC) as tmp:
        tmp.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
