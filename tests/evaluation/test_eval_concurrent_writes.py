"""Concurrent evaluations into one results folder keep every row (DESIGN.md, Outputs): the
leaderboard's and by_book.csv's read-modify-write holds the file's lock from read to write."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from pathlib import Path

from emomerge.evaluation.bybook import read_by_book, write_by_book
from emomerge.evaluation.leaderboard import read_rows, upsert_rows
from emomerge.merging import atomic

N = 40  # rows per process: without the lock, two writers lost a third of them


def _leaderboard_writer(path: Path, tag: str, start) -> None:
    start.wait()
    for i in range(N):
        upsert_rows(
            path,
            [
                {
                    "architecture": "qwen2_vl",
                    "base_id": "b",
                    "variant": f"{tag}-{i}",
                    "dataset": "d",
                    "split": "test",
                    "config_hash": "h",
                }
            ],
        )


def _by_book_writer(path: Path, tag: str, start) -> None:
    start.wait()
    for i in range(N):
        write_by_book(
            path,
            [
                {
                    "architecture": "a",
                    "base_id": "b",
                    "variant": f"{tag}-{i}",
                    "dataset": "d",
                    "split": "test",
                    "config_hash": "h",
                    "level": "book",
                    "book": "1",
                    "series": "",
                }
            ],
        )


def _race(target, path: Path) -> None:
    ctx = mp.get_context("fork")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=target, args=(path, tag, start)) for tag in "AB"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]


def test_two_processes_upserting_one_leaderboard_lose_no_row(tmp_path):
    path = tmp_path / "leaderboard.csv"
    _race(_leaderboard_writer, path)
    variants = sorted(r["variant"] for r in read_rows(path))
    assert variants == sorted(f"{t}-{i}" for t in "AB" for i in range(N))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leaderboard.csv"]  # lock released


def test_two_processes_writing_one_by_book_table_lose_no_row(tmp_path):
    path = tmp_path / "by_book.csv"
    _race(_by_book_writer, path)
    variants = sorted(r["variant"] for r in read_by_book(path))
    assert variants == sorted(f"{t}-{i}" for t in "AB" for i in range(N))


def test_the_lock_is_reentrant_and_times_out_naming_the_file(tmp_path):
    path = tmp_path / "leaderboard.csv"
    with atomic.file_lock(path):
        # the runner holds it around upsert → Holm → upsert; upsert_rows takes it again
        upsert_rows(path, [{"variant": "x", "dataset": "d", "split": "test"}])
        assert atomic.lock_path(path).exists()
        # another process waits, then gives up with one line naming the file
        ctx = mp.get_context("fork")
        queue = ctx.Queue()

        def wait_for_it() -> None:
            try:
                with atomic.file_lock(path, timeout=0.3):
                    queue.put("acquired")
            except atomic.OutputError as exc:
                queue.put(str(exc))

        proc = ctx.Process(target=wait_for_it)
        proc.start()
        message = queue.get(timeout=30)
        proc.join(30)
        assert message.startswith(f"{path}: still locked by another emomerge (pid ")
        assert str(atomic.lock_path(path)) in message and "\n" not in message
    assert not atomic.lock_path(path).exists()
    # released: another thread gets it at once
    got: list[bool] = []

    def take() -> None:
        with atomic.file_lock(path, timeout=5):
            got.append(True)

    thread = threading.Thread(target=take)
    thread.start()
    thread.join(10)
    assert got == [True]


def test_a_lock_file_unlinked_by_its_holder_is_not_trusted(tmp_path, monkeypatch):
    """A waiter that locks the file its previous holder unlinked must start again on the
    current one (else two processes would both think they hold the lock)."""
    path = tmp_path / "by_book.csv"
    lock = atomic.lock_path(path)
    real_flock = atomic.fcntl.flock
    calls = {"n": 0}

    def flock_after_a_release(fd: int, op: int) -> None:
        real_flock(fd, op)
        calls["n"] += 1
        if calls["n"] == 1:  # the previous holder releases: unlinks the file we just locked
            lock.unlink()

    monkeypatch.setattr(atomic.fcntl, "flock", flock_after_a_release)
    with atomic.file_lock(path):
        assert calls["n"] == 2 and lock.exists()
        _pid, fd, _depth = atomic._HELD[os.path.abspath(lock)]
        assert os.fstat(fd).st_ino == lock.stat().st_ino  # the file others will open
