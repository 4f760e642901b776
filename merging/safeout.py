"""Where outputs land: what ``--force`` may replace, one writer per ``--out``, no leftovers.

Every output (a merge folder, an exported YAML) is written beside ``--out`` under a temporary
name and renamed into place at the end. Around that:

- **What may be replaced.** ``--out`` never is, and never holds or sits inside, one of the
  command's inputs (adapters, their lineage ancestors, the base, the recipe), compared as
  resolved paths: a merge whose ``--out`` is its own input would delete that input. An existing
  ``--out`` is refused without ``--force``; with it, only an empty folder or an earlier emomerge
  *output* is replaced — a folder whose ``emomerge.json`` says ``kind`` merge, export or run.
  A training stage (``kind: "stage_adapter"``), a folder without a manifest, a file or anything
  else is refused with one line, since replacing it loses somebody's work.
- **One writer per --out.** ``.<name>.lock`` beside ``--out`` is held with ``flock`` while the
  output is written and renamed (the kernel drops it when the holder dies, even on SIGKILL, so a
  crash never blocks the next run); it records the holder's pid and host for the message a
  second writer gets. Without it two merges to one ``--out`` both report success and one result
  is silently lost.
- **The rename re-checks --out under the lock.** Existence is checked at the start; anything
  that appeared (or changed) at ``--out`` while the merge ran is kept and the run fails.
- **No leftovers.** Temporary names carry the writer's host and pid
  (``.<name>.tmp-<host>-<pid>-<token>``); a run that finds one of a process no longer running on
  this host removes it and says so on stderr (a crash mid-write at 7B leaves ~15 GB behind).
- **Durable before visible.** Every written file is fsynced (once, whole file: not per tensor),
  then the temporary folder, then it is renamed, then the parent directory is fsynced: after a
  power cut ``--out`` is either the previous state or the complete new output, never a folder
  of the right names with empty or short files (ext4/xfs may commit the rename first).
- **A full disk is bad luck, not a bug.** ENOSPC / EDQUOT / EACCES / EROFS while writing are one
  line naming ``--out`` (with the space the output needs, when known); the temporary output is
  removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .errors import MergeInputError

MANIFEST = "emomerge.json"
#: ``kind`` values of emomerge.json manifests that ``--force`` may replace (outputs, not inputs).
REPLACEABLE_KINDS = ("merge", "export", "run")
#: First line of an exported mergekit YAML: the only kind of file ``export-mergekit --force`` replaces.
EXPORT_MARK = "# mergekit recipe exported by emomerge"
HOST = socket.gethostname() or "localhost"

_DISK_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}

Note = Callable[[str], None]


class OutputError(MergeInputError):
    """The output cannot be written where asked (one line, exit code 2, nothing left behind)."""


def stderr_note(line: str) -> None:
    sys.stderr.write(line + "\n")


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
            raise OutputError(f"{out}: --out is inside the input folder {item}; pick a folder elsewhere")


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
        raise OutputError(f"{out}: already exists (pass --force to replace an earlier emomerge output)")
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
        raise OutputError(f"{out}: not a YAML exported by emomerge; --force replaces only an earlier export")
    return True


# -- temporary names and stale leftovers ----------------------------------------------------
def temp_path(out: Path, role: str = "tmp") -> Path:
    """``.<name>.<role>-<host>-<pid>-<token>`` beside ``out``: who wrote it, for the sweep."""
    return out.parent / f".{out.name}.{role}-{HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _owner(name: str, out: Path) -> tuple[str, int] | None:
    for role in ("tmp", "old"):
        prefix = f".{out.name}.{role}-"
        if name.startswith(prefix):
            parts = name[len(prefix):].rsplit("-", 2)
            if len(parts) == 3 and parts[1].isdigit():
                return parts[0], int(parts[1])
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def sweep_stale(out: Path, note: Note = stderr_note) -> list[Path]:
    """Remove temporaries of ``out`` left by processes of this host that no longer run."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for item in sorted(out.parent.iterdir()):
        owner = _owner(item.name, out)
        if owner is None or owner[0] != HOST or owner[1] == os.getpid() or pid_alive(owner[1]):
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                item.unlink()
        removed.append(item)
        note(f"note: removed {item}, left by emomerge pid {owner[1]} (no longer running)")
    return removed


# -- the lock --------------------------------------------------------------------------------
def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096).decode("utf-8", "replace")
        holder = json.loads(raw) if raw.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


