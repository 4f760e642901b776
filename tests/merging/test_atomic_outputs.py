"""One way to publish outputs (merging/atomic.py): same permissions whoever writes, nothing
half-written, no leftovers (DESIGN.md, Outputs)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emomerge.cli import app
from emomerge.cli_merge import expand_variadic
from emomerge.merging import atomic

from .helpers import lm_modules, write_adapter

SHAPES = lm_modules(layers=1, hidden=8, inter=12)


@pytest.fixture()
def umask():
    """Set a umask for the test (``umask(value)``) and restore the previous one after."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def modes(folder: Path) -> dict[str, int]:
    """``{relative path: permission bits}`` of ``folder`` and everything in it."""
    out = {".": stat.S_IMODE(folder.stat().st_mode)}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def siblings(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


@pytest.mark.parametrize("mask,dirs,files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_merge_and_tiny_model_outputs_get_the_same_normal_permissions(
    tmp_path, umask, mask, dirs, files
):
    """A merge output (the real CLI) and a tiny model (training) are published with the modes
    a plain mkdir/open gives under the umask: group-readable under 022, not mkdtemp's 0700."""
    from emomerge.training.models.tiny import build_tiny_vlm

    write_adapter(tmp_path / "a", SHAPES, seed=1)
    write_adapter(tmp_path / "b", SHAPES, seed=2)
    umask(mask)
    r = CliRunner().invoke(
        app,
        expand_variadic(
            [
                str(x)
                for x in [
                    "linear",
                    "--adapters",
                    tmp_path / "a",
                    tmp_path / "b",
                    "--out",
                    tmp_path / "merged",
                ]
            ]
        ),
    )
    assert r.exit_code == 0, r.output
    tiny = build_tiny_vlm("qwen2_5_vl", tmp_path / "tiny", seed=0)
    merged_modes, tiny_modes = modes(tmp_path / "merged"), modes(tiny)
    assert len(merged_modes) >= 4 and len(tiny_modes) >= 4
    for found in (merged_modes, tiny_modes):
        for name, mode in found.items():
            is_dir = name == "." or (tmp_path / "merged" / name).is_dir() or (tiny / name).is_dir()
            assert mode == (dirs if is_dir else files), (name, oct(mode))
    # the same rule for both writers: the same set of modes
    assert set(merged_modes.values()) == set(tiny_modes.values()) == {dirs, files}
    assert merged_modes["."] & stat.S_IRGRP and merged_modes["."] & stat.S_IXGRP


def test_published_folder_keeps_executables_and_leaves_symlinks_alone(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "input.txt"
    target.write_text("an input, not ours")
    target.chmod(0o600)
    with atomic.atomic_folder(tmp_path / "out") as tmp:
        (tmp / "run.sh").write_text("#!/bin/sh\n")
        (tmp / "run.sh").chmod(0o700)
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "data.txt").write_text("x")
        (tmp / "sub" / "data.txt").chmod(0o600)
        (tmp / "link").symlink_to(target)
    assert modes(tmp_path / "out") == {
        ".": 0o755,
        "link": 0o777,
        "run.sh": 0o755,
        "sub": 0o755,
        "sub/data.txt": 0o644,
    }
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # not chmod-ed through the link


def test_a_failure_inside_atomic_folder_leaves_no_destination_and_no_temp(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.atomic_folder(tmp_path / "out") as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
            assert f"-{atomic.HOST}-{os.getpid()}-" in tmp.name  # recognisable: host and pid
            (tmp / "half.safetensors").write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    # KeyboardInterrupt too (Ctrl-C), and an existing output being replaced stays as it was
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("previous")
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_folder(tmp_path / "out", replace=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]


def test_atomic_folder_replaces_only_when_asked(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("previous")
    with pytest.raises(atomic.OutputError, match="already exists and is not empty"):
        with atomic.atomic_folder(tmp_path / "out") as tmp:
            pytest.fail("the body must not run")
    with atomic.atomic_folder(tmp_path / "out", replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old one is gone too
    (tmp_path / "empty").mkdir()  # an empty folder is replaced without replace=True
    with atomic.atomic_folder(tmp_path / "empty") as tmp:
        (tmp / "f").write_text("1")
    assert (tmp_path / "empty" / "f").read_text() == "1"


def test_something_appearing_meanwhile_is_kept(tmp_path):
    with pytest.raises(atomic.OutputError, match="appeared while this command ran"):
        with atomic.atomic_folder(tmp_path / "out") as tmp:
            (tmp / "mine.txt").write_text("mine")
            (tmp_path / "out").mkdir()
            (tmp_path / "out" / "theirs.txt").write_text("theirs")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["theirs.txt"]
    assert siblings(tmp_path, "out") == []


def test_stale_temporaries_of_dead_processes_are_swept(tmp_path):
    pid = dead_pid()
    stale = tmp_path / f".out.tmp-{atomic.HOST}-{pid}-abcd"
    stale.mkdir()
    (stale / "big.bin").write_bytes(b"0" * 10)
    live = tmp_path / f".out.tmp-{atomic.HOST}-{os.getppid()}-abcd"
    live.mkdir()
    notes: list[str] = []
    with atomic.atomic_folder(tmp_path / "out", note=notes.append) as tmp:
        (tmp / "f").write_text("1")
    assert not stale.exists() and live.is_dir()
    assert notes == [f"note: removed {stale}, left by emomerge pid {pid} (no longer running)"]


def test_atomic_file_replaces_atomically(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "leaderboard.csv"
    path.write_text("old\n")
    path.chmod(0o600)
    inode = path.stat().st_ino
    with atomic.atomic_file(path, newline="") as fh:
        fh.write("new,")
        fh.flush()
        assert path.read_text() == "old\n"  # readers see the old file until the rename
        (tmp,) = siblings(tmp_path, "leaderboard.csv")
        assert tmp.startswith(f".leaderboard.csv.tmp-{atomic.HOST}-{os.getpid()}-")
        fh.write("rows\r\n")
    assert path.read_bytes() == b"new,rows\r\n"
    assert path.stat().st_ino != inode  # a new file renamed over, not rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # normal permissions, not mkstemp's 0600
    assert siblings(tmp_path, "leaderboard.csv") == []
    with pytest.raises(ValueError, match="half"):
        with atomic.atomic_file(path, "wb") as fh:
            fh.write(b"half")
            raise ValueError("half")
    assert path.read_bytes() == b"new,rows\r\n"
    assert siblings(tmp_path, "leaderboard.csv") == []
    with atomic.atomic_file(tmp_path / "sub" / "new.bin", "wb") as fh:  # parents are made
        fh.write(b"\x00\x01")
    assert (tmp_path / "sub" / "new.bin").read_bytes() == b"\x00\x01"


def test_atomic_file_unchanged_keeps_what_appeared(tmp_path):
    path = tmp_path / "x.yaml"
    with pytest.raises(atomic.OutputError, match="appeared while this command ran"):
        with atomic.atomic_file(path, unchanged=True) as fh:
            fh.write("mine")
            path.write_text("theirs")
    assert path.read_text() == "theirs" and siblings(tmp_path, "x.yaml") == []


# -- the reviewer's defects: the old output, other writers' temporaries, the check window ------
def test_a_failed_second_rename_puts_the_previous_output_back(tmp_path, monkeypatch):
    """Replacing moves the old output aside, then renames the new one in: Ctrl-C between the two
    renames must leave the old output at the destination, not nothing."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    real = os.rename
    calls: list[tuple[str, str]] = []

    def rename(src, dst):
        calls.append((str(src), str(dst)))
        if len(calls) == 2:  # the new output into place
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_folder(out, replace=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert calls[0][0] == str(out) and ".out.old-" in calls[0][1]
    assert calls[1] == (str(tmp), str(out))
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert (out / "old.txt").read_text() == "previous"
    assert siblings(tmp_path, "out") == []


def test_a_racing_writer_taking_the_destination_keeps_both_outputs(tmp_path, monkeypatch):
    """ENOTEMPTY on the second rename (another writer filled the destination meanwhile): one
    line, the other writer's output kept, the previous one kept under a name no sweep deletes."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    real = os.rename
    calls = []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    notes: list[str] = []
    with pytest.raises(atomic.OutputError, match="changed while this command ran"):
        with atomic.atomic_folder(out, replace=True, note=notes.append) as tmp:
            (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith("out.previous-")]
    assert (kept / "old.txt").read_text() == "previous"
    assert notes == [f"note: {out} was taken by another writer; the previous output is at {kept}"]
    monkeypatch.setattr(atomic.os, "rename", real)
    assert atomic.sweep_stale(out) == [] and kept.is_dir()


@pytest.mark.parametrize("boot", [False, True])
def test_the_sweep_restores_a_dead_writers_previous_output(tmp_path, boot):
    """A writer killed between its two renames leaves ``.out.old-…`` and no ``out``: the next
    writer renames it back (it is the destination's last complete state), never deletes it."""
    if boot and atomic.BOOT is None:
        pytest.skip("no boot id on this system")
    pid = dead_pid()
    tag = f".{atomic.BOOT}" if boot else ""  # names written before the boot tag too
    trash = tmp_path / f".out.old-{atomic.HOST}-{pid}-abcd{tag}"
    trash.mkdir()
    (trash / "model.safetensors").write_bytes(b"previous")
    notes: list[str] = []
    with pytest.raises(atomic.OutputError, match="already exists and is not empty"):
        with atomic.atomic_folder(tmp_path / "out", note=notes.append):
            pytest.fail("the restored output must not be replaced without replace=True")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"previous"
    assert siblings(tmp_path, "out") == []
    assert notes == [
        f"note: restored {tmp_path / 'out'} from {trash}, left by emomerge pid {pid} "
        "(no longer running)"
    ]
    # With the destination there (the writer died after placing the new one), it is deleted.
    trash.mkdir()
    assert atomic.sweep_stale(tmp_path / "out", note=notes.append) == [trash]
    assert not trash.exists() and (tmp_path / "out" / "model.safetensors").is_file()


def test_the_sweep_leaves_other_users_temporaries_and_notes_only_what_is_gone(
    tmp_path, monkeypatch
):
    pid = dead_pid()
    theirs = tmp_path / f".out.tmp-{atomic.HOST}-{pid}-aaaa"
    theirs.mkdir()
    (theirs / "f").write_text("another user's")
    uid = os.getuid()
    if uid == 0:
        os.chown(theirs, 4242, -1)
    else:  # not root: cannot give it away, so look at it as another user instead
        monkeypatch.setattr(atomic.os, "getuid", lambda: uid + 4242)
    notes: list[str] = []
    assert atomic.sweep_stale(tmp_path / "out", note=notes.append) == []
    assert (theirs / "f").read_text() == "another user's" and notes == []
    monkeypatch.undo()
    theirs.rename(tmp_path / "elsewhere")
    # A temporary that cannot be removed (rmtree failing quietly) gets no "removed" note.
    stuck = tmp_path / f".out.tmp-{atomic.HOST}-{pid}-bbbb"
    stuck.mkdir()
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *a, **k: None)
    assert atomic.sweep_stale(tmp_path / "out", note=notes.append) == []
    assert stuck.is_dir() and notes == []


def test_temporaries_carry_the_boot_and_another_boots_are_left(tmp_path):
    """The boot tag: a pid of another boot or pid namespace of this host name says nothing about
    whether that writer runs, so its temporary is left (with a note), ours of a dead pid swept."""
    if atomic.BOOT is None:
        pytest.skip("no boot id on this system")
    assert len(atomic.BOOT) == 8 and atomic.temp_path(tmp_path / "out").name.endswith(
        f".{atomic.BOOT}"
    )
    pid = dead_pid()
    other_boot = "0" * 8 if atomic.BOOT != "0" * 8 else "1" * 8
    elsewhere = tmp_path / f".out.tmp-{atomic.HOST}-{pid}-abcd.{other_boot}"
    ours = tmp_path / f".out.tmp-{atomic.HOST}-{pid}-abcd.{atomic.BOOT}"
    elsewhere.mkdir()
    ours.mkdir()
    notes: list[str] = []
    assert atomic.sweep_stale(tmp_path / "out", note=notes.append) == [ours]
    assert elsewhere.is_dir() and not ours.exists()
    assert notes[0].startswith(f"note: left {elsewhere}: written by emomerge pid {pid} under")
    assert notes[1] == f"note: removed {ours}, left by emomerge pid {pid} (no longer running)"


def test_something_appearing_during_the_checks_is_not_replaced(tmp_path):
    """The destination's identity is taken before the caller's checks: what appears while they
    run (they found nothing, so --force was not needed) is kept, even with replace=True."""
    out = tmp_path / "out"

    def check():
        assert not out.exists()  # the caller's check passes: nothing to replace
        out.mkdir()  # ...and then another process writes there
        (out / "theirs.txt").write_text("theirs")

    with pytest.raises(atomic.OutputError, match="appeared while this command ran"):
        with atomic.atomic_folder(out, replace=True, check=check):
            pytest.fail("the body must not run")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and siblings(tmp_path, "out") == []
    path = tmp_path / "x.yaml"

    def check_file():
        assert not path.exists()
        path.write_text("theirs")

    with pytest.raises(atomic.OutputError, match="appeared while this command ran"):
        with atomic.atomic_file(path, unchanged=True, check=check_file) as fh:
            fh.write("mine")
    assert path.read_text() == "theirs" and siblings(tmp_path, "x.yaml") == []


KILLED_MID_DELETE = r"""
import os, sys
from pathlib import Path
from emomerge.merging import atomic

out = Path(sys.argv[1])
def killed_mid_delete(item):
    # the previous output half deleted, then SIGKILL-like death (no cleanup, no finally)
    (Path(item) / "a.bin").unlink()
    os._exit(9)
atomic._remove = killed_mid_delete
with atomic.atomic_folder(out, replace=True) as tmp:
    (tmp / "new.bin").write_bytes(b"new")
"""


def test_a_previous_output_killed_mid_delete_is_never_restored(tmp_path):
    """Killed while deleting the replaced output: the partial leftover is only ever deleted —
    even once the destination is gone, the sweep must not put a half-deleted folder back."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.bin").write_bytes(b"previous a")
    (out / "b.bin").write_bytes(b"previous b")
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_DELETE, str(out)], check=False)
    assert proc.returncode == 9
    assert sorted(p.name for p in out.iterdir()) == ["new.bin"]
    (name,) = siblings(tmp_path, "out")
    leftover = tmp_path / name
    assert name.startswith(".out.del-")
    assert sorted(p.name for p in leftover.iterdir()) == ["b.bin"]
    # the user removes the new output; the next sweep deletes the leftover, restores nothing
    for p in out.iterdir():
        p.unlink()
    out.rmdir()
    notes: list[str] = []
    assert atomic.sweep_stale(out, note=notes.append) == [leftover]
    assert not out.exists() and not leftover.exists()
    assert notes and notes[0].startswith(f"note: removed {leftover}")
