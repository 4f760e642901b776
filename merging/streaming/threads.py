"""Worker threads of the streamed merge: how many, and torch ops kept on one thread inside them.

Worker threads run single-threaded torch ops on cache-sized blocks (a 2-core machine shared with
other jobs loses more to OpenMP barriers on small ops than it gains).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch


def default_workers() -> int:
    """Worker threads: the cores this process may use (affinity), at most torch's thread count."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, torch.get_num_threads()))


_THREADS_LOCK = threading.Lock()
_THREADS_STATE = {"depth": 0, "before": 1}


@contextlib.contextmanager
def single_threaded_ops():
    """torch ops on one thread inside (process-wide; nested and concurrent uses are counted,
    the last one out restores the thread count)."""
    with _THREADS_LOCK:
        if _THREADS_STATE["depth"] == 0:
            _THREADS_STATE["before"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_STATE["depth"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_STATE["depth"] -= 1
            if _THREADS_STATE["depth"] == 0:
                torch.set_num_threads(_THREADS_STATE["before"])


def map_tasks(tasks: Sequence[Callable[[], Any]], workers: int) -> list:
    """Run the tasks (one per adapter, or one run of row blocks per worker) on ``workers``
    threads; their results in order."""
    if workers <= 1 or len(tasks) <= 1:
        return [t() for t in tasks]
    with ThreadPoolExecutor(min(workers, len(tasks))) as pool:
        return list(pool.map(lambda t: t(), tasks))
