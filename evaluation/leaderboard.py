"""The leaderboard CSV: one fixed column set, atomic upserts, and the show / compare views.

One row per (architecture, base, variant, dataset, split, evaluation config). A re-run replaces
its own rows: rows are keyed by :data:`ROW_KEY`, whose ``config_hash`` covers the evaluation
settings (dataset, split content, mode, scoring options, seed, bootstrap size, baseline) but not
the variant list, so adding a variant later appends and re-running the same command replaces.
Each metric ``m`` has ``m_lo``/``m_hi`` (95% bootstrap interval), ``m_p``: the paired test of
the variant against the row's ``baseline``, and ``m_p_holm``: that p adjusted (Holm) over the
variants tested against the same baseline in the same evaluation, which is what ``show`` marks
significant. With the paired bootstrap every metric has its own p; with McNemar (exact
correctness) only accuracy / subset_accuracy / exact_match carry it. Macro-F1 averages over the
dataset's declared ``label_set`` for every row alike; ``per_label_f1`` holds its terms.
``kind`` is base / stage / merged, or trivial for the label-frequency baselines of
:mod:`.trivial` (sanity checks: their p stays raw, outside every Holm family).
The file is rewritten through a temporary file in the same folder and ``os.replace``
(:func:`emomerge.merging.atomic.atomic_file`), so a reader never sees half a file and a crash
leaves the previous version intact. Writers hold the file's lock
(:func:`emomerge.merging.atomic.file_lock`) from the read to the write, so concurrent
evaluations into one results folder keep each other's rows. Each row's per-example details are
``details/<name>`` with the name :func:`details_name` gives that row.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from emomerge.merging.atomic import atomic_file, file_lock
from emomerge.merging.errors import InputError

from .metrics import METRICS

#: Every metric a row may carry, in column order (metrics.METRICS's: one source for the names);
#: a task leaves the others empty.
METRIC_COLUMNS: tuple[str, ...] = tuple(METRICS)

#: Values of ``representation``: how the row's weights relate to the adapters evaluated —
#: the exact merged update, a low-rank (truncated) one, the base model alone, or no model at all.
REPRESENTATIONS = ("exact", "lowrank", "base", "trivial")

COLUMNS: tuple[str, ...] = (
    "architecture",
    "base_id",
    "variant",
    "kind",
    "stage_index",
    "lineage",
    "method",
    "method_params",
    "stages_merged",
    "representation",
    "represented_rank",
    "lowrank_error_mean",
    "lowrank_error_max",
    "dataset",
    "split",
    "task",
    "mode",
    "label_set",
    "n",
    "n_groups",
    "n_books",
    "baseline",
    *(f"{m}{suffix}" for m in METRIC_COLUMNS for suffix in ("", "_lo", "_hi", "_p", "_p_holm")),
    "per_label_f1",
    "parse_failures",
    "skipped_images",
    "scoring",
    "threshold",
    "threshold_source",
    "seed",
    "n_boot",
    "emomerge_version",
    "git_hash",
    "date",
    "config_hash",
    "variant_hash",
    "split_hash",
    "base_name",
    "base_fingerprint",
    "versions",
    "git_dirty",
)

#: Columns added after the first release: a leaderboard written before any of them is read with
#: them empty (and rewritten with all of them on the next upsert) rather than refused.
LATER_COLUMNS: tuple[str, ...] = (
    "threshold_source",
    "representation",
    "represented_rank",
    "lowrank_error_mean",
    "lowrank_error_max",
    "label_set",
    "n_books",
    *(f"{m}_p_holm" for m in METRIC_COLUMNS),
    "per_label_f1",
    "scoring",
    "threshold",
    "skipped_images",
    "base_name",
    "base_fingerprint",
    "versions",
    "git_dirty",
)

#: The columns that identify a row: a row with the same values is replaced on upsert.
ROW_KEY = ("architecture", "base_id", "variant", "dataset", "split", "config_hash")
#: The columns that pair rows of two leaderboards in :func:`compare`, besides the base's identity
#: (:func:`base_identity`): never ``base_id``, the path of the machine that ran the evaluation.
COMPARE_KEY = ("architecture", "variant", "dataset", "split")


def base_columns(base_id: str | Path, fingerprint: str) -> dict[str, str]:
    """The portable identity of a row's base: ``base_name`` (a local folder's own name, or the
    hub id as given) and ``base_fingerprint`` (16 hex digits of the content hash of a local
    checkpoint; empty when ``fingerprint`` only hashes the name, e.g. a hub id, so that a hub id
    and a downloaded copy still pair by name). ``base_id`` keeps the path, for display only."""
    import hashlib

    text = str(base_id)
    local = Path(text).is_dir()
    name = Path(text).name if local else text
    by_name = fingerprint == hashlib.sha256(text.encode()).hexdigest()
    return {"base_name": name, "base_fingerprint": "" if by_name or not local else fingerprint[:16]}


def fmt_value(value: object) -> str:
    """A cell: floats with 6 significant digits (NaN → empty), everything else ``str``."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def format_label_set(labels: Sequence[str]) -> str:
    """The ``label_set`` cell: the dataset's labels in their declared order, ``;``-joined."""
    return ";".join(labels)


