"""Shared CLI plumbing: bad input becomes one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from typer.core import TyperGroup

try:  # typer >= 0.22 vendors click: its errors are not click's own classes
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer on top of click
    from click import exceptions as click_errors

from emomerge.merging.errors import InputError

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> None:
    """Print one line to stderr and exit with code 2."""
    sys.stderr.write(f"error: {message}\n")
    raise typer.Exit(code=2)


def user_errors(fn: F) -> F:
    """Wrap a command so an :class:`InputError` (or a missing file, or a file where a folder
    belongs and the other way round) is one line + exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except FileNotFoundError as exc:
            fail(f"{exc.filename}: no such file or directory")
        except NotADirectoryError as exc:  # a file where the command needs a folder
            fail(f"{exc.filename}: a file is in the way of a folder")
        except IsADirectoryError as exc:  # a folder where the command needs a file
            fail(f"{exc.filename}: is a folder, not a file")

    return wrapper  # type: ignore[return-value]


class OneLineErrors(TyperGroup):
    """The app's group: a command line click refuses (an unknown option, a value of the wrong
    type or out of its range, a missing argument) is one line on stderr and exit code 2 too,
    instead of click's usage block. ``emomerge`` alone still prints the help."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click_errors.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click_errors.ClickException as exc:
            message = " ".join(exc.format_message().split())
            where = getattr(getattr(exc, "ctx", None), "command_path", "")
            hint = f" (see {where} --help)" if where and isinstance(exc, click_errors.UsageError) else ""
            sys.stderr.write(f"error: {message}{hint}\n")
            sys.exit(2)
        except typer.Abort:
            sys.stderr.write("Aborted!\n")
            sys.exit(1)
        # standalone_mode=False returns the exit code of a typer.Exit (our fail(): 2)
        sys.exit(rv if isinstance(rv, int) else 0)
