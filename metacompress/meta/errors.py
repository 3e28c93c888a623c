"""The error a caller can fix (bad input: a malformed spec, an impossible setting, ...).

It lives in the meta-learning core, the lowest layer, so that the core depends on torch only;
``metacompress.errors`` re-exports it for the rest of the toolkit, whose CLI turns it into one
line on stderr and exit code 2.
"""


class UserError(ValueError):
    """Bad input (missing file, malformed spec, impossible budget, ...).

    The message must name the problem and, where possible, what to do about it. Anything
    else that escapes a command is an internal failure (exit code 1).
    """


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type name where it has none): how a
    failure from code we call reads in a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