def format_per_label(d: dict[str, float]) -> str:
    """The ``per_label_f1`` cell: ``"Anger=0.4123;Disgust=0;..."`` in the dict's (label-set)
    order, 4 significant digits (NaN → ``nan``)."""
    return ";".join(f"{lab}={'nan' if math.isnan(v) else format(v, '.4g')}" for lab, v in d.items())


def parse_per_label(cell: str) -> dict[str, float]:
    """The inverse of :func:`format_per_label` (``{}`` for an empty cell)."""
    out: dict[str, float] = {}
    for item in filter(None, (cell or "").split(";")):
        lab, _, value = item.rpartition("=")
        out[lab] = float(value)
    return out


def check_header(path: Path, header: Sequence[str]) -> None:
    """Refuse a CSV that is not a leaderboard: every column known, each once, and only
    :data:`LATER_COLUMNS` may be missing (a file from an earlier release)."""
    missing = [c for c in COLUMNS if c not in header and c not in LATER_COLUMNS]
    extra = [c for c in header if c not in COLUMNS]
    if missing or extra or len(set(header)) != len(header) or not header:
        raise InputError(
            f"{path}: not an emomerge leaderboard (missing columns {missing[:3]}, "
            f"unknown {extra[:3]})"
        )


def read_csv(path: Path, what: str) -> tuple[tuple[str, ...], list[dict[str, str]]]:
    """The header and rows of a CSV file, every problem one :class:`InputError` naming the file:
    a folder, bytes that are not UTF-8, text the csv module cannot parse (a NUL byte, a field
    past its size limit), or a row with more cells than the header has columns."""
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not {what}")
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = tuple(next(reader, ()))
            rows = []
            for line in reader:
                if len(line) > len(header):
                    raise InputError(
                        f"{path}:{reader.line_num}: {len(line)} cells but the "
                        f"header has {len(header)} columns (not {what}?)"
                    )
                rows.append(dict(zip(header, line)))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a UTF-8 text file (byte {exc.start}; not {what})") from exc
    except csv.Error as exc:
        raise InputError(f"{path}: not a readable CSV file ({exc}; not {what})") from exc
    return header, rows


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a leaderboard CSV (``[]`` when the file does not exist yet); the columns a
    file from an earlier release lacks are read as empty cells. Anything that is not a
    leaderboard CSV is an :class:`InputError` naming the file."""
    path = Path(path)
    if not path.exists():
        return []
    header, rows = read_csv(path, "an emomerge leaderboard")
    check_header(path, header)
    return [{c: r.get(c) or "" for c in COLUMNS} for r in rows]


def details_name(row: dict[str, object]) -> str:
    """The file name, under ``details/`` beside the leaderboard, of one row's per-example
    details: ``<dataset>__<split>__<variant>__<config hash[:12]>-<key>.json``.

    The config hash keeps the details of the same variant evaluated with other settings (another
    threshold, scoring or baseline) apart, as the rows are; ``<key>`` (8 hex of the whole
    :data:`ROW_KEY`, the exact variant name included) tells apart what the readable part cannot:
    variants ``a/b`` and ``a_b`` (``/`` is written ``_``), or another base with the same config.
    """
    key = [str(row.get(k) or "") for k in ROW_KEY]
    tag = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:8]
    variant = str(row.get("variant") or "").replace("/", "_")
    config = str(row.get("config_hash") or "")[:12]
    return f"{row.get('dataset')}__{row.get('split')}__{variant}__{config}-{tag}.json"


def _write_atomic(path: Path, rows: Iterable[dict[str, str]]) -> None:
    with atomic_file(path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def upsert_rows(
    path: str | Path, new_rows: Sequence[dict[str, object]], *, replace_all: bool = False
) -> Path:
    """Add ``new_rows`` to the CSV at ``path``, replacing rows with the same :data:`ROW_KEY`
    (``replace_all``: every earlier row, so the file holds exactly ``new_rows``)."""
    path = Path(path)
    cells = []
    for row in new_rows:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"leaderboard row has unknown columns {sorted(unknown)}")
        if row.get("representation") not in (None, "", *REPRESENTATIONS):
            raise ValueError(
                f"leaderboard row: representation {row['representation']!r} is "
                f"not one of {REPRESENTATIONS}"
            )
        cells.append({c: fmt_value(row.get(c)) for c in COLUMNS})
    keys = {tuple(r[k] for k in ROW_KEY) for r in cells}
    # The lock spans the read and the write: two evaluations writing one results folder would
    # otherwise each keep only their own rows (the last replace wins).
    with file_lock(path):
        kept = (
            []
            if replace_all
            else [r for r in read_rows(path) if tuple(r[k] for k in ROW_KEY) not in keys]
        )
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


def format_table(header: list[str], body: list[list[str]], fmt: str) -> str:
    """``body`` under ``header`` as a markdown table, CSV text or a JSON list (``--format``)."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(body)
        return buf.getvalue()
    if fmt == "json":  # one object per row, keyed by the header
        return (
            json.dumps([dict(zip(header, row)) for row in body], indent=1, ensure_ascii=False)
            + "\n"
        )
    if fmt != "markdown":
        raise InputError(f"--format: expected 'markdown', 'csv' or 'json', got '{fmt}'")
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


