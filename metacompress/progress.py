"""Progress display for long work, on stderr so that ``--json`` output on stdout stays clean."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
_console = Console(stderr=True)


def enabled() -> bool:
    """Bars show on an interactive terminal unless METACOMPRESS_PROGRESS=0."""
    return os.environ.get("METACOMPRESS_PROGRESS", "1") != "0" and _console.is_terminal


def track(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (no-op when bars are disabled)."""
    if not enabled():
        yield from iterable
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=_console, transient=True) as bar:
        yield from bar.track(iterable, total=total, description=description)


def status(message: str) -> None:
    """A one-line note on stderr about what is happening now (stage changes)."""
    if os.environ.get("METACOMPRESS_PROGRESS", "1") != "0":
        _console.print(f"[dim]{message}[/dim]", highlight=False)
