"""Publishing an output atomically: written under a temporary name beside it, renamed into place.

Every folder or file emomerge publishes (merge outputs, exported YAMLs, training stages, tiny
models, LLaMA-Factory exports, demo folders, leaderboards, lineage manifests) goes through
:func:`atomic_folder` or :func:`atomic_file`, so they all behave the same (DESIGN.md, Outputs):

- **Nothing half-written.** The output is built under ``.<name>.tmp-<host>-<pid>-<token>.<boot>``
  in the destination's own folder (same file system: the rename is atomic) and renamed into place
  only when the ``with`` body returned. Any exception (Ctrl-C included) removes the temporary
  and leaves the destination untouched.
- **No leftovers.** A temporary of a process of this host, boot and user no longer running (a
  SIGKILL, an OOM kill) is removed by the next writer to the same destination, with a note on
  stderr: a crash mid-write at 7B leaves ~15 GB behind. Temporaries of live processes, of other
  hosts and of other users are left; so are those of another boot or pid namespace of this host
  name (the ``.<boot>`` tag: a pid means nothing there; after a power cut, a container sharing
  the name or a second machine of that name look alike), with a note naming them. A previous
  output moved aside (``.<name>.old-…``) whose destination is missing — its writer died between
  the two renames — is renamed back, never deleted. Once the new output is in place the previous
  one is renamed ``.<name>.del-…`` before being deleted: a partly deleted one (a kill mid-delete)
  is only ever deleted by the sweep, never restored.
- **Normal permissions.** The published tree gets the modes a plain ``mkdir`` / ``open`` gives
  under the user's umask: folders ``0o777 & ~umask``, files ``0o666 & ~umask`` (``0o777 & ~umask``
  for a file with an executable bit), whichever writer made it. (``tempfile.mkdtemp`` /
  ``mkstemp`` would publish ``0o700`` / ``0o600``: unreadable to the group that shares the runs.)
- **Durable before visible.** Every file is fsynced (once, whole file), then its folders, then
  the rename, then the parent folder: after a power cut the destination is the previous state
  or the complete new output, never the right names with empty or short files.
- **What appeared meanwhile is kept.** The destination's identity (device, inode) is taken
  before the caller's checks of it; if something appeared or changed there by the rename, the
  run fails and keeps it. Replacing an existing destination (``replace=True``, the writers' ``--force``)
  moves it aside to ``.<name>.old-…``, renames the new one in, then deletes the old one (if the
  second rename fails, Ctrl-C included, the old one is renamed back); without ``replace`` only an
  empty folder is replaced (``rename(2)`` does that atomically).
- **One writer per destination** (``lock=True``): ``.<name>.lock`` beside it is held with
  ``flock`` (the kernel drops it when the holder dies, even on SIGKILL); it records the holder's
  pid and host for the one line a second writer gets. :func:`file_lock` is the blocking,
  re-entrant variant for read-modify-write files many runs share (the leaderboard, by_book.csv):
  a second writer waits for the first instead of losing its rows.
- **A full disk is bad luck, not a bug.** ENOSPC / EDQUOT / EACCES / EPERM / EROFS are one line
  naming the destination (with the space needed, when known); the temporary is removed.

What an output may replace (``--force``, never an input) is the merge commands' policy, in
:mod:`.safeout`; this module only publishes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import MergeInputError

HOST = socket.gethostname() or "localhost"

_DISK_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}

# rename(2)'s errors when the destination was taken by something else meanwhile
_TAKEN = {errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR}

Note = Callable[[str], None]


class OutputError(MergeInputError):
    """The output cannot be written where asked (one line, exit code 2, nothing left behind)."""


def stderr_note(line: str) -> None:
    sys.stderr.write(line + "\n")


# -- temporary names and stale leftovers ----------------------------------------------------
def _boot_tag() -> str | None:
    """8 hex characters naming this boot of the kernel and this pid namespace, or None.

    A pid is only meaningful within one boot and one pid namespace: after a reboot, in a
    container sharing the host's name, or on another machine of the same name over a shared file
    system, a live writer's pid may look dead here. The tag tells the sweep those apart.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            boot = fh.read().strip()
    except (OSError, ValueError):
        return None
    if not boot:
        return None
    with contextlib.suppress(OSError):
        boot += " " + os.readlink("/proc/self/ns/pid")
    return hashlib.sha256(boot.encode()).hexdigest()[:8]


BOOT = _boot_tag()