def _floor_p(row: dict[str, str]) -> float | None:
    """The smallest p the row's paired bootstrap can give, ``1 / (n_boot + 1)`` (None without
    ``n_boot``)."""
    n_boot = _num(row.get("n_boot", ""))
    return None if math.isnan(n_boot) or n_boot < 1 else 1.0 / (n_boot + 1)


def _at_floor(p: float, floor: float) -> bool:
    # The row does not record which test made its p, so only a p *equal* to the bootstrap floor
    # is read as "no replicate as extreme": an exact (McNemar) p is shown as it is, even a
    # smaller one. The cell holds the floor with 6 significant digits (fmt_value), so compare
    # with both the exact and the written value.
    return any(abs(p - f) <= 1e-12 * f for f in (floor, float(f"{floor:.6g}")))


def format_p(row: dict[str, str], column: str) -> str:
    """A p-value cell: 3 significant digits, or ``< 0.001`` (``< 1/(n_boot+1)``, 2 digits) when
    it sits at the bootstrap floor, where the true p is only known to be below it."""
    if not row.get(column):
        return ""
    p, floor = _num(row[column]), _floor_p(row)
    if math.isnan(p):
        return ""
    if floor is not None and _at_floor(p, floor):
        return f"< {floor:.2g}"
    return f"{p:.3g}"


def significant(row: dict[str, str], m: str, alpha: float = 0.05) -> bool:
    """Whether metric ``m`` of the row differs from the baseline after the Holm adjustment."""
    return bool(row.get(f"{m}_p_holm")) and _num(row[f"{m}_p_holm"]) < alpha


def _p(row: dict[str, str], m: str) -> str:
    return format_p(row, f"{m}_p")


#: Columns sorted as numbers by ``--by`` (the others as text).
NUMERIC_COLUMNS = frozenset(
    {
        *(f"{m}{suffix}" for m in METRIC_COLUMNS for suffix in ("", "_lo", "_hi", "_p", "_p_holm")),
        "n",
        "n_groups",
        "n_books",
        "parse_failures",
        "represented_rank",
        "lowrank_error_mean",
        "lowrank_error_max",
    }
)


