"""Books held out of a training split (EmoComics35 has no validation split).

Pages of one book share characters, art and style; a random utterance split would leak them
between validation and train, so a validation part is carved out *by book*, with a seeded draw.
Training drops those books (stage option ``holdout``) and evaluation picks its multi-label
threshold on them, so the threshold is chosen on data no stage trained on.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from emomerge.merging.errors import InputError

#: ``Sample.meta`` keys that name a sample's book, in order of preference.
BOOK_KEYS = ("file_nr", "book", "title")


def has_book(sample: Any) -> bool:
    """Whether a sample names its book in ``meta`` (EmoComics35 ``file_nr``, Manga109 ``title``)."""
    return any(sample.meta.get(key) not in (None, "") for key in BOOK_KEYS)


def book_of(sample: Any) -> str:
    """The book of a sample: ``meta['file_nr']`` or ``meta['title']``, else the group's prefix."""
    for key in BOOK_KEYS:
        if sample.meta.get(key) not in (None, ""):
            return str(sample.meta[key])
    return str(sample.group).split("-p")[0]


def holdout_books(samples: list[Any], fraction: float = 0.1, seed: int = 0) -> list[str]:
    """The held-out books: ``ceil(fraction × #books)`` (at least one, never all), seeded."""
    if not 0 < fraction < 1:
        raise InputError(f"--val-fraction must be in (0, 1), got {fraction}")
    books = sorted({book_of(s) for s in samples})
    if len(books) < 2:
        raise InputError("validation by book needs at least two books in the train split")
    k = min(len(books) - 1, max(1, math.ceil(fraction * len(books))))
    rng = np.random.default_rng(seed)
    return sorted(books[i] for i in rng.choice(len(books), size=k, replace=False))


def holdout_by_book(samples: list[Any], fraction: float = 0.1, seed: int = 0) -> list[Any]:
    """The samples of the held-out books (the validation part)."""
    keep = set(holdout_books(samples, fraction, seed))
    return [s for s in samples if book_of(s) in keep]


def without_books(samples: list[Any], books: list[str]) -> list[Any]:
    """The samples whose book is not in ``books`` (what a stage with a holdout trains on)."""
    drop = set(books)
    return [s for s in samples if book_of(s) not in drop]
