"""Errors the CLI turns into one line on stderr and exit code 2.

Every package raises :class:`InputError` (or a subclass) for bad input: the message names the file
(or key) and the problem in one line. Anything else escaping to the CLI is a bug and keeps its
traceback.
"""


class InputError(ValueError):
    """Bad user input: one line naming the file or key and the problem."""


class MergeInputError(InputError):
    """Bad input to a merge (adapters, recipe, base checkpoint)."""
