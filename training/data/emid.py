"""EMID readers: the emotion-matching parquet (yes/no VQA) and the original image+tag layout.

- ``matching``: rows ``audio, sampling_rate, image, same, emotion, question, answer`` with answers
  ``yes - {emotion}`` / ``no``. The VLM stage sees the image and the question; the audio column is
  never read (parquet column projection), so nothing is decoded needlessly.
- ``image_emotion``: the original ``EMID_data.csv`` (``Image{1,2,3}_filename``, ``Image{k}_tag``)
  with the image files under the root; one sample per distinct image, labelled with its Mikels
  emotion tag. EMID has no published split: an image's split is a stable hash of its file name.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

from emomerge.merging.errors import InputError

from .emoart import hash_split
from .parquet import iter_rows, parquet_splits
from .sample import (
    ImageResolver,
    ReadReport,
    Sample,
    image_from_bytes,
    normalize_split,
    relative_inside,
    user_message,
)

LABELS = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]
TASKS = ("matching", "image_emotion")
MATCH_COLUMNS = ["image", "same", "emotion", "question", "answer"]
CSV_NAME = "EMID_data.csv"
#: The columns of ``EMID_data.csv`` the image-emotion task reads.
CSV_COLUMNS = [f"Image{k}_{part}" for k in (1, 2, 3) for part in ("filename", "tag")]


def _default_task(path: Path) -> str:
    has_csv = (path / CSV_NAME).is_file() if path.is_dir() else path.name == CSV_NAME
    return "image_emotion" if has_csv and not list(path.rglob("*.parquet")) else "matching"


def _read_matching(path: Path, split: str, report: ReadReport) -> list[Sample]:
    shards = parquet_splits(path)
    wanted = normalize_split(split, list(shards), path)
    samples = []
    for i, (file, row_in_file, row) in enumerate(iter_rows(shards[wanted], MATCH_COLUMNS)):
        cell = row["image"]
        if cell is not None and not isinstance(cell, (dict, bytes)):
            raise InputError(
                f"{file} row {row_in_file}: column image holds "
                f"{type(cell).__name__}, not image bytes (wrong schema?)"
            )
        try:
            img = image_from_bytes(row["image"])
        except (OSError, TypeError, ValueError) as exc:  # PIL's UnidentifiedImageError: OSError
            raise InputError(
                f"{file} row {row_in_file}: column image is not a readable image "
                f"({exc.__class__.__name__})"
            ) from exc
        if img is None:
            report.missing_images += 1
            continue
        answer = str(row["answer"]).strip()
        label = "yes" if answer.lower().startswith("yes") else "no"
        report.label_counts[label] += 1
        report.labels_per_item[1] += 1
        sid = f"{wanted}-{i:06d}"
        samples.append(
            Sample(
                id=sid,
                images=[img],
                messages=user_message(1, f"{row['question']}\nAnswer 'yes - <emotion>' or 'no'."),
                target=answer,
                labels=[label],
                label_set=["yes", "no"],
                group=sid,
                meta={
                    "emotion": row["emotion"] or None,
                    "same": bool(row["same"]),
                    "content_id": _content_id(row),
                },
            )
        )
    return samples


def _content_id(row: dict[str, Any]) -> str:
    """A hash of what the model sees (image bytes + question).

    Ids are row positions (``train-000012``), which never collide across splits; the
    train/evaluation overlap check compares this instead.
    """
    cell = row["image"]
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    h = hashlib.sha256(data or b"")
    h.update(b"\0" + str(row["question"]).encode())
    return "emid-" + h.hexdigest()[:32]


def _collect_tags(
    row: dict[str, Any], where: str, report: ReadReport, seen: dict[str, str], root: Path
) -> None:
    """Record each image's Mikels tag from one CSV row (the first tag wins on a conflict)."""
    for k in (1, 2, 3):
        name, tag = row.get(f"Image{k}_filename"), row.get(f"Image{k}_tag")
        if not name or not tag:
            continue
        label = tag.strip().lower()
        if label not in LABELS:
            raise InputError(f"{where}: Image{k}_tag {tag!r} not in {LABELS}")
        name = relative_inside(root, name, f"{where} column Image{k}_filename").as_posix()
        if seen.setdefault(name, label) != label:
            report.repairs["conflicting_tag_first_kept"] += 1


def _read_image_emotion(
    path: Path, split: str, report: ReadReport, root: Path, allow_missing: bool
) -> list[Sample]:
    csv_path = path if path.is_file() else path / CSV_NAME
    if not csv_path.is_file():
        raise InputError(f"{path}: no {CSV_NAME} (the original EMID layout)")
    wanted = normalize_split(split, ["train", "val", "test"], csv_path)
    seen: dict[str, str] = {}
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        try:
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{csv_path}: missing columns {missing}")
            for row in reader:
                _collect_tags(row, f"{csv_path}:{reader.line_num}", report, seen, root)
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{csv_path}: not a UTF-8 text file (near line {reader.line_num + 1})"
            ) from exc
        except csv.Error as exc:
            raise InputError(f"{csv_path}:{reader.line_num}: not valid CSV ({exc})") from exc
    images = ImageResolver(report, allow_missing, root)
    prompt = (
        "Which emotion does this image evoke? Choose one of: "
        f"{', '.join(LABELS)}. Answer with the emotion only."
    )
    samples = []
    for name, label in sorted(seen.items()):
        if hash_split(name) != wanted:
            continue
        report.label_counts[label] += 1
        report.labels_per_item[1] += 1
        img = images.resolve(
            [
                root / name,
                root / "images" / name,
                root / label / name,
                root / "images" / label / name,
            ]
        )
        if img is None:
            continue
        samples.append(
            Sample(
                id=name,
                images=[img],
                messages=user_message(1, prompt),
                target=label,
                labels=[label],
                label_set=list(LABELS),
                group=name,
            )
        )
    images.warn_if_dropped()
    return samples


def read_emid(
    path: Path,
    split: str,
    task: str | None = None,
    *,
    image_root: str | Path | None = None,
    allow_missing_images: bool = False,
    **_: Any,
) -> tuple[list[Sample], ReadReport]:
    """Read one split of the matching task (parquet) or the image-emotion task (original CSV)."""
    task = task or _default_task(path)
    if task not in TASKS:
        raise InputError(f"emid: unknown task '{task}' (expected one of {list(TASKS)})")
    report = ReadReport("emid", split, extra={"task": task})
    if task == "matching":
        samples = _read_matching(path, split, report)
    else:
        root = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
        samples = _read_image_emotion(path, split, report, root, allow_missing_images)
    report.samples = len(samples)
    return samples, report


def list_splits(path: Path, task: str | None = None) -> list[str]:
    """Parquet splits for ``matching``; the hash splits for ``image_emotion``."""
    if (task or _default_task(path)) == "matching":
        return sorted(parquet_splits(path))
    return ["train", "val", "test"]
