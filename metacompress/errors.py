"""Errors a user can fix: the CLI turns them into one line on stderr and exit code 2."""


class UserError(ValueError):
    """Bad input (missing file, malformed spec, impossible budget, ...).

    The message must name the problem and, where possible, what to do about it. Anything
    else that escapes a command is an internal failure (exit code 1).
    """
