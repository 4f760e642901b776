"""A validation part held out from train *by book*; re-exported from the training module.

Training drops the same books from its stages (curriculum stage option ``holdout``) and records
them in each stage's ``emomerge.json`` (``dataset.holdout.books``), so the definition lives in
:mod:`emomerge.training.data.holdout` (evaluation may import training, not the reverse).
"""

from __future__ import annotations

from emomerge.training.data.holdout import book_of, holdout_books, holdout_by_book

__all__ = ["book_of", "holdout_books", "holdout_by_book"]
