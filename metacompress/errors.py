"""Errors a user can fix: the CLI turns them into one line on stderr and exit code 2.

The class is defined in ``metacompress.meta.errors`` (the meta-learning core depends on torch
only) and is the same class everywhere.
"""

from metacompress.meta.errors import UserError, first_line

__all__ = ["UserError", "first_line"]