@contextlib.contextmanager
def out_lock(out: Path, note: Note = stderr_note) -> Iterator[Path]:
    """Hold ``.<name>.lock`` beside ``out`` (``flock``, non-blocking): a second writer to the
    same ``out`` is refused with one line naming the holder's pid and host."""
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
            raise OutputError(
                f"{out}: another emomerge ({who}) is writing this --out (lock {path}); "
                "wait for it or pick another --out"
            ) from None
        # A holder unlinks the file on release: if that happened between our open and flock we
        # hold a lock on a file nobody else will see — start again on the current one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        previous = _read_holder(fd)
        if previous.get("pid") is not None and previous.get("pid") != os.getpid():
            where = "" if previous.get("host") == HOST else f" on {previous.get('host')}"
            note(f"note: removed the stale lock {path} of emomerge pid {previous.get('pid')}{where} "
                 "(no longer running)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": HOST}).encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


# -- disk errors -----------------------------------------------------------------------------
def disk_error(exc: BaseException, out: Path, needed: int | None) -> OutputError | None:
    """One line for an OSError that is about the disk (space, quota, permissions), else None."""
    if not isinstance(exc, OSError) or exc.errno not in _DISK_ERRORS:
        return None
    what = _DISK_ERRORS[exc.errno]
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) and needed:
        return OutputError(f"{what} writing {out} (needed ≈ {needed / 1e9:.2f} GB)")
    where = f" ({exc.filename})" if exc.filename else ""
    return OutputError(f"{what} writing {out}{where}")


# -- durability ------------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    """fsync one file or directory (a read-only descriptor flushes the whole inode on Linux)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> int:
    """fsync every file under ``folder``, then every directory, deepest first; the count of
    files (one fsync each, whatever their number of tensors)."""
    files = 0
    for root, dirs, names in os.walk(folder, topdown=False):
        for name in names:
            item = Path(root) / name
            if not item.is_symlink():
                fsync_path(item)
                files += 1
        fsync_path(Path(root))
    return files


def write_file_atomic(path: Path, text: str) -> None:
    """Replace one small file (a lineage ``emomerge.json``) atomically and durably: a temporary
    beside it, fsynced, renamed over it, the directory fsynced."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_path(path.parent)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _place(tmp: Path, out: Path, before: tuple[int, int] | None) -> None:
    """Rename ``tmp`` to ``out`` if ``out`` is as it was when checked, else keep it and fail."""
    now = _identity(out)
    if now != before:
        raise OutputError(
            f"{out}: {'appeared' if before is None else 'changed'} while this command ran; "
            "kept it, nothing written"
        )
    if now is None:
        os.rename(tmp, out)
        return
    trash = temp_path(out, "old")
    os.rename(out, trash)
    os.rename(tmp, out)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(
    out: Path, *, force: bool, inputs: Sequence[str | Path] = (), needed_bytes: int | None = None,
    note: Note = stderr_note,
) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it into place only on success.

    A failure (or Ctrl-C) removes the temporary folder, so nothing half-written is left. The
    rules on what is replaced, the lock and the sweep of stale temporaries are the module's.
    """
    out = Path(out)
    check_folder_target(out, inputs, force=force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = out_lock(out, note)
        lock.__enter__()
    except OSError as exc:
        raise (disk_error(exc, out, needed_bytes) or exc) from exc
    tmp = None
    try:
        sweep_stale(out, note)
        check_folder_target(out, inputs, force=force)  # again, now that no other writer runs
        before = _identity(out)
        tmp = temp_path(out)
        tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        _place(tmp, out, before)
        tmp = None
        fsync_path(out.parent)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        lock.__exit__(None, None, None)
        lock = None
        mapped = disk_error(exc, out, needed_bytes)
        if mapped is not None:
            raise mapped from exc
        raise
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def write_text_output(
    out: Path, text: str, *, force: bool, inputs: Sequence[str | Path] = (), note: Note = stderr_note,
) -> None:
    """Write an exported text file atomically, with the rules of :func:`atomic_folder` (an
    existing file is replaced with ``force`` only if it is an earlier export)."""
    out = Path(out)
    check_file_target(out, inputs, force=force)
    needed = len(text.encode())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out_lock(out, note):
            sweep_stale(out, note)
            check_file_target(out, inputs, force=force)
            before = _identity(out)
            tmp = temp_path(out)
            try:
                with open(tmp, "w", encoding="utf-8") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
                now = _identity(out)
                if now != before:
                    raise OutputError(f"{out}: {'appeared' if before is None else 'changed'} while "
                                      "this command ran; kept it, nothing written")
                os.replace(tmp, out)
                fsync_path(out.parent)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise
    except OSError as exc:
        raise (disk_error(exc, out, needed) or exc) from exc
