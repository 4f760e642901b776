"""One progress display for train, merge and evaluate: rich, on stderr, one bar per phase.

    with display(enabled):                       # the command's whole run (optional)
        with phase("score ties on emoart/test", total=len(todo), enabled=progress) as bar:
            bar.advance(len(batch))

A phase is one bar labelled with what runs ("train emoart", "merge ties", "score ties on
emocomics35/test"), its done/total, its rate (examples/s, steps/s, modules/s) and its ETA; the
bar goes away when the phase ends, so a long run does not fill the terminal. Phases opened
while a display is active join it (one live display for ``emomerge run``); a phase opened alone
starts its own for its duration. Nothing is drawn when stderr is not a terminal (piped, CI
logs), unless ``EMOMERGE_PROGRESS=1`` forces it; ``EMOMERGE_PROGRESS=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

#: "1" draws the display even when stderr is not a terminal, "0" never draws it.
ENV = "EMOMERGE_PROGRESS"


def wanted(progress: bool | None = None, quiet: bool = False) -> bool:
    """Whether a command shows its display: never with ``quiet`` or ``progress`` False (or
    ``EMOMERGE_PROGRESS=0``); otherwise when stderr is a terminal (or ``EMOMERGE_PROGRESS=1``)."""
    forced = os.environ.get(ENV)
    if quiet or progress is False or forced == "0":
        return False
    return forced == "1" or sys.stderr.isatty()


def _console() -> Console:
    # stderr: a command's stdout (tables, paths) stays clean when piped
    return Console(stderr=True, force_terminal=True if os.environ.get(ENV) == "1" else None)


class RateColumn(ProgressColumn):
    """Units per second: rich's windowed speed while it has two samples, else the phase's
    mean (a phase of one batch still shows its rate)."""

    def render(self, task: Task) -> Text:
        rate = task.speed
        if rate is None and task.completed and task.elapsed:
            rate = task.completed / task.elapsed
        unit = task.fields.get("unit", "it")
        return Text(f"{rate:.2f} {unit}/s" if rate else f"? {unit}/s", style="progress.data.speed")


class Bar:
    """One phase's bar; a disabled phase gets one that does nothing."""

    def __init__(self, progress: Progress | None = None, task: TaskID | None = None) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def info(self, text: str) -> None:
        """Text after the ETA: the current module, the last loss."""
        if self._progress is not None:
            self._progress.update(self._task, info=text)


_active: list[Progress] = []  # the display phases join (a stack: one per display())


def _new_progress(console: Console) -> Progress:
    # one line per bar on an 80-column terminal: a short bar, the info text cut, not wrapped
    return Progress(
        TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
        BarColumn(bar_width=16),
        MofNCompleteColumn(),
        RateColumn(table_column=Column(no_wrap=True)),
        TextColumn("ETA"),
        TimeRemainingColumn(elapsed_when_finished=True),
        TextColumn(
            "{task.fields[info]}",
            table_column=Column(no_wrap=True, overflow="ellipsis", max_width=30),
        ),
        console=console,
        transient=True,
        # stdout moves above the bars only when it is the terminal too: a piped stdout keeps
        # its lines (rich would otherwise print them on the stderr console)
        redirect_stdout=sys.stdout.isatty(),
    )


@contextlib.contextmanager
def display(enabled: bool = True, *, console: Console | None = None) -> Iterator[Progress | None]:
    """The live display phases join while this block runs (``None`` when off or not drawn).

    ``console``: where it draws (tests pass ``Console(file=StringIO(), force_terminal=True)``);
    by default stderr. Inside another display, that one is reused."""
    if not enabled:
        yield None
        return
    if _active:
        yield _active[-1]
        return
    console = console or _console()
    if not console.is_terminal:  # nothing would be drawn: no live thread either
        yield None
        return
    with _new_progress(console) as progress:
        _active.append(progress)
        try:
            yield progress
        finally:
            _active.pop()


@contextlib.contextmanager
def phase(
    label: str, total: int | None, *, unit: str = "examples", enabled: bool = True
) -> Iterator[Bar]:
    """A bar for one phase, on the active display (one started for it if none is); removed
    when the phase ends, after a last draw of its final count and rate."""
    with display(enabled) as progress:
        if progress is None:
            yield Bar()
            return
        task = progress.add_task(label, total=total, unit=unit, info="")
        try:
            yield Bar(progress, task)
        finally:
            progress.refresh()
            progress.remove_task(task)