def temp_path(final: Path, role: str = "tmp") -> Path:
    """``.<name>.<role>-<host>-<pid>-<token>.<boot>`` beside ``final``: who wrote it, for the
    sweep (no ``.<boot>`` where the boot id cannot be read)."""
    final = Path(final)
    token = secrets.token_hex(4) + (f".{BOOT}" if BOOT else "")
    return final.parent / f".{final.name}.{role}-{HOST}-{os.getpid()}-{token}"


def _owner(name: str, final: Path) -> tuple[str, str, int, str | None] | None:
    """``(role, host, pid, boot tag or None)`` of a temporary of ``final``, else None. Names
    without a boot tag (written before it existed) are recognised too."""
    for role in ("tmp", "old", "del"):
        prefix = f".{final.name}.{role}-"
        if name.startswith(prefix):
            parts = name[len(prefix) :].rsplit("-", 2)
            if len(parts) == 3 and parts[1].isdigit():
                _token, _, boot = parts[2].partition(".")
                return role, parts[0], int(parts[1]), boot or None
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _remove(item: Path) -> bool:
    """Remove a file or folder as far as possible; whether it is gone."""
    if item.is_dir() and not item.is_symlink():
        shutil.rmtree(item, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            item.unlink()
    return not os.path.lexists(item)


def sweep_stale(final: Path, note: Note = stderr_note) -> list[Path]:
    """Remove temporaries of ``final`` left by processes of this host, boot and user that no
    longer run; rename a previous output they moved aside back to ``final`` if that is missing.
    Returns what was removed or restored (a note on stderr for each)."""
    final = Path(final)
    removed: list[Path] = []
    if not final.parent.is_dir():
        return removed
    for item in sorted(final.parent.iterdir()):
        owner = _owner(item.name, final)
        if owner is None:
            continue
        role, host, pid, boot = owner
        if host != HOST or pid == os.getpid():
            continue
        try:
            if os.lstat(item).st_uid != os.getuid():
                continue  # another user's: not ours to judge (nor, usually, to remove)
        except FileNotFoundError:
            continue
        if boot is not None and boot != BOOT:
            note(
                f"note: left {item}: written by emomerge pid {pid} under another boot or pid "
                f"namespace of {HOST}; remove it if that run is over"
            )
            continue
        if pid_alive(pid):
            continue
        # a ``del`` item is a previous output being deleted (maybe partly): never restored
        if role == "old" and not os.path.lexists(final):
            # Its writer died between moving the previous output aside and renaming the new one
            # in: the previous output is the destination's last complete state.
            try:
                os.rename(item, final)
            except OSError:
                continue  # something took the destination meanwhile: leave both
            removed.append(item)
            note(
                f"note: restored {final} from {item}, left by emomerge pid {pid} (no longer running)"
            )
            continue
        if _remove(item):
            removed.append(item)
            note(f"note: removed {item}, left by emomerge pid {pid} (no longer running)")
    return removed


# -- the lock --------------------------------------------------------------------------------
def lock_path(final: Path) -> Path:
    final = Path(final)
    return final.parent / f".{final.name}.lock"


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096).decode("utf-8", "replace")
        holder = json.loads(raw) if raw.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


