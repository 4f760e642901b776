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
