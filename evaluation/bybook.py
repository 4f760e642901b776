"""Per-book results: each variant's metrics on the samples of each book (and series, if known).

A merge can win on average by doing well on two long books and badly on the rest; the per-book
table shows whether a gain is broad. Books come from the samples (:func:`holdout.book_of`:
EmoComics35 ``FileNr``, Manga109 ``title``). Neither reader knows of series: EmoComics35 carries
only ``FileNr`` and ``ComicBookTitle`` (one title per book), so series rows exist only when the
caller passes a ``series_of`` mapping; nothing here guesses one from titles.

Values are point values on the book's samples (the metric definitions of :mod:`.metrics`,
macro-F1 over the full label set); a book has too few pages for a useful interval of its own.
``by_book.csv`` sits beside ``leaderboard.csv`` and is upserted the same way: atomically, rows
replaced by key, so re-running one evaluation replaces its own rows and keeps the others.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emomerge.merging.atomic import atomic_file, file_lock
from emomerge.merging.errors import InputError
from emomerge.training.data.holdout import book_of as _book_of
from emomerge.training.data.holdout import has_book

from .leaderboard import METRIC_COLUMNS, _num, fmt_value, format_table, read_csv
from .metrics import METRICS, Predictions

FILENAME = "by_book.csv"

#: ``level`` of a row: the unit its samples share.
LEVELS = ("book", "series")

BY_BOOK_COLUMNS: tuple[str, ...] = (
    "architecture",
    "base_id",
    "dataset",
    "split",
    "task",
    "mode",
    "baseline",
    "seed",
    "n_boot",
    "emomerge_version",
    "git_hash",
    "date",
    "config_hash",
    "split_hash",
    "variant",
    "level",
    "book",
    "title",
    "series",
    "n",
    "n_groups",
    *METRIC_COLUMNS,
)

#: The columns a by-book row copies from its evaluation's leaderboard rows (all before
#: ``variant``): what was evaluated, on which base, how, and when.
BY_BOOK_IDENTITY: tuple[str, ...] = BY_BOOK_COLUMNS[: BY_BOOK_COLUMNS.index("variant")]

#: The columns that identify a row: a row with the same values is replaced on upsert.
BY_BOOK_KEY = (
    "architecture",
    "base_id",
    "variant",
    "dataset",
    "split",
    "config_hash",
    "level",
    "book",
    "series",
)


def book_map(samples: Sequence[Any]) -> dict[str, str] | None:
    """Sample id → book, or None when the samples do not name their books (EmoArt, EMID: the
    group-prefix fallback of ``book_of`` would make every sample its own "book")."""
    if not samples or not all(has_book(s) for s in samples):
        return None
    return {s.id: _book_of(s) for s in samples}


def title_map(samples: Sequence[Any]) -> dict[str, str]:
    """Book → its title where the samples carry one apart from the book key (EmoComics35's
    ``ComicBookTitle`` next to ``FileNr``)."""
    out: dict[str, str] = {}
    for s in samples:
        title = s.meta.get("title")
        if title not in (None, "") and str(title) != _book_of(s):
            out.setdefault(_book_of(s), str(title))
    return out


def _unit_of(mapping: dict[str, str], pid: str, what: str) -> str:
    # page-level answers are scored per utterance, ids "<sample id>#u000" (outputs.from_generation)
    if pid in mapping:
        return mapping[pid]
    base = pid.rsplit("#u", 1)[0]
    if base in mapping:
        return mapping[base]
    raise ValueError(f"{what}: no entry for prediction id {pid!r}")


def by_book_rows(
    named: list[tuple[str, Predictions]],
    book_of: dict[str, str],
    series_of: dict[str, str] | None,
    metrics: Sequence[str],
    *,
    titles: dict[str, str] | None = None,
    **common: Any,
) -> list[dict[str, Any]]:
    """One row per variant × book (then per variant × series when ``series_of`` is given).

    ``book_of`` / ``series_of`` map sample ids (as in ``Sample.id``) to a book / series;
    ``titles`` maps a book to the title shown next to it. A book row has ``level`` "book" and
    its ``book`` (and ``series``, when known); a series row has ``level`` "series" and only
    ``series``. Each row holds ``n`` (scored units), ``n_groups`` (pages) and the point value
    of each of ``metrics`` on those samples; ``common`` fills the identity columns
    (architecture, dataset, config_hash...).
    """
    unknown = set(common) - set(BY_BOOK_COLUMNS)
    if unknown:
        raise ValueError(f"by-book row has unknown columns {sorted(unknown)}")
    rows = []
    for name, p in named:
        books = [_unit_of(book_of, pid, "book map") for pid in p.ids]
        series = [_unit_of(series_of, pid, "series map") for pid in p.ids] if series_of else None
        units: dict[tuple[str, str], list[int]] = {}
        for i, book in enumerate(books):
            units.setdefault(("book", book), []).append(i)
        for i, ser in enumerate(series or []):
            units.setdefault(("series", ser), []).append(i)
        for level, unit in sorted(units, key=lambda k: (LEVELS.index(k[0]), _natural(k[1]))):
            idx = np.asarray(units[level, unit], dtype=int)
            if level == "book":
                known = {series[i] for i in idx} if series else set()
                ident = {
                    "book": unit,
                    "title": (titles or {}).get(unit, ""),
                    "series": known.pop() if len(known) == 1 else "",
                }
            else:
                ident = {"book": "", "title": "", "series": unit}
            row: dict[str, Any] = {
                **common,
                "variant": name,
                "level": level,
                **ident,
                "n": len(idx),
                "n_groups": len({p.groups[i] for i in idx}),
            }
            for m in metrics:
                row[m] = METRICS[m].fn(p, idx)
            rows.append(row)
    return rows


def _natural(key: str) -> tuple[int, float, str]:
    # FileNr keys are numbers written as text: "9" before "10"
    try:
        return (0, float(key), key)
    except ValueError:
        return (1, 0.0, key)


def read_by_book(path: str | Path) -> list[dict[str, str]]:
    """The rows of a ``by_book.csv``; a missing file or another CSV is an :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"{path}: no such file (per-book rows are written by "
            "`emomerge evaluate` beside the leaderboard)"
        )
    header, rows = read_csv(path, "an emomerge by-book table")
    if header != BY_BOOK_COLUMNS:
        raise InputError(f"{path}: not an emomerge by-book table (header differs)")
    return [{c: r.get(c) or "" for c in BY_BOOK_COLUMNS} for r in rows]


