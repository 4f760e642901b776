"""Dataset readers: each dataset's own published files in, unified :class:`Sample` lists out.

``read_dataset(name, path, split, task=None, **opts)`` is the one entry point; ``opts`` are
``image_root`` (where images live), ``manga109_root`` (MangaVQA) and ``allow_missing_images``
(a grey placeholder instead of dropping samples whose image file is absent).
``read_checked`` also decodes every image once and drops the samples of unreadable ones
(training and evaluation both read their splits through it, or through ``check_images``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emomerge.merging.errors import InputError

from . import emid, emoart, emocomics35, mangavqa
from .sample import ReadReport, Sample, content_id, samples_sha256

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "ReadReport",
    "Sample",
    "content_id",
    "inspect_dataset",
    "list_splits",
    "read_checked",
    "read_dataset",
    "read_with_report",
    "samples_sha256",
]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: its reader, split lister, tasks and default task."""

    reader: Callable[..., tuple[list[Sample], ReadReport]]
    splits: Callable[..., list[str]]
    tasks: tuple[str, ...]


DATASETS: dict[str, DatasetSpec] = {
    "emocomics35": DatasetSpec(
        emocomics35.read_emocomics35, emocomics35.list_splits, emocomics35.TASKS
    ),
    "emoart": DatasetSpec(emoart.read_emoart, emoart.list_splits, emoart.TASKS),
    "emid": DatasetSpec(emid.read_emid, emid.list_splits, emid.TASKS),
    "mangavqa": DatasetSpec(mangavqa.read_mangavqa, mangavqa.list_splits, mangavqa.TASKS),
}


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise InputError(f"unknown dataset '{name}' (expected one of {sorted(DATASETS)})")
    return DATASETS[name]


def read_with_report(
    name: str, path: str | Path, split: str, task: str | None = None, **opts: Any
) -> tuple[list[Sample], ReadReport]:
    """Read one split of a dataset and the report of what parsing saw."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    return _spec(name).reader(path, split, task, **opts)


def read_dataset(
    name: str, path: str | Path, split: str, task: str | None = None, **opts: Any
) -> list[Sample]:
    """Read one split of ``name`` ("emocomics35", "emoart", "emid", "mangavqa") as samples."""
    return read_with_report(name, path, split, task, **opts)[0]


def read_checked(
    name: str,
    path: str | Path,
    split: str,
    task: str | None = None,
    *,
    max_bad_image_share: float | None = None,
    **opts: Any,
) -> tuple[list[Sample], int]:
    """``read_dataset`` without the samples whose images do not decode, and how many image
    files were skipped (the ``skipped_images`` a leaderboard row or stage metadata reports).

    More than ``max_bad_image_share`` (default 5 %) unreadable is an :class:`InputError`
    naming ``path`` and ``split`` (``training.models.batching.check_images``).
    """
    from ..models.batching import MAX_BAD_IMAGE_SHARE, check_images  # batching imports this package

    share = MAX_BAD_IMAGE_SHARE if max_bad_image_share is None else max_bad_image_share
    samples = read_dataset(name, path, split, task, **opts)
    return check_images(samples, max_bad_share=share, where=f"{path} split '{split}'")


def list_splits(name: str, path: str | Path, task: str | None = None) -> list[str]:
    """The splits present in a dataset's files."""
    spec, path = _spec(name), Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    return spec.splits(path, task) if name == "emid" else spec.splits(path)


def inspect_dataset(
    name: str, path: str | Path, task: str | None = None, **opts: Any
) -> dict[str, Any]:
    """Per-split counts (samples, labels, multi-label, missing images, repairs) for a dataset."""
    # Placeholders keep samples whose image is missing, so counts cover the whole annotation.
    opts = {**opts, "allow_missing_images": True}
    splits = {}
    for split in list_splits(name, path, task):
        _, report = read_with_report(name, path, split, task, **opts)
        splits[split] = report.to_dict()
    return {"dataset": name, "path": str(path), "task": task, "splits": splits}
