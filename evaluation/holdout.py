"""A validation part held out from train *by book* (EmoComics35 has no validation split).

Pages of one book share characters, art and style; a random utterance split would leak them
between validation and train. Books are drawn with a seeded generator.

Note for training: to keep the threshold honest, the training stages should exclude the same
books (``holdout_books`` gives them).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from emomerge.merging.errors import InputError


def book_of(sample: Any) -> str:
    """The book of a sample: ``meta['file_nr']`` or ``meta['title']``, else the group's prefix."""
    for key in ("file_nr", "book", "title"):
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