def sort_rows(rows: list[dict[str, str]], by: str | None) -> list[dict[str, str]]:
    """Rows by ``by`` descending (empty cells last); unchanged order when ``by`` is None."""
    if by is None:
        return rows
    if by not in COLUMNS:
        raise InputError(f"--by: unknown column '{by}' (e.g. {', '.join(METRIC_COLUMNS[:4])})")
    if by in NUMERIC_COLUMNS:

        def key(r: dict[str, str]) -> tuple[bool, float]:
            v = _num(r[by])
            return (math.isnan(v), 0.0 if math.isnan(v) else -v)

        return sorted(rows, key=key)
    return sorted(rows, key=lambda r: r[by])


#: Columns ``show`` adds after the metrics when at least one row has a value in them.
OPTIONAL_SHOWN = ("representation", "threshold", "threshold_source")


def show(path: str | Path, *, by: str | None = None, fmt: str = "markdown") -> str:
    """The leaderboard as a table: identity, each metric with its interval, raw and
    Holm-adjusted p-value, failures.

    A ``*`` follows a metric whose Holm-adjusted p is below 0.05: the family is every variant
    tested against the same baseline in the same evaluation, so the star does not multiply with
    the number of merges tried.
    """
    rows = sort_rows(read_rows(path), by)
    if fmt in ("csv", "json"):  # every column, as in the file
        return format_table(list(COLUMNS), [[r[c] for c in COLUMNS] for r in rows], fmt)
    metrics = metrics_present(rows)
    header = ["architecture", "variant", "kind", "method", "dataset", "split", "n"]
    header += [h for m in metrics for h in (m, f"p({m})", f"p_adj({m})")] + ["parse_failures"]
    # e.g. where multi-label thresholds were chosen, when any row has one (held out or not)
    extra = [c for c in OPTIONAL_SHOWN if any(r.get(c) for r in rows)]
    header += extra

    def metric_cells(r: dict[str, str], m: str) -> list[str]:
        value = _with_interval(r, m)
        if value and significant(r, m):
            value += " *"
        return [value, _p(r, m), format_p(r, f"{m}_p_holm")]

    body = [
        [r["architecture"], r["variant"], r["kind"], r["method"], r["dataset"], r["split"], r["n"]]
        + [c for m in metrics for c in metric_cells(r, m)]
        + [r["parse_failures"]]
        + [r[c] for c in extra]
        for r in rows
    ]
    return format_table(header, body, fmt)


def _base_match(a: dict[str, str], b: dict[str, str]) -> bool:
    """Whether two rows were scored on the same base: by content fingerprint when both rows have
    one, else by name (merging's ``base_identity``: last path part, lower case, no quantisation
    suffix; a file from before ``base_name`` is read by its ``base_id``'s last part)."""
    from emomerge.merging.adapters import base_identity

    if a.get("base_fingerprint") and b.get("base_fingerprint"):
        return a["base_fingerprint"] == b["base_fingerprint"]
    return base_identity(a.get("base_name") or a.get("base_id")) == base_identity(
        b.get("base_name") or b.get("base_id")
    )


def delta_interval(ra: dict[str, str], rb: dict[str, str], m: str) -> tuple[float, float]:
    """An *unpaired* 95% interval of ``B − A`` from the two rows' own intervals (MOVER, Zou &
    Donner 2008): ``Δ − √((b − b_lo)² + (a_hi − a)²)`` to ``Δ + √((b_hi − b)² + (a − a_lo)²)``.

    Unpaired because a leaderboard row holds no per-example predictions (``details/`` has
    confusion matrices, ``predictions/`` raw scores before the thresholds), so the two runs'
    bootstrap replicates cannot be matched. On the same examples the runs' errors are positively
    correlated, which makes this interval wider than a paired one: conservative. NaN when either
    row lacks its interval."""
    a, a_lo, a_hi = (_num(ra.get(f"{m}{s}", "")) for s in ("", "_lo", "_hi"))
    b, b_lo, b_hi = (_num(rb.get(f"{m}{s}", "")) for s in ("", "_lo", "_hi"))
    d = b - a
    lo = d - math.hypot(b - b_lo, a_hi - a)
    hi = d + math.hypot(b_hi - b, a - a_lo)
    return lo, hi


