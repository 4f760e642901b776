"""EmoArt reader: ``Annotation.json`` records with a three-section GPT-4o description.

EmoArt publishes no train/test split, so the split of a record is a stable hash of its
``request_id`` (80 % train, 10 % val, 10 % test): the same record lands in the same split on every
machine, whatever the file order. A record carrying its own ``split`` key keeps it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from emomerge.merging.errors import InputError

from .sample import (
    ImageResolver,
    ReadReport,
    Sample,
    normalize_split,
    relative_inside,
    user_message,
)

LABELS = [
    "Calm",
    "Excited",
    "Contentment",
    "Frustrated",
    "Sad",
    "Aroused",
    "Alarmed",
    "Bored",
    "Happy",
    "Annoyed",
    "Tired",
    "Glad",
]
TASKS = ("dominant_emotion", "valence", "arousal")
SPLITS = ("train", "val", "test")
_CANON = {lab.lower(): lab for lab in LABELS}
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


def find_annotation(path: Path) -> Path:
    """``Annotation.json`` itself or inside the folder."""
    if path.is_file():
        return path
    cand = path / "Annotation.json"
    if not cand.is_file():
        raise InputError(f"{path}: no Annotation.json")
    return cand


def hash_split(key: str) -> str:
    """train/val/test from a stable hash of ``key`` (80/10/10)."""
    bucket = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 80 else "val" if bucket < 90 else "test"


def _description(rec: dict[str, Any], repairs: Counter, where: str) -> dict[str, Any]:
    desc = rec.get("description")
    if isinstance(desc, str):
        # Some exports keep the model's answer as a (possibly fenced) JSON string.
        try:
            desc = json.loads(_FENCE.sub("", desc.strip()))
            repairs["description_as_json_string"] += 1
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: description is not JSON") from exc
    if not isinstance(desc, dict) or "third_section" not in desc:
        raise InputError(f"{where}: description lacks third_section")
    return desc


def load_records(path: Path) -> list[dict[str, Any]]:
    """The raw records of ``Annotation.json`` (a JSON list, or JSON lines)."""
    ann = find_annotation(path)
    try:
        text = ann.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{ann}: not a UTF-8 text file (byte {exc.start})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("["):  # one JSON document: its own error is the useful one
            raise InputError(
                f"{ann}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})"
            ) from exc
        data = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as line_exc:
                raise InputError(
                    f"{ann}:{lineno}: neither a JSON document nor JSON lines "
                    f"({line_exc.msg}, column {line_exc.colno})"
                ) from line_exc
    if isinstance(data, dict):
        data = data.get("data") or data.get("annotations") or list(data.values())
    if not isinstance(data, list):
        raise InputError(f"{ann}: expected a list of records")
    return data


def _prompt(task: str, labels: list[str]) -> str:
    if task == "dominant_emotion":
        return (
            "Look at this artwork. Which emotion does it evoke most strongly? "
            f"Choose one of: {', '.join(labels)}. Answer with the emotion only."
        )
    return (
        f"Look at this artwork. What is its emotional {task}? "
        f"Choose one of: {', '.join(labels)}. Answer with one word."
    )


def read_emoart(
    path: Path,
    split: str,
    task: str | None = None,
    *,
    image_root: str | Path | None = None,
    allow_missing_images: bool = False,
    **_: Any,
) -> tuple[list[Sample], ReadReport]:
    """Read one split for the dominant-emotion (default), valence or arousal task."""
    task = task or "dominant_emotion"
    if task not in TASKS:
        raise InputError(f"emoart: unknown task '{task}' (expected one of {list(TASKS)})")
    ann = find_annotation(path)
    root = Path(image_root) if image_root else ann.parent
    wanted = normalize_split(split, list(SPLITS), ann)
    report = ReadReport("emoart", wanted)
    records = load_records(path)
    parsed = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise InputError(f"{ann} record {i}: expected a JSON object, got {type(rec).__name__}")
        where = f"{ann} record {i} ({rec.get('request_id', '?')})"
        # Every record is parsed (valence/arousal label sets span the file); repairs are
        # counted for the records of this split only.
        repairs: Counter = Counter()
        third = _description(rec, repairs, where)["third_section"]
        if not isinstance(third, dict):
            raise InputError(f"{where}: description.third_section is not an object")
        if not isinstance(rec.get("image_path"), str) or not rec["image_path"].strip():
            raise InputError(f"{where}: key 'image_path' missing or not a string")
        # Windows separators in the published paths: rebuilt portably, and kept below the root.
        rel = relative_inside(root, rec["image_path"], f"{where} key 'image_path'")
        parsed.append((rec, third, repairs, rel))
    if task == "dominant_emotion":
        label_set = list(LABELS)
    else:
        key = f"emotional_{task}" + ("_level" if task == "arousal" else "")
        label_set = sorted({str(t.get(key, "")).strip().lower() for _, t, _, _ in parsed} - {""})
    images = ImageResolver(report, allow_missing_images, root)
    samples: list[Sample] = []
    for rec, third, repairs, rel in parsed:
        rid = str(rec.get("request_id") or rec.get("image_path"))
        if str(rec.get("split") or hash_split(rid)).lower() != wanted:
            continue
        report.repairs.update(repairs)
        if task == "dominant_emotion":
            raw = str(third.get("dominant_emotion", "")).strip()
            label = _CANON.get(raw.lower())
            if label is None:
                report.repairs["skipped_unknown_emotion"] += 1
                continue
            if label != raw:
                report.repairs["label_case_or_space"] += 1
        else:
            label = str(third.get(key, "")).strip().lower()
            if not label:
                report.repairs["skipped_missing_" + task] += 1
                continue
        report.label_counts[label] += 1
        report.labels_per_item[1] += 1
        img = images.resolve([root / rel, root / Path(*rel.parts[1:]), root / rel.name])
        if img is None:
            continue
        samples.append(
            Sample(
                id=rid,
                images=[img],
                messages=user_message(1, _prompt(task, label_set)),
                target=label,
                labels=[label],
                label_set=label_set,
                group=rid,
                meta={
                    "style": rel.parts[-2] if len(rel.parts) > 1 else "",
                    "valence": third.get("emotional_valence"),
                    "arousal": third.get("emotional_arousal_level"),
                },
            )
        )
    images.warn_if_dropped()
    report.samples = len(samples)
    return samples, report


def list_splits(path: Path) -> list[str]:
    """EmoArt's hash splits."""
    return list(SPLITS)
