"""The leaderboard CSV: one fixed column set, atomic upserts, and the show / compare views.

One row per (architecture, base, variant, dataset, split, evaluation config). A re-run replaces
its own rows: rows are keyed by :data:`ROW_KEY`, whose ``config_hash`` covers the evaluation
settings (dataset, split content, mode, scoring options, seed, bootstrap size, baseline) but not
the variant list, so adding a variant later appends and re-running the same command replaces.
Each metric ``m`` has ``m_lo``/``m_hi`` (95% bootstrap interval) and ``m_p``: the paired test of
the variant against the row's ``baseline``. With the paired bootstrap every metric has its own p;
with McNemar (exact correctness) only accuracy / subset_accuracy / exact_match carry it.
The file is rewritten through a temporary file in the same folder and ``os.replace``, so a reader
never sees half a file and a crash leaves the previous version intact.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from emomerge.merging.errors import InputError

#: Every metric a row may carry, in column order; a task leaves the others empty.
METRIC_COLUMNS = ("accuracy", "macro_f1", "subset_accuracy", "example_f1", "micro_f1",
                  "single_accuracy", "single_macro_f1", "exact_match", "char_f1", "judge_score")

COLUMNS: tuple[str, ...] = (
    "architecture", "base_id", "variant", "kind", "stage_index", "lineage", "method",
    "method_params", "stages_merged", "dataset", "split", "task", "mode", "n", "n_groups",
    "baseline",
    *(f"{m}{suffix}" for m in METRIC_COLUMNS for suffix in ("", "_lo", "_hi", "_p")),
    "parse_failures", "threshold_source", "seed", "n_boot", "emomerge_version", "git_hash", "date", "config_hash",
    "variant_hash", "split_hash",
)

#: Columns added after the first release: a leaderboard written before them is read with them
#: empty (and rewritten with them on the next upsert) rather than refused.
LATER_COLUMNS = ("threshold_source",)

#: The columns that identify a row: a row with the same values is replaced on upsert.
ROW_KEY = ("architecture", "base_id", "variant", "dataset", "split", "config_hash")
#: The columns that pair rows of two leaderboards in :func:`compare`.
COMPARE_KEY = ("architecture", "base_id", "variant", "dataset", "split")


def fmt_value(value: object) -> str:
    """A cell: floats with 6 significant digits (NaN → empty), everything else ``str``."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a leaderboard CSV (``[]`` when the file does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = tuple(reader.fieldnames or ())
        if header != COLUMNS and header != tuple(c for c in COLUMNS if c not in LATER_COLUMNS):
            missing = [c for c in COLUMNS if c not in header]
            extra = [c for c in header if c not in COLUMNS]
            raise InputError(
                f"{path}: not an emomerge leaderboard (missing columns {missing[:3]}, "
                f"unknown {extra[:3]})"
            )
        return [{c: r.get(c) or "" for c in COLUMNS} for r in reader]


