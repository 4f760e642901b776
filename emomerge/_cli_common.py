"""Shared CLI plumbing: bad input becomes one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from emomerge.merging.errors import InputError

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> None:
    """Print one line to stderr and exit with code 2."""
    sys.stderr.write(f"error: {message}\n")
    raise typer.Exit(code=2)


def user_errors(fn: F) -> F:
    """Wrap a command so an :class:`InputError` (or a missing file) is one line + exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except FileNotFoundError as exc:
            fail(f"{exc.filename}: no such file or directory")

    return wrapper  # type: ignore[return-value]
