"""The EmoComics35 reader parses every row of the published annotation file."""

from __future__ import annotations

import ast
import csv
from collections import Counter

import pytest

from emomerge.training.data import inspect_dataset, read_dataset, read_with_report

CSV_NAME = "emocomics35/emocomics35_pg_images_original.csv"

# Counted independently of the reader (see test_counts_match_an_independent_parse); pinned so a
# regression in either shows up.
EXPECTED = {
    "TRAIN": {
        "pages": 718,
        "utterances": 5803,
        "unquoted": 330,
        "labels": {
            "Anger": 1927,
            "Disgust": 277,
            "Fear": 1429,
            "Joy": 1390,
            "Neutral": 330,
            "Sadness": 1448,
            "Surprise": 1485,
        },
        "per_item": {"1": 3581, "2": 1965, "3": 253, "4": 4},
    },
    "TEST": {
        "pages": 156,
        "utterances": 1326,
        "unquoted": 109,
        "labels": {
            "Anger": 454,
            "Disgust": 50,
            "Fear": 299,
            "Joy": 297,
            "Neutral": 109,
            "Sadness": 344,
            "Surprise": 355,
        },
        "per_item": {"1": 814, "2": 445, "3": 64, "4": 3},
    },
}


@pytest.fixture(scope="module")
def real_csv(shared_data):
    path = shared_data / CSV_NAME
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def test_plain_literal_eval_fails_on_the_real_file(real_csv):
    """The quirk the reader must handle really is in the file."""
    failures = 0
    with real_csv.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            for entry in ast.literal_eval(row["PageEmotions"]):
                try:
                    ast.literal_eval(entry)
                except (ValueError, SyntaxError):
                    failures += 1
    assert failures == 439


def test_every_row_parsed_with_pinned_counts(real_csv):
    report = inspect_dataset("emocomics35", real_csv)
    assert set(report["splits"]) == {"TRAIN", "TEST"}
    for split, want in EXPECTED.items():
        got = report["splits"][split]
        assert got["pages"] == want["pages"]
        assert got["utterances"] == got["samples"] == want["utterances"]
        assert got["label_counts"] == want["labels"]
        assert got["multi_label_counts"] == want["per_item"]
        assert got["repairs"] == {"unquoted_label_list": want["unquoted"]}
        # Images are not public: every page is reported missing.
        assert got["missing_images"] == want["pages"]


def test_counts_match_an_independent_parse(real_csv):
    """Label counts from a regex-free, split-by-hand parse of the same file."""
    labels: dict[str, Counter] = {"TRAIN": Counter(), "TEST": Counter()}
    for row in csv.DictReader(real_csv.open(newline="", encoding="utf-8")):
        for entry in ast.literal_eval(row["PageEmotions"]):
            names = entry.strip("[]").replace("'", "").split(",")
            labels[row["Split"]].update(n.strip() for n in names)
    for split, counter in labels.items():
        assert dict(counter) == EXPECTED[split]["labels"]


def test_without_images_samples_are_dropped_with_one_warning(real_csv):
    with pytest.warns(UserWarning, match="156 image files missing"):
        samples, report = read_with_report("emocomics35", real_csv, "test")
    assert samples == [] and report.missing_images == 156


def test_page_level_prompts_hold_every_utterance(real_csv):
    import json

    pages = read_dataset("emocomics35", real_csv, "test", task="page", allow_missing_images=True)
    assert len(pages) == 156
    total = 0
    for page in pages:
        answer = json.loads(page.target)
        # The target lists labels in canonical order; meta keeps the annotation order.
        assert [sorted(a["emotions"]) for a in answer] == [
            sorted(u) for u in page.meta["utterance_labels"]
        ]
        total += len(answer)
        assert page.group == page.id
    assert total == 1326
