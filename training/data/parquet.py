"""Finding a dataset's parquet shards by split, and reading only the columns we need."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from emomerge.merging.errors import InputError

# Hub exports name shards "<split>-00000-of-00003[-hash].parquet" or "<split>.parquet", or put
# them in a "<split>/" folder ("test/data-00000.parquet").
_SHARD = re.compile(r"^(?P<split>[A-Za-z0-9_]+?)(?:[-_]\d{5}-of-\d{5}.*)?$")


def split_of(file: Path) -> str:
    """The split a parquet shard belongs to, from its name or its folder."""
    stem = file.name.removesuffix(".parquet")
    m = _SHARD.match(stem)
    name = m.group("split") if m else stem
    if name in {"data", "part"} or name.startswith("data-"):
        return file.parent.name
    return name


def parquet_splits(path: Path) -> dict[str, list[Path]]:
    """All parquet shards under ``path`` (a file or a folder), grouped by split."""
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    out: dict[str, list[Path]] = {}
    for f in files:
        out.setdefault(split_of(f), []).append(f)
    if not out:
        raise InputError(f"{path}: no parquet files found")
    return out


def read_columns(
    files: list[Path], wanted: list[str], optional: list[str] = ()
) -> list[dict[str, Any]]:
    """Rows of ``files`` restricted to ``wanted`` (+ present ``optional``) columns.

    Only the listed columns are read from disk, so a heavy column (EMID's audio) is never loaded
    or decoded.
    """
    return [row for _, _, row in iter_rows(files, wanted, optional)]


def iter_rows(
    files: list[Path], wanted: list[str], optional: list[str] = ()
) -> list[tuple[Path, int, dict[str, Any]]]:
    """``(file, row index in that file, row)`` for every row, so errors can name where they are."""
    out: list[tuple[Path, int, dict[str, Any]]] = []
    for f in files:
        try:
            names = pq.read_schema(f).names
            missing = [c for c in wanted if c not in names]
            if missing:
                raise InputError(f"{f}: missing columns {missing} (has {names})")
            cols = list(wanted) + [c for c in optional if c in names]
            table = pq.read_table(f, columns=cols)
            rows = table.to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise InputError(
                f"{f}: not a readable parquet file "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            ) from exc
        except UnicodeDecodeError as exc:  # parquet does not check the UTF-8 of string columns
            raise InputError(
                f"{f}: {_bad_utf8(table)} is not valid UTF-8 (byte "
                f"{exc.object[exc.start : exc.start + 1]!r})"
            ) from exc
        out.extend((f, i, row) for i, row in enumerate(rows))
    return out


def _bad_utf8(table: pa.Table) -> str:
    """``column X row N``: the first string cell that does not decode."""
    for name in table.column_names:
        if not pa.types.is_string(table.schema.field(name).type):
            continue
        for i, value in enumerate(table.column(name).cast(pa.binary()).to_pylist()):
            try:
                (value or b"").decode("utf-8")
            except UnicodeDecodeError:
                return f"column {name} row {i}"
    return "a string column"