@contextlib.contextmanager
def out_lock(final: Path, note: Note = stderr_note) -> Iterator[Path]:
    """Hold ``.<name>.lock`` beside ``final`` (``flock``, non-blocking): a second writer to the
    same destination is refused with one line naming the holder's pid and host."""
    path = lock_path(final)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
            raise OutputError(
                f"{final}: another emomerge ({who}) is writing this --out (lock {path}); "
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
            note(
                f"note: removed the stale lock {path} of emomerge pid {previous.get('pid')}{where} "
                "(no longer running)"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": HOST}).encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


#: Blocking locks this process holds: path → (pid, fd, depth). The pid tells a forked child
#: that the entry is its parent's (the child holds nothing until it locks itself).
_HELD: dict[str, tuple[int, int, int]] = {}
_THREAD_LOCKS: dict[str, threading.RLock] = {}
_REGISTRY = threading.Lock()


def _thread_lock(key: str) -> threading.RLock:
    with _REGISTRY:
        if key not in _THREAD_LOCKS:
            _THREAD_LOCKS[key] = threading.RLock()
        return _THREAD_LOCKS[key]


def _flock_wait(path: Path, final: Path, timeout: float | None) -> int:
    """Open and ``flock`` ``path`` (exclusive), waiting for its holder up to ``timeout`` s; the
    descriptor. Re-opened when the file we locked was unlinked by its previous holder."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.001
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        holder = _read_holder(fd)
                        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
                        raise OutputError(
                            f"{final}: still locked by another emomerge ({who}) after "
                            f"{timeout:g} s (lock {path}); wait for it or remove the lock "
                            "if that run is over"
                        ) from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.05)
        except BaseException:
            os.close(fd)
            raise
        # As in out_lock: a holder unlinks the file on release, so the file we locked may be
        # one nobody else will see — start again on the current one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def file_lock(final: str | Path, *, timeout: float | None = 600.0) -> Iterator[Path]:
    """Hold ``.<name>.lock`` beside ``final`` for a read-modify-write of ``final``, waiting
    (up to ``timeout`` seconds, then :class:`OutputError` naming the file) while another process
    holds it. Re-entrant within a thread: a function that locks ``final`` may be called by one
    that already holds it (the evaluation runner's upsert → Holm → upsert)."""
    final = Path(final)
    path = lock_path(final)
    key = os.path.abspath(path)
    guard = _thread_lock(key)
    if not guard.acquire(timeout=-1 if timeout is None else timeout):
        raise OutputError(f"{final}: still locked by another thread after {timeout:g} s")
    try:
        held = _HELD.get(key)
        if held is not None and held[0] == os.getpid():
            _HELD[key] = (held[0], held[1], held[2] + 1)
            try:
                yield path
            finally:
                pid, fd, depth = _HELD[key]
                _HELD[key] = (pid, fd, depth - 1)
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        fd = _flock_wait(path, final, timeout)
        _HELD[key] = (os.getpid(), fd, 1)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": HOST}).encode(), 0)
            yield path
        finally:
            del _HELD[key]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.close(fd)
    finally:
        guard.release()


# -- disk errors -----------------------------------------------------------------------------
def disk_error(exc: BaseException, final: Path, needed: int | None) -> OutputError | None:
    """One line for an OSError that is about the disk (space, quota, permissions), else None."""
    if not isinstance(exc, OSError) or exc.errno not in _DISK_ERRORS:
        return None
    what = _DISK_ERRORS[exc.errno]
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) and needed:
        return OutputError(f"{what} writing {final} (needed ≈ {needed / 1e9:.2f} GB)")
    where = f" ({exc.filename})" if exc.filename else ""
    return OutputError(f"{what} writing {final}{where}")


# -- permissions and durability --------------------------------------------------------------
def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc``: no window
    in which another thread creates files under a zero umask)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_permissions(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything under it) the modes a plain ``mkdir`` /
    ``open`` would under the umask: ``0o777`` / ``0o666`` masked, executables staying executable.
    Symbolic links are left alone (``chmod`` would change their target, maybe an input)."""
    umask = current_umask()
    path = Path(path)

    def fix(item: Path, is_dir: bool) -> None:
        if is_dir:
            want = 0o777 & ~umask
        else:
            executable = os.stat(item).st_mode & 0o111
            want = (0o777 if executable else 0o666) & ~umask
        os.chmod(item, want)

    if path.is_symlink():
        return
    if not path.is_dir():
        fix(path, False)
        return
    for root, dirs, names in os.walk(path):
        fix(Path(root), True)
        for name in names:
            item = Path(root) / name
            if not item.is_symlink():
                fix(item, False)
        dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]


def fsync_path(path: Path) -> None:
    """fsync one file or directory (a read-only descriptor flushes the whole inode on Linux)."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> int:
    """fsync every file under ``folder``, then every directory, deepest first; the count of
    files (one fsync each, whatever their number of tensors)."""
    files = 0
    for root, _dirs, names in os.walk(folder, topdown=False):
        for name in names:
            item = Path(root) / name
            if not item.is_symlink():
                fsync_path(item)
                files += 1
        fsync_path(Path(root))
    return files


# -- the rename ------------------------------------------------------------------------------
def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _changed(final: Path, before: tuple[int, int] | None) -> OutputError:
    return OutputError(
        f"{final}: {'appeared' if before is None else 'changed'} while this "
        "command ran; kept it, nothing written"
    )


def _place(
    tmp: Path, final: Path, before: tuple[int, int] | None, replace: bool, note: Note
) -> None:
    """Rename ``tmp`` to ``final`` if ``final`` is as it was when checked, else keep it and fail."""
    if _identity(final) != before:
        raise _changed(final, before)
    if before is None or not replace:
        try:  # nothing there, or an empty folder, which rename(2) replaces atomically
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno in _TAKEN:
                raise _changed(final, before) from exc
            raise
        return
    trash = temp_path(final, "old")
    os.rename(final, trash)
    try:
        os.rename(tmp, final)
    except BaseException as exc:  # Ctrl-C or a racing writer: the previous output goes back
        try:
            os.rename(trash, final)
        except OSError:
            # Something took the destination meanwhile: keep the previous output under a name
            # the sweep leaves alone (a dead writer's .old- beside a destination is deleted).
            kept = final.parent / f"{final.name}.previous-{secrets.token_hex(4)}"
            with contextlib.suppress(OSError):
                os.rename(trash, kept)
                trash = kept
            note(f"note: {final} was taken by another writer; the previous output is at {trash}")
        if isinstance(exc, OSError) and exc.errno in _TAKEN:
            raise _changed(final, before) from exc
        raise
    # Renamed before deletion: a kill mid-delete leaves a ``.del-`` the sweep only deletes (an
    # ``.old-`` would be restored, partly deleted, if the destination went missing later).
    doomed = temp_path(final, "del")
    try:
        os.rename(trash, doomed)
    except OSError:
        doomed = trash
    _remove(doomed)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


@contextlib.contextmanager
def atomic_folder(
    final: str | Path,
    *,
    replace: bool = False,
    lock: bool = False,
    check: Callable[[], Any] | None = None,
    needed_bytes: int | None = None,
    note: Note = stderr_note,
) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; publish it as ``final`` on success.

    ``replace``: an existing ``final`` (whatever the caller's policy accepted) is replaced;
    without it only a missing ``final`` or an empty folder is, else :class:`OutputError`.
    ``lock``: hold ``.<name>.lock`` while writing (one writer per destination). ``check``: the
    caller's checks of ``final``, run again once the lock is held and stale temporaries swept.
    ``needed_bytes``: the output's size, for the one line of a full disk.
    """
    final = Path(final)
    with contextlib.ExitStack() as stack:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            if lock:
                stack.enter_context(out_lock(final, note))
            sweep_stale(final, note)
            # The identity first, then the caller's checks: what appears at ``final`` after
            # the checks passed is caught here or by the rename, never replaced unchecked.
            before = _identity(final)
            if check is not None:
                check()
                if _identity(final) != before:
                    raise _changed(final, before)
            if before is not None and not replace and not _is_empty_dir(final):
                raise OutputError(f"{final}: already exists and is not empty")
            tmp = temp_path(final)
            tmp.mkdir()
        except OSError as exc:
            raise (disk_error(exc, final, needed_bytes) or exc) from exc
        placed = False
        try:
            yield tmp
            publish_permissions(tmp)
            fsync_tree(tmp)
            _place(tmp, final, before, replace, note)
            placed = True
            fsync_path(final.parent)
        except BaseException as exc:
            if not placed:
                shutil.rmtree(tmp, ignore_errors=True)
            mapped = disk_error(exc, final, needed_bytes)
            if mapped is not None:
                raise mapped from exc
            raise


@contextlib.contextmanager
def atomic_file(
    path: str | Path,
    mode: str = "w",
    *,
    encoding: str | None = "utf-8",
    newline: str | None = None,
    unchanged: bool = False,
    lock: bool = False,
    check: Callable[[], Any] | None = None,
    note: Note = stderr_note,
) -> Iterator[IO[Any]]:
    """Yield a file open for writing beside ``path``; it replaces ``path`` on success.

    ``mode`` ``"w"`` (text, ``encoding`` / ``newline`` as for :func:`open`) or ``"wb"``. The
    file gets the normal permissions (``0o666 & ~umask``). ``unchanged``: fail (keeping it) if
    something appeared at or replaced ``path`` while writing, instead of replacing it. ``lock``
    and ``check``: as for :func:`atomic_folder`.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    with contextlib.ExitStack() as stack:
        needed = None
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if lock:
                stack.enter_context(out_lock(path, note))
            sweep_stale(path, note)
            before = _identity(path)  # before the checks, as in atomic_folder
            if check is not None:
                check()
                if unchanged and _identity(path) != before:
                    raise _changed(path, before)
            tmp = temp_path(path)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            if mode == "wb":
                fh = os.fdopen(fd, "wb")
            else:
                fh = os.fdopen(fd, "w", encoding=encoding, newline=newline)
            with fh:
                yield fh
                fh.flush()
                needed = fh.tell() if fh.seekable() else None
                os.fsync(fh.fileno())
            if unchanged and _identity(path) != before:
                raise _changed(path, before)
            os.replace(tmp, path)
            tmp = None
            fsync_path(path.parent)
        except BaseException as exc:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            mapped = disk_error(exc, path, needed)
            if mapped is not None:
                raise mapped from exc
            raise
