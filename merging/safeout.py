"""What an output may replace: the ``--force`` policy of the merge commands' ``--out``.

The publishing itself (temporary sibling, rename, fsync, permissions, sweep of stale
temporaries, the lock, disk errors as one line) is :mod:`.atomic`'s (DESIGN.md, Outputs). Here:

- **What may be replaced.** ``--out`` never is, and never holds or sits inside, one of the
  command's inputs (adapters, their lineage ancestors, the base, the recipe), compared as
  resolved paths: a merge whose ``--out`` is its own input would delete that input. An existing
  ``--out`` is refused without ``--force``; with it, only an empty folder or an earlier emomerge
  *output* is replaced — a folder whose ``emomerge.json`` says ``kind`` merge, export or run.
  A training stage (``kind: "stage_adapter"``), a folder without a manifest, a file or anything
  else is refused with one line, since replacing it loses somebody's work. ``--force`` means
  only this: adapters of different bases need ``--allow-different-bases``.
- **One writer per --out.** The merge outputs hold the destination's lock while they are
  written and renamed: without it two merges to one ``--out`` both report success and one
  result is silently lost.
- **The rename re-checks --out under the lock.** Existence is checked at the start and again
  once the lock is held; anything that appeared (or changed) at ``--out`` while the merge ran is
  kept and the run fails.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from .atomic import Note, OutputError, atomic_file, atomic_folder, stderr_note

MANIFEST = "emomerge.json"
#: ``kind`` values of emomerge.json manifests that ``--force`` may replace (outputs, not inputs).
REPLACEABLE_KINDS = ("merge", "export", "run")
#: First line of an exported mergekit YAML: the only kind of file ``export-mergekit --force`` replaces.
EXPORT_MARK = "# mergekit recipe exported by emomerge"


# -- what --force may replace ----------------------------------------------------------------
def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(path)).resolve()


def check_not_an_input(out: Path, inputs: Sequence[str | Path]) -> None:
    """Refuse an ``--out`` that is, holds or sits inside one of the command's inputs."""
    target = _resolved(out)
    for item in inputs:
        src = _resolved(Path(item))
        if src == target:
            raise OutputError(f"{out}: --out is the input {item}; refusing to overwrite an input")
        if target in src.parents:
            raise OutputError(f"{out}: --out contains the input {item}; refusing to replace it")
        if src in target.parents and src.is_dir():
            raise OutputError(
                f"{out}: --out is inside the input folder {item}; pick a folder elsewhere"
            )


def why_not_replaceable(folder: Path) -> str | None:
    """None when ``--force`` may replace ``folder`` (empty, or an emomerge output), else why not."""
    if not any(folder.iterdir()):
        return None
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"not an emomerge output (no {MANIFEST})"
    try:
        kind = json.loads(manifest.read_text(encoding="utf-8")).get("kind", "stage_adapter")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return f"its {MANIFEST} is not readable JSON"
    if kind not in REPLACEABLE_KINDS:
        return f"its {MANIFEST} says kind '{kind}', not an emomerge output"
    return None


def check_folder_target(out: Path, inputs: Sequence[str | Path], *, force: bool) -> bool:
    """Check ``--out`` for a folder output; True when an (acceptable) folder is there."""
    check_not_an_input(out, inputs)
    if out.is_symlink():
        raise OutputError(f"{out}: --out is a symbolic link; refusing to replace it")
    if not out.exists():
        return False
    if not out.is_dir():
        raise OutputError(f"{out}: --out exists and is not a folder; refusing to replace it")
    if not force:
        raise OutputError(
            f"{out}: already exists (pass --force to replace an earlier emomerge output)"
        )
    reason = why_not_replaceable(out)
    if reason is not None:
        raise OutputError(
            f"{out}: {reason}; --force replaces only an earlier merge/export/run output or an empty folder"
        )
    return True


def check_file_target(out: Path, inputs: Sequence[str | Path], *, force: bool) -> bool:
    """Check ``--out`` for an exported YAML; True when an (acceptable) earlier export is there."""
    check_not_an_input(out, inputs)
    if out.is_symlink():
        raise OutputError(f"{out}: --out is a symbolic link; refusing to replace it")
    if not out.exists():
        return False
    if not out.is_file():
        raise OutputError(f"{out}: --out exists and is not a file; refusing to replace it")
    if not force:
        raise OutputError(f"{out}: already exists (pass --force to replace an earlier export)")
    try:
        with open(out, encoding="utf-8") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError):
        first = ""
    if not first.startswith(EXPORT_MARK):
        raise OutputError(
            f"{out}: not a YAML exported by emomerge; --force replaces only an earlier export"
        )
    return True


# -- publishing (the mechanism is atomic.py's) ---------------------------------------------
@contextlib.contextmanager
def output_folder(
    out: Path,
    *,
    force: bool,
    inputs: Sequence[str | Path] = (),
    needed_bytes: int | None = None,
    note: Note = stderr_note,
) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; it becomes ``out`` only on success.

    :func:`atomic.atomic_folder` with this module's rules: what ``--force`` may replace (checked
    before anything is made, and again under the lock) and one writer per ``--out``.
    """
    out = Path(out)
    check_folder_target(out, inputs, force=force)
    with atomic_folder(
        out,
        replace=True,
        lock=True,
        needed_bytes=needed_bytes,
        note=note,
        check=lambda: check_folder_target(out, inputs, force=force),
    ) as tmp:
        yield tmp


def write_text_output(
    out: Path,
    text: str,
    *,
    force: bool,
    inputs: Sequence[str | Path] = (),
    note: Note = stderr_note,
) -> None:
    """Write an exported text file atomically, with the rules of :func:`output_folder` (an
    existing file is replaced with ``force`` only if it is an earlier export)."""
    out = Path(out)
    check_file_target(out, inputs, force=force)
    with atomic_file(
        out,
        unchanged=True,
        lock=True,
        note=note,
        check=lambda: check_file_target(out, inputs, force=force),
    ) as fh:
        fh.write(text)
