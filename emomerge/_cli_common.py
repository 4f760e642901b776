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


#: ``--quiet`` of the commands that show the progress display (train, merge, evaluate, run, demo).
Quiet = typer.Option(
    False,
    "--quiet",
    "-q",
    help="No progress display (shown by default only when stderr is a terminal).",
)


def show_progress(progress: bool | None = None, quiet: bool = False) -> bool:
    """Whether the command draws its progress display (:mod:`emomerge.merging.progress`): off
    with ``--quiet`` or ``--no-progress``, else on when stderr is a terminal."""
    from emomerge.merging.progress import wanted

    return wanted(progress, quiet)


#: What ``--format`` accepts on the table commands: ``table`` is rich's terminal table.
TABLE_FORMATS = ("table", "markdown", "csv", "json")


def render_table(
    title: str,
    header: list[str],
    body: list[list[str]],
    fmt: str = "table",
    *,
    keep: tuple[str, ...] = (),
    lines: bool = False,
) -> None:
    """Print a table: in the terminal (``table``) cells wrap instead of ending in an ellipsis and
    the ``keep`` columns (links) are never broken; ``markdown``, ``csv`` and ``json`` as
    ``leaderboard show`` writes them (title first for markdown)."""
    from emomerge.evaluation.leaderboard import format_table

    if fmt not in TABLE_FORMATS:
        raise InputError(f"--format: expected one of {', '.join(TABLE_FORMATS)}, got '{fmt}'")
    if fmt != "table":
        text = format_table(header, body, fmt)
        typer.echo((f"**{title}**\n\n" if fmt == "markdown" and title else "") + text, nl=False)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=lines)
    for i, col in enumerate(header):
        width = max([len(line) for row in body for line in row[i].splitlines()] + [len(col)])
        # a link cut or folded in two is no link, and a short cell (a number, a name) broken
        # mid-word is unreadable: both keep their whole width; long text wraps at spaces
        if col in keep or width <= 12:
            table.add_column(col, no_wrap=True, overflow="ignore", min_width=width)
        else:
            table.add_column(col, overflow="fold")
    for row in body:
        table.add_row(*row)
    Console(soft_wrap=False).print(table)


#: Libraries whose warnings are theirs to fix, not the user's: silenced unless ``--verbose``.
THIRD_PARTY = (
    r"(transformers|torch|torchvision|peft|accelerate|huggingface_hub|safetensors|"
    r"numba|matplotlib|bitsandbytes)(\.|$)"
)


def quiet_third_party() -> None:
    """Keep other libraries' deprecation warnings, log lines and progress bars (transformers'
    "Loading weights" / "Writing model shards") out of our commands' output; ``--verbose`` skips
    this. Environment variables reach libraries not imported yet (the CLI imports them lazily);
    the calls cover those already imported. Our own warnings and progress are untouched."""
    import os
    import warnings

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # hub downloads and transformers' bars
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY)
    # FutureWarnings raised from inside transformers' wrappers are attributed to the caller
    warnings.filterwarnings(
        "ignore", message=r".*(deprecated|will be removed).*", category=FutureWarning
    )
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def check_dataset(name: str, flag: str = "--dataset") -> None:  # flag "": an argument
    """Refuse an unknown dataset name by name, with the closest known one."""
    import difflib

    from emomerge.training.data import DATASETS

    if name not in DATASETS:
        close = difflib.get_close_matches(name.lower(), sorted(DATASETS), n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise InputError(
            f"{flag}{': ' if flag else ''}unknown dataset '{name}' ({hint}expected one of "
            f"{', '.join(sorted(DATASETS))})"
        )


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; ``cpu``, ``cuda[:N]`` and ``mps``
    as given; anything else refused."""
    import re

    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise InputError(f"--device: expected auto, cpu, cuda, cuda:N or mps, got '{device}'")
    return device


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
            hint = (
                f" (see {where} --help)"
                if where and isinstance(exc, click_errors.UsageError)
                else ""
            )
            sys.stderr.write(f"error: {message}{hint}\n")
            sys.exit(2)
        except typer.Abort:
            sys.stderr.write("Aborted!\n")
            sys.exit(1)
        # standalone_mode=False returns the exit code of a typer.Exit (our fail(): 2)
        sys.exit(rv if isinstance(rv, int) else 0)
