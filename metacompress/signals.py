"""Interrupted runs: SIGINT and SIGTERM raise ``Interrupted`` so that every ``finally`` runs.

Python's default for SIGTERM is to die on the spot, which skips the clean-up that removes a
staged output folder; its default for SIGINT raises ``KeyboardInterrupt`` only once. While a
command runs, both raise ``Interrupted`` instead, and later signals are ignored so that the
clean-up itself is not cut short. Publishing outputs (a few renames) defers signals until it is
done, so an output folder is never left holding some outputs of a run and not others.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; ``exit_code`` is the shell's convention, 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_deferred: list[int] = []  # signals that arrived while publishing (see signals_deferred)
_deferring = False


def _raise_interrupted(signum: int, frame: object) -> None:
    for sig in SIGNALS:  # a second signal must not cut the clean-up short
        signal.signal(sig, signal.SIG_IGN)
    if _deferring:
        _deferred.append(signum)
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM raise ``Interrupted`` (main thread only: signal
    handlers cannot be set elsewhere); the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def pool_worker_signals() -> None:
    """In a forked pool worker: die on SIGTERM (``Pool.terminate`` on a finished pool sends it,
    and an inherited ``Interrupted`` would print a traceback for a run that succeeded) and
    leave SIGINT to the parent, which stops the pool."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold ``Interrupted`` back while the block runs (a handful of renames): a signal that
    arrives meanwhile raises right after it, so the block is never left half done."""
    global _deferring
    outer, _deferring = _deferring, True
    try:
        yield
    finally:
        _deferring = outer
        if not outer and _deferred:
            signum = _deferred[-1]
            _deferred.clear()
            raise Interrupted(signum)
