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


_showing = [False]  # a bar is on screen: a loop inside its loop runs without one of its own


def track(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (no-op when bars are disabled, and inside another bar's loop:
    the terminal shows one live display at a time, and the outer bar already says where we are)."""
    if not enabled() or _showing[0]:
        yield from iterable
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    _showing[0] = True
    try:
        with Progress(*columns, console=_console, transient=True) as bar:
            yield from bar.track(iterable, total=total, description=description)
    finally:
        _showing[0] = False


def batched(n: int, batch_size: int, description: str, least: int = 20) -> Iterable[int]:
    """Start indices of ``batch_size`` batches over ``n`` samples, with a bar where there are at
    least ``least`` batches (a pass over a big test split takes minutes on a small CPU)."""
    starts = range(0, n, batch_size)
    return track(starts, description, total=len(starts)) if len(starts) >= least else starts


def status(message: str) -> None:
    """A one-line note on stderr about what is happening now (stage changes)."""
    if os.environ.get("METACOMPRESS_PROGRESS", "1") != "0":
        _console.print(f"[dim]{message}[/dim]", highlight=False)