@dataclass
class Comparison:
    """What :func:`compare` shows: the table, and the rows only one side has."""

    header: list[str]
    body: list[list[str]]
    only_a: list[str]
    only_b: list[str]

    def note(self, name_a: str = "A", name_b: str = "B") -> str:
        """The count line: how many rows paired, and which did not (at most 5 named a side)."""

        def names(keys: list[str]) -> str:
            shown = ", ".join(keys[:5]) + (f", … ({len(keys) - 5} more)" if len(keys) > 5 else "")
            return f" ({shown})" if keys else ""

        text = (
            f"{len(self.body) - len(self.only_a) - len(self.only_b)} rows matched; "
            f"only in {name_a}: {len(self.only_a)}{names(self.only_a)}; "
            f"only in {name_b}: {len(self.only_b)}{names(self.only_b)}"
        )
        if self.only_a or self.only_b:
            text += (
                " — rows pair on architecture, base (content fingerprint, else name), "
                "variant, dataset and split"
            )
        return text


def compare_rows(path_a: str | Path, path_b: str | Path) -> Comparison:
    """Pair the rows of two leaderboards (:data:`COMPARE_KEY` and the same base by
    :func:`_base_match`) and tabulate A, B, ``Δ`` = B − A and Δ's unpaired 95% interval
    (:func:`delta_interval`) per metric. When a leaderboard holds several rows for one key
    (several configs), the last one counts."""

    def last(path: str | Path) -> list[dict[str, str]]:
        return list(
            {
                tuple(r[k] for k in COMPARE_KEY)
                + (r["base_fingerprint"], r["base_name"] or r["base_id"]): r
                for r in read_rows(path)
            }.values()
        )

    rows_b = last(path_b)
    last_a = {i: r for i, r in enumerate(last(path_a))}
    pairs: list[tuple[dict[str, str], dict[str, str]]] = []
    used: set[int] = set()
    for ra in last_a.values():
        key = tuple(ra[k] for k in COMPARE_KEY)
        j = next(
            (
                j
                for j, rb in enumerate(rows_b)
                if j not in used
                and tuple(rb[k] for k in COMPARE_KEY) == key
                and _base_match(ra, rb)
            ),
            None,
        )
        if j is not None:
            used.add(j)
        pairs.append((ra, rows_b[j] if j is not None else {}))
    pairs += [({}, rb) for j, rb in enumerate(rows_b) if j not in used]
    present = set(metrics_present(list(last_a.values())) + metrics_present(rows_b))
    metrics = [m for m in METRIC_COLUMNS if m in present]
    header = ["architecture", "variant", "dataset", "split"]
    header += [
        h for m in metrics for h in (f"{m} (A)", f"{m} (B)", f"Δ {m}", f"Δ {m} 95% CI (unpaired)")
    ]
    body, only_a, only_b = [], [], []
    for ra, rb in pairs:
        r = ra or rb
        cells = [r["architecture"], r["variant"], r["dataset"], r["split"]]
        label = f"{r['variant']} {r['dataset']}/{r['split']}"
        if not rb:
            only_a.append(label)
        elif not ra:
            only_b.append(label)
        for m in metrics:
            va, vb = _num(ra.get(m, "")), _num(rb.get(m, ""))
            delta = vb - va
            lo, hi = delta_interval(ra, rb, m)
            ci = "" if math.isnan(lo) or math.isnan(hi) else f"[{lo:+.4f}, {hi:+.4f}]"
            cells += [
                fmt_value(va),
                fmt_value(vb),
                "" if math.isnan(delta) else f"{delta:+.4f}",
                ci,
            ]
        body.append(cells)
    return Comparison(header, body, only_a, only_b)


def compare(path_a: str | Path, path_b: str | Path, *, fmt: str = "markdown") -> str:
    """Two leaderboards side by side (:func:`compare_rows`) as a table; the count line of
    matched and unmatched rows is :meth:`Comparison.note`."""
    c = compare_rows(path_a, path_b)
    return format_table(c.header, c.body, fmt)