def write_by_book(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Upsert ``rows`` into the ``by_book.csv`` at ``path`` (rows with the same
    :data:`BY_BOOK_KEY` replaced), through a temporary file and ``os.replace``, holding the
    file's lock from the read to the write (concurrent evaluations keep every row)."""
    path = Path(path)
    cells = []
    for row in rows:
        unknown = set(row) - set(BY_BOOK_COLUMNS)
        if unknown:
            raise ValueError(f"by-book row has unknown columns {sorted(unknown)}")
        cells.append({c: fmt_value(row.get(c)) for c in BY_BOOK_COLUMNS})
    keys = {tuple(r[k] for k in BY_BOOK_KEY) for r in cells}
    with file_lock(path):  # across the read and the write, as the leaderboard's upsert
        kept = [
            r
            for r in (read_by_book(path) if path.exists() else [])
            if tuple(r[k] for k in BY_BOOK_KEY) not in keys
        ]
        with atomic_file(path, newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=BY_BOOK_COLUMNS)
            writer.writeheader()
            writer.writerows(kept + cells)
    return path


def show_by_book(path: str | Path, *, metric: str | None = None, fmt: str = "markdown") -> str:
    """Variants × books (then series) of one metric from a ``by_book.csv``.

    One line per (dataset, split, variant); when the file holds several evaluations of one
    (dataset, split, variant, book), the last row counts. ``metric`` defaults to macro-F1 when
    the file has it, else its first metric.
    """
    rows = read_by_book(path)
    present = [m for m in METRIC_COLUMNS if any(r[m] for r in rows)]
    if metric is None:
        if not present:
            raise InputError(f"{path}: no metric values")
        metric = "macro_f1" if "macro_f1" in present else present[0]
    elif metric not in present:
        raise InputError(
            f"--metric: '{metric}' has no value in {path} "
            f"(available: {', '.join(present) or 'none'})"
        )
    columns: dict[tuple[str, str], str] = {}
    cells: dict[tuple[str, str, str], dict[tuple[str, str], str]] = {}
    for r in rows:
        unit = r["book"] if r["level"] == "book" else r["series"]
        col = (r["level"], unit)
        if col not in columns:
            label = unit + (f" ({r['title']})" if r["title"] else "")
            columns[col] = f"series {label}" if r["level"] == "series" else label
        v = _num(r[metric])
        cells.setdefault((r["dataset"], r["split"], r["variant"]), {})[col] = (
            "" if math.isnan(v) else f"{v:.4f}"
        )
    order = sorted(
        columns, key=lambda c: (LEVELS.index(c[0]) if c[0] in LEVELS else 2, _natural(c[1]))
    )
    header = ["dataset", "split", "variant", "metric"] + [columns[c] for c in order]
    body = [[*key, metric, *(values.get(c, "") for c in order)] for key, values in cells.items()]
    return format_table(header, body, fmt)
