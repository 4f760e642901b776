"""The unified sample every reader yields, and helpers shared by the readers."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from emomerge.merging.errors import InputError

#: Side of the grey placeholder image used for missing files under ``allow_missing_images``.
PLACEHOLDER_SIZE = 64


@dataclass
class Sample:
    """One training/evaluation example in the format every model family consumes.

    ``messages`` holds the chat without the answer: the user turn's content is a list of
    ``{"type": "image"}`` entries (one per image, in order) followed by ``{"type": "text"}``.
    """

    id: str
    images: list[str | Image.Image]
    messages: list[dict[str, Any]]
    target: str
    labels: list[str]
    label_set: list[str]
    group: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_text(self) -> str:
        """The text of the (last) user turn."""
        for part in self.messages[-1]["content"]:
            if part.get("type") == "text":
                return str(part["text"])
        return ""


def content_id(sample: Sample) -> str:
    """What makes two samples the same input, for the train/evaluation overlap check.

    ``meta["content_id"]`` when the reader sets one (ids built from a row position, or made
    unique with one, say nothing about content), else the sample's id.
    """
    return str(sample.meta.get("content_id") or sample.id)


@dataclass
class ReadReport:
    """What a reader saw while parsing one split: counts a researcher checks before training."""

    dataset: str
    split: str
    samples: int = 0
    missing_images: int = 0
    #: Repairs made to malformed fields, by kind (e.g. ``unquoted_label_list``).
    repairs: Counter = field(default_factory=Counter)
    label_counts: Counter = field(default_factory=Counter)
    #: How many label-bearing units carry 1, 2, 3... labels ("1": n, "2": m).
    labels_per_item: Counter = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (sorted keys so output is stable)."""
        return {
            "dataset": self.dataset,
            "split": self.split,
            "samples": self.samples,
            **self.extra,
            "label_counts": dict(sorted(self.label_counts.items())),
            "multi_label_counts": {str(k): v for k, v in sorted(self.labels_per_item.items())},
            "missing_images": self.missing_images,
            "repairs": dict(sorted(self.repairs.items())),
        }


def user_message(n_images: int, text: str) -> list[dict[str, Any]]:
    """A one-turn chat: ``n_images`` image slots then the text (the order all families accept)."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def placeholder_image() -> Image.Image:
    """A mid-grey square standing in for an image file that is not on disk."""
    return Image.new("RGB", (PLACEHOLDER_SIZE, PLACEHOLDER_SIZE), (128, 128, 128))


def _inside(root: str | Path, path: str | Path) -> bool:
    base = os.path.normpath(os.path.abspath(root))
    return Path(os.path.normpath(os.path.abspath(path))).is_relative_to(base)


def relative_inside(root: Path, relative: str, where: str) -> Path:
    """``relative`` as a clean path below ``root`` (no ``..``), or an :class:`InputError`.

    Backslashes count as separators (EmoArt's paths are Windows paths), so ``..\\..\\x.jpg``
    and ``../x.jpg`` are both caught. An anchor (``/``, ``C:\\``) is dropped, as the readers
    always looked such paths up below the root. The check is lexical, not ``resolve()``: a
    symlink the user placed inside the root (``images -> /mnt/big/images``) is theirs to
    make, a ``..`` written in a data file is not.
    """
    parts: list[str] = []
    for i, part in enumerate(str(relative).replace("\\", "/").split("/")):
        if part in ("", ".") or (i == 0 and re.fullmatch(r"[A-Za-z]:", part)):
            continue
        if part == "..":
            if not parts:
                raise InputError(
                    f"{where}: image path {relative!r} resolves outside the dataset root {root}"
                )
            parts.pop()
        else:
            parts.append(part)
    if not parts:
        raise InputError(f"{where}: image path {relative!r} names no file")
    return Path(*parts)


class ImageResolver:
    """Find image files; count the missing ones and substitute placeholders when allowed.

    With ``root``, a candidate outside it (a ``..`` or an absolute path from a data row) is
    refused, naming ``where`` (the file and row), before anything is looked up.
    """

    def __init__(self, report: ReadReport, allow_missing: bool, root: Path | None = None) -> None:
        self.report = report
        self.allow_missing = allow_missing
        self.root = root

    def resolve(self, candidates: list[Path], where: str = "") -> str | Image.Image | None:
        """The first existing candidate path; a placeholder or ``None`` when none exists."""
        for cand in candidates:
            if self.root is not None and not _inside(self.root, cand):
                raise InputError(
                    f"{where or self.report.dataset}: image path {str(cand)!r} "
                    f"resolves outside the dataset root {self.root}"
                )
        for cand in candidates:
            if cand.is_file():
                return str(cand)
        self.report.missing_images += 1
        return placeholder_image() if self.allow_missing else None

    def warn_if_dropped(self) -> None:
        """One warning for the whole split rather than one per sample."""
        if self.report.missing_images and not self.allow_missing:
            warnings.warn(
                f"{self.report.dataset}/{self.report.split}: {self.report.missing_images} image files "
                "missing, their samples were skipped (use allow_missing_images / "
                "--allow-missing-images for a grey placeholder)",
                stacklevel=3,
            )


def image_from_bytes(cell: Any) -> Image.Image | None:
    """Decode a ``datasets.Image`` parquet cell (``{"bytes", "path"}``) lazily."""
    if cell is None:
        return None
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not data:
        return None
    return Image.open(io.BytesIO(data))


def normalize_split(split: str, available: list[str], source: Path) -> str:
    """Match a user split name case-insensitively against the splits present in the data."""
    lookup = {s.lower(): s for s in available}
    if split.lower() not in lookup:
        raise InputError(
            f"{source}: split '{split}' not found (available: {', '.join(sorted(available))})"
        )
    return lookup[split.lower()]


def samples_sha256(samples: list[Sample]) -> str:
    """A content hash of a split as the model sees it: ids, prompts, targets, image identities.

    Image files are identified by name and size (hashing every pixel of a 100k-image set at each
    stage start would cost minutes); in-memory images by their bytes.
    """
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.id, s.messages, s.target, s.labels], ensure_ascii=False).encode())
        for img in s.images:
            if isinstance(img, str):
                p = Path(img)
                h.update(f"{p.name}:{p.stat().st_size if p.exists() else -1}".encode())
            else:
                h.update(img.tobytes())
    return h.hexdigest()