def _write_atomic(path: Path, rows: Iterable[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def upsert_rows(path: str | Path, new_rows: Sequence[dict[str, object]]) -> Path:
    """Add ``new_rows`` to the CSV at ``path``, replacing rows with the same :data:`ROW_KEY`."""
    path = Path(path)
    cells = []
    for row in new_rows:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"leaderboard row has unknown columns {sorted(unknown)}")
        cells.append({c: fmt_value(row.get(c)) for c in COLUMNS})
    keys = {tuple(r[k] for k in ROW_KEY) for r in cells}
    kept = [r for r in read_rows(path) if tuple(r[k] for k in ROW_KEY) not in keys]
    _write_atomic(path, kept + cells)
    return path


# ---------------------------------------------------------------- views


def _num(cell: str) -> float:
    try:
        return float(cell)
    except (TypeError, ValueError):
        return float("nan")


def metrics_present(rows: Sequence[dict[str, str]]) -> list[str]:
    """The metric columns with a value in at least one row, in column order."""
    return [m for m in METRIC_COLUMNS if any(r.get(m) for r in rows)]


def _table(header: list[str], body: list[list[str]], fmt: str) -> str:
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(body)
        return buf.getvalue()
    if fmt != "markdown":
        raise InputError(f"--format: expected 'markdown' or 'csv', got '{fmt}'")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _with_interval(row: dict[str, str], m: str) -> str:
    if not row.get(m):
        return ""
    value = f"{_num(row[m]):.4f}"
    if row.get(f"{m}_lo") and row.get(f"{m}_hi"):
        value += f" [{_num(row[m + '_lo']):.4f}, {_num(row[m + '_hi']):.4f}]"
    return value


def _p(row: dict[str, str], m: str) -> str:
    return f"{_num(row[m + '_p']):.3g}" if row.get(f"{m}_p") else ""


def sort_rows(rows: list[dict[str, str]], by: str | None) -> list[dict[str, str]]:
    """Rows by ``by`` descending (empty cells last); unchanged order when ``by`` is None."""
    if by is None:
        return rows
    if by not in COLUMNS:
        raise InputError(f"--by: unknown column '{by}' (e.g. {', '.join(METRIC_COLUMNS[:4])})")
    if by in METRIC_COLUMNS or by in ("n", "parse_failures"):
        def key(r: dict[str, str]) -> tuple[bool, float]:
            v = _num(r[by])
            return (math.isnan(v), 0.0 if math.isnan(v) else -v)

        return sorted(rows, key=key)
    return sorted(rows, key=lambda r: r[by])


def show(path: str | Path, *, by: str | None = None, fmt: str = "markdown") -> str:
    """The leaderboard as a table: identity, each metric with its interval, p-value, failures."""
    rows = sort_rows(read_rows(path), by)
    if fmt == "csv":
        return _table(list(COLUMNS), [[r[c] for c in COLUMNS] for r in rows], "csv")
    metrics = metrics_present(rows)
    header = ["architecture", "variant", "kind", "method", "dataset", "split", "n"]
    header += [h for m in metrics for h in (m, f"p({m})")] + ["parse_failures"]
    # where multi-label thresholds were chosen, when any row has one (held out or not)
    sources = ["threshold_source"] if any(r.get("threshold_source") for r in rows) else []
    header += sources
    body = [[r["architecture"], r["variant"], r["kind"], r["method"], r["dataset"], r["split"],
             r["n"]] + [c for m in metrics for c in (_with_interval(r, m), _p(r, m))]
            + [r["parse_failures"]] + [r[c] for c in sources] for r in rows]
    return _table(header, body, fmt)


def compare(path_a: str | Path, path_b: str | Path, *, fmt: str = "markdown") -> str:
    """Two leaderboards side by side per (architecture, base, variant, dataset, split): A, B, B−A.

    When a leaderboard holds several rows for one key (several configs), the last one counts.
    """
    a = {tuple(r[k] for k in COMPARE_KEY): r for r in read_rows(path_a)}
    b = {tuple(r[k] for k in COMPARE_KEY): r for r in read_rows(path_b)}
    keys = list(a) + [k for k in b if k not in a]
    metrics = [m for m in METRIC_COLUMNS
               if m in metrics_present(list(a.values())) + metrics_present(list(b.values()))]
    header = ["architecture", "variant", "dataset", "split"]
    header += [h for m in metrics for h in (f"{m} (A)", f"{m} (B)", f"Δ {m}")]
    body = []
    for key in keys:
        ra, rb = a.get(key, {}), b.get(key, {})
        cells = [key[0], key[2], key[3], key[4]]
        for m in metrics:
            va, vb = _num(ra.get(m, "")), _num(rb.get(m, ""))
            delta = vb - va
            cells += [fmt_value(va), fmt_value(vb), "" if math.isnan(delta) else f"{delta:+.4f}"]
        body.append(cells)
    return _table(header, body, fmt)
