"""The shared Typer app and the conventions every command follows.

- bad input (``UserError``): one line on stderr, exit code 2, no traceback;
- anything else: one line on stderr, exit code 1 (``METACOMPRESS_DEBUG=1`` shows the traceback);
- SIGINT / SIGTERM: the clean-up runs (no staged output is left), one line, exit code 128 + signal;
- ``--json``: the result as one JSON object on stdout, nothing else on stdout.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, Callable

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from metacompress.errors import UserError
from metacompress.signals import Interrupted, signals_raise

app = typer.Typer(
    name="metacompress",
    help="Compress PyTorch networks with a meta-learned pruning + distillation policy; export verified ONNX.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
def _no_flag_types() -> None:
    """``--help`` lists a flag without a value type: typer's rich help shows ``<bool>`` beside
    every flag (--json, --guard/--no-guard, --help), which reads as if the flag took a value."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag or self.count else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_no_flag_types()
console = Console()
err_console = Console(stderr=True)

@app.callback()
def _options(quiet: bool = typer.Option(False, "--quiet", "-q",
                                        help="No progress bars or stage notes on stderr (errors and warnings in the "
                                             "report still show).")) -> None:
    """Options for every command: ``metacompress --quiet COMMAND ...``."""
    if quiet:
        os.environ["METACOMPRESS_PROGRESS"] = "0"  # read by metacompress.progress, here and in worker processes


JSON_OPTION = typer.Option(False, "--json", help="Print the result as one JSON object on stdout.")
MAX_SEED = 2**32 - 1  # numpy and sklearn take seeds below 2**32
SEED_OPTION = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Random seed: the same seed gives the same result.")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.split()) if text else type(exc).__name__


def command(name: str, target: typer.Typer | None = None, **kwargs: Any) -> Callable:
    """Register a function as a CLI command (on ``app`` or a sub-app) with the toolkit's
    error and exit-code contract."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kw: Any) -> Any:
            try:
                with signals_raise():
                    return fn(*args, **kw)
            except UserError as exc:
                err_console.print(f"error: {_one_line(exc)}", highlight=False, markup=False, soft_wrap=True)
                raise typer.Exit(2) from None
            except (typer.Exit, typer.Abort):
                raise
            except KeyboardInterrupt as exc:
                stopped = exc if isinstance(exc, Interrupted) else Interrupted(2)
                err_console.print(f"error: {stopped} (nothing half-written is left)", highlight=False, markup=False)
                raise typer.Exit(stopped.exit_code) from None
            except Exception as exc:
                if os.environ.get("METACOMPRESS_DEBUG"):
                    raise
                err_console.print(f"internal error: {type(exc).__name__}: {_one_line(exc)} "
                                  "(set METACOMPRESS_DEBUG=1 for the traceback)",
                                  highlight=False, markup=False, soft_wrap=True)
                raise typer.Exit(1) from None

        return (target or app).command(name, **kwargs)(wrapper)

    return decorate


def table(*columns: str, title: str | None = None) -> Table:
    """Every command's tables in one style: a left-aligned title, bold header, light rules."""
    return Table(*columns, title=title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD)


def emit(result: dict, as_json: bool, render: Callable[[dict], None]) -> None:
    """Print ``result`` as JSON on stdout, or let ``render`` print it for people."""
    if as_json:
        sys.stdout.write(json.dumps(result, default=_json_default) + "\n")
        sys.stdout.flush()
    else:
        render(result)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
