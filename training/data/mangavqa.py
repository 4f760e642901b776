"""MangaVQA reader: Japanese questions about Manga109 pages (parquet + a Manga109 image root).

Two column spellings occur in the published files: ``answer_type`` (train) and
``understanding_type`` (test); both are kept in ``meta["type"]``.

Each sample names the manga page its image is: ``meta["page_id"]`` = ``{title}/{image_number:03d}``
(the Manga109 image file, independent of where the images are stored). The train/evaluation
overlap check compares these pages, not rows: a training question about a test page (another
question, same page) still shows the model the page and the text its test answers are read from.
``meta["question"]`` keeps the question as asked (the prompt appends an answer instruction), for
the MangaVQA judge's published prompt.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from emomerge.merging.errors import InputError

from .parquet import iter_rows, parquet_splits
from .sample import ImageResolver, ReadReport, Sample, normalize_split, user_message

COLUMNS = ["title", "image_number", "question", "answer"]
OPTIONAL = ["required_info", "w5h1", "answer_type", "understanding_type"]
TASKS = ("vqa",)
INSTRUCTION = "簡潔に日本語で答えてください。"


def read_mangavqa(
    path: Path,
    split: str,
    task: str | None = None,
    *,
    image_root: str | Path | None = None,
    manga109_root: str | Path | None = None,
    allow_missing_images: bool = False,
    **_: Any,
) -> tuple[list[Sample], ReadReport]:
    """Read one split; images from ``<manga109_root>/images/{title}/{image_number:03d}.jpg``."""
    shards = parquet_splits(path)
    wanted = normalize_split(split, list(shards), path)
    root_arg = manga109_root or image_root
    root = Path(root_arg) if root_arg else (path if path.is_dir() else path.parent)
    report = ReadReport("mangavqa", wanted)
    images = ImageResolver(report, allow_missing_images, root)
    samples = []
    for index, (file, i, row) in enumerate(iter_rows(shards[wanted], COLUMNS, OPTIONAL)):
        title = str(row["title"])
        try:
            num = int(row["image_number"])
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"{file} row {i}: image_number is not an integer ({row['image_number']!r})"
            ) from exc
        qhash = hashlib.sha1(str(row["question"]).encode()).hexdigest()[:10]
        # The same question on the same page can recur with another gold answer: the row's
        # position in the split makes the id unique; the content id (page + question) says two
        # rows are the same input, and the page id what the train/evaluation check compares.
        content = f"{title}-{num:03d}-{qhash}"
        sid = f"{content}-r{index:06d}"
        qtype = row.get("answer_type") or row.get("understanding_type")
        report.label_counts[str(qtype or "unknown")] += 1
        img = images.resolve(
            [root / "images" / title / f"{num:03d}.jpg", root / title / f"{num:03d}.jpg"],
            where=f"{file} row {i}",
        )
        if img is None:
            continue
        answer = str(row["answer"]).strip()
        samples.append(
            Sample(
                id=sid,
                images=[img],
                messages=user_message(1, f"{row['question']}\n{INSTRUCTION}"),
                target=answer,
                labels=[answer],
                label_set=[],
                group=sid,
                meta={
                    "title": title,
                    "image_number": num,
                    "type": qtype,
                    "required_info": row.get("required_info"),
                    "w5h1": row.get("w5h1"),
                    "content_id": content,
                    "page_id": page_id(title, num),
                    "question": str(row["question"]),
                },
            )
        )
    images.warn_if_dropped()
    report.samples = len(samples)
    return samples, report


def page_id(title: str, image_number: int) -> str:
    """The Manga109 page an item is about: ``{title}/{image_number:03d}``, the image file's path
    below ``images/`` without its extension (title stripped: a stray space must not hide a
    shared page)."""
    return f"{title.strip()}/{int(image_number):03d}"


def list_splits(path: Path) -> list[str]:
    """Split names of the parquet shards (``train``, ``test``...)."""
    return sorted(parquet_splits(path))
