"""Broken dataset files through `emomerge data inspect`: one stderr line naming file, line/record
and key, exit 2, never a traceback."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from emomerge.cli import app

runner = CliRunner()


def _inspect(name: str, path: Path, *extra: str):
    return runner.invoke(app, ["data", "inspect", name, str(path), *extra])


def _assert_one_line(result, *parts: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    for part in parts:
        assert part in result.stderr, (part, result.stderr)


# --- EmoArt ----------------------------------------------------------------------------------

def _emoart(tmp_path: Path, synthetic) -> tuple[Path, list]:
    root = tmp_path / "emoart"
    shutil.copytree(synthetic["emoart"], root)
    return root, json.loads((root / "Annotation.json").read_text())


def test_emoart_broken_json_list(tmp_path, synthetic):
    root, records = _emoart(tmp_path, synthetic)
    text = json.dumps(records, indent=1)
    (root / "Annotation.json").write_text(text[: len(text) // 2])  # cut mid-document
    _assert_one_line(_inspect("emoart", root), "Annotation.json:", "not valid JSON")


def test_emoart_broken_json_lines_name_the_line(tmp_path, synthetic):
    root, records = _emoart(tmp_path, synthetic)
    lines = [json.dumps(r) for r in records[:4]]
    lines[2] = lines[2][:-5]  # a truncated third record
    (root / "Annotation.json").write_text("\n".join(lines) + "\n")
    _assert_one_line(_inspect("emoart", root), "Annotation.json:3:", "JSON lines")


@pytest.mark.parametrize("edit,parts", [
    (lambda recs: recs[1].pop("image_path"), ["record 1", "'image_path'"]),
    (lambda recs: recs.__setitem__(2, ["not", "a", "record"]), ["record 2", "JSON object"]),
], ids=["no_image_path", "not_an_object"])
def test_emoart_bad_record_names_the_record_and_key(tmp_path, synthetic, edit, parts):
    root, records = _emoart(tmp_path, synthetic)
    edit(records)
    (root / "Annotation.json").write_text(json.dumps(records))
    _assert_one_line(_inspect("emoart", root), "Annotation.json record", *parts)


# --- EmoComics35 -----------------------------------------------------------------------------

@pytest.mark.parametrize("column,value", [("FileNr", "12a"), ("Page", "three")])
def test_emocomics35_non_integer_cell_names_line_and_column(tmp_path, synthetic, column, value):
    root = tmp_path / "ec"
    shutil.copytree(synthetic["emocomics35"], root)
    path = root / "emocomics35_pg_images_original.csv"
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames, list(reader)
    rows[2][column] = value  # the fourth line of the file (after the header)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        writer.writerows(rows)
    _assert_one_line(_inspect("emocomics35", root), f"{path.name}:4", f"column {column}",
                     repr(value))


# --- MangaVQA / EMID (parquet) ---------------------------------------------------------------

def _rewrite(src: Path, dst: Path, column: str, values: list) -> None:
    table = pq.read_table(src)
    i = table.schema.get_field_index(column)
    table = table.set_column(i, column, pa.array(values, type=None))
    dst.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, dst)


def test_mangavqa_non_integer_image_number_names_file_and_row(tmp_path, synthetic):
    root = tmp_path / "vqa"
    shutil.copytree(synthetic["mangavqa"], root)
    shard = root / "data" / "train-00000-of-00001.parquet"
    numbers = [str(v) for v in pq.read_table(shard).column("image_number").to_pylist()]
    numbers[5] = "p.12"
    _rewrite(shard, shard, "image_number", numbers)
    _assert_one_line(_inspect("mangavqa", root), f"{shard} row 5", "image_number", "'p.12'")


def test_emid_undecodable_image_names_file_and_row(tmp_path, synthetic):
    root = tmp_path / "emid"
    shutil.copytree(synthetic["emid"], root)
    shard = root / "data" / "train-00000-of-00001.parquet"
    table = pq.read_table(shard)
    cells = table.column("image").to_pylist()
    cells[3] = {"bytes": b"not an image", "path": "x.jpg"}
    _rewrite(shard, shard, "image", cells)
    _assert_one_line(_inspect("emid", root, "--task", "matching"), f"{shard} row 3",
                     "column image")


def test_unreadable_parquet_is_one_line(tmp_path, synthetic):
    root = tmp_path / "vqa"
    shutil.copytree(synthetic["mangavqa"], root)
    (root / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 truncated")
    _assert_one_line(_inspect("mangavqa", root), "train-00000-of-00001.parquet",
                     "not a readable parquet file")


def test_curriculum_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "cur.yaml"
    path.write_bytes(b"base_model: m\n\xff\xfe stages: []\n")
    result = runner.invoke(app, ["train", str(path), "--out", str(tmp_path / "run")])
    _assert_one_line(result, str(path), "not a UTF-8 text file")
