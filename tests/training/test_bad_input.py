"""Broken inputs through `emomerge data inspect` and `emomerge train`: one stderr line naming file,
line/record and key, exit 2, never a traceback, nothing written."""

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


@pytest.mark.parametrize(
    "edit,parts",
    [
        (lambda recs: recs[1].pop("image_path"), ["record 1", "'image_path'"]),
        (lambda recs: recs.__setitem__(2, ["not", "a", "record"]), ["record 2", "JSON object"]),
    ],
    ids=["no_image_path", "not_an_object"],
)
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
    _assert_one_line(
        _inspect("emocomics35", root), f"{path.name}:4", f"column {column}", repr(value)
    )


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
    _assert_one_line(_inspect("emid", root, "--task", "matching"), f"{shard} row 3", "column image")


def test_unreadable_parquet_is_one_line(tmp_path, synthetic):
    root = tmp_path / "vqa"
    shutil.copytree(synthetic["mangavqa"], root)
    (root / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 truncated")
    _assert_one_line(
        _inspect("mangavqa", root), "train-00000-of-00001.parquet", "not a readable parquet file"
    )


def test_curriculum_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "cur.yaml"
    path.write_bytes(b"base_model: m\n\xff\xfe stages: []\n")
    result = runner.invoke(app, ["train", str(path), "--out", str(tmp_path / "run")])
    _assert_one_line(result, str(path), "not a UTF-8 text file")


# --- the reliability table: every bad input through the CLI ------------------------------------
#
# Each case builds its broken input under tmp_path and returns (command line, the first words of
# the one stderr line). Every case must exit 2 with that one line, print nothing on stdout, and
# leave nothing at the output path (`train --out`), however far the command got.


def _cut(path: Path) -> None:
    """Half of a file: a JPEG whose header still parses, a parquet without its footer."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _train_samples_images(root: Path) -> list[Path]:
    from emomerge.training.data import read_dataset

    return [Path(s.images[0]) for s in read_dataset("emoart", root, "train")]


def _curriculum(ctx, root: Path, base: str | None = None) -> Path:
    import yaml

    cur = ctx.tmp / "cur.yaml"
    cur.write_text(
        yaml.safe_dump(
            {
                "base_model": base or str(ctx.tiny_model("qwen2_5_vl")),
                "train": {"batch_size": 2},
                "stages": [{"name": "emoart", "dataset": "emoart", "path": str(root), "steps": 1}],
            }
        )
    )
    return cur


def _train(ctx, cur: Path) -> list[str]:
    return ["train", str(cur), "--out", str(ctx.out), "--no-progress"]


def case_train_missing_local_model(ctx):
    root, _ = _emoart(ctx.tmp, ctx.synthetic)
    cur = _curriculum(ctx, root, base="./no-such-model")
    return (
        _train(ctx, cur),
        f"{cur}: key 'base_model': model folder {ctx.tmp}/no-such-model not found",
    )


def case_train_some_images_unreadable(ctx):
    root, _ = _emoart(ctx.tmp, ctx.synthetic)
    images = _train_samples_images(root)
    for path in images[:3]:  # 3 of ~19: above the default 5 %
        _cut(path)
    cur = _curriculum(ctx, root)
    return _train(ctx, cur), f"{cur}: stages.0 (emoart): 3 of {len(images)} image files unreadable"


def case_train_all_images_unreadable(ctx):
    root, _ = _emoart(ctx.tmp, ctx.synthetic)
    images = _train_samples_images(root)
    for path in images:
        path.write_bytes(b"")
    cur = _curriculum(ctx, root)
    n = len(images)
    return _train(ctx, cur), f"{cur}: stages.0 (emoart): {n} of {n} image files unreadable"


def case_train_image_path_outside_the_root(ctx):
    root, records = _emoart(ctx.tmp, ctx.synthetic)
    records[0]["image_path"] = "..\\..\\outside.jpg"
    (root / "Annotation.json").write_text(json.dumps(records))
    return (
        _train(ctx, _curriculum(ctx, root)),
        (
            f"{root / 'Annotation.json'} record 0 ({records[0]['request_id']}) key "
            "'image_path': image path '..\\\\..\\\\outside.jpg' resolves outside the "
            "dataset root"
        ),
    )


def case_emoart_image_path_outside_the_root(ctx):
    root, records = _emoart(ctx.tmp, ctx.synthetic)
    records[2]["image_path"] = "../outside.jpg"
    (root / "Annotation.json").write_text(json.dumps(records))
    return (
        ["data", "inspect", "emoart", str(root)],
        f"{root / 'Annotation.json'} record 2 ({records[2]['request_id']}) key 'image_path'",
    )


def case_emid_csv_file_name_outside_the_root(ctx):
    root = ctx.tmp / "emid"
    shutil.copytree(ctx.synthetic["emid"], root)
    path = root / "EMID_data.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    cells = lines[1].split(",")
    cells[7] = "../../../outside.jpg"  # Image2_filename of the first row
    lines[1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return (
        ["data", "inspect", "emid", str(root), "--task", "image_emotion"],
        f"{path}:2 column Image2_filename: image path '../../../outside.jpg' resolves outside",
    )


def _not_utf8(path: Path) -> None:
    data = path.read_bytes()
    cut = len(data) // 2
    path.write_bytes(data[:cut] + b"\xff\xfe" + data[cut:])


def case_emoart_json_not_utf8(ctx):
    root, _ = _emoart(ctx.tmp, ctx.synthetic)
    _not_utf8(root / "Annotation.json")
    return (
        ["data", "inspect", "emoart", str(root)],
        f"{root / 'Annotation.json'}: not a UTF-8 text file",
    )


def case_emocomics35_csv_not_utf8(ctx):
    root = ctx.tmp / "ec"
    shutil.copytree(ctx.synthetic["emocomics35"], root)
    path = root / "emocomics35_pg_images_original.csv"
    _not_utf8(path)
    return ["data", "inspect", "emocomics35", str(root)], f"{path}: not a UTF-8 text file"


def case_emid_csv_not_utf8(ctx):
    root = ctx.tmp / "emid"
    shutil.copytree(ctx.synthetic["emid"], root)
    _not_utf8(root / "EMID_data.csv")
    return (
        ["data", "inspect", "emid", str(root), "--task", "image_emotion"],
        f"{root / 'EMID_data.csv'}: not a UTF-8 text file",
    )


def case_mangavqa_parquet_not_utf8(ctx):
    root = ctx.tmp / "vqa"
    shutil.copytree(ctx.synthetic["mangavqa"], root)
    shard = root / "data" / "train-00000-of-00001.parquet"
    table = pq.read_table(shard)
    raw = [a.encode() for a in table.column("answer").to_pylist()]
    raw[2] = b"\x80oops"
    column = pa.array(raw, pa.binary()).view(pa.string())
    pq.write_table(
        table.set_column(table.schema.get_field_index("answer"), "answer", column), shard
    )
    return (
        ["data", "inspect", "mangavqa", str(root)],
        f"{shard}: column answer row 2 is not valid UTF-8",
    )


def case_emid_parquet_truncated(ctx):
    root = ctx.tmp / "emid"
    shutil.copytree(ctx.synthetic["emid"], root)
    shard = root / "data" / "train-00000-of-00001.parquet"
    _cut(shard)
    return (
        ["data", "inspect", "emid", str(root), "--task", "matching"],
        f"{shard}: not a readable parquet file",
    )


def case_emid_parquet_wrong_schema(ctx):
    root = ctx.tmp / "emid"
    shutil.copytree(ctx.synthetic["emid"], root)
    shard = root / "data" / "train-00000-of-00001.parquet"
    rows = pq.read_metadata(shard).num_rows
    _rewrite(shard, shard, "image", [f"img{i}.jpg" for i in range(rows)])  # names, not bytes
    return (
        ["data", "inspect", "emid", str(root), "--task", "matching"],
        f"{shard} row 0: column image holds str, not image bytes",
    )


def case_mangavqa_parquet_missing_column(ctx):
    root = ctx.tmp / "vqa"
    shutil.copytree(ctx.synthetic["mangavqa"], root)
    shard = root / "data" / "train-00000-of-00001.parquet"
    pq.write_table(pq.read_table(shard).drop_columns(["question"]), shard)
    return ["data", "inspect", "mangavqa", str(root)], f"{shard}: missing columns ['question']"


def case_emocomics35_csv_missing_column(ctx):
    root = ctx.tmp / "ec"
    shutil.copytree(ctx.synthetic["emocomics35"], root)
    path = root / "emocomics35_pg_images_original.csv"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("PageSpeakers", "Speakers", 1), encoding="utf-8")
    return (
        ["data", "inspect", "emocomics35", str(root)],
        f"{path}: missing columns ['PageSpeakers']",
    )


CASES = [
    case_train_missing_local_model,
    case_train_some_images_unreadable,
    case_train_all_images_unreadable,
    case_train_image_path_outside_the_root,
    case_emoart_image_path_outside_the_root,
    case_emid_csv_file_name_outside_the_root,
    case_emoart_json_not_utf8,
    case_emocomics35_csv_not_utf8,
    case_emid_csv_not_utf8,
    case_mangavqa_parquet_not_utf8,
    case_emid_parquet_truncated,
    case_emid_parquet_wrong_schema,
    case_mangavqa_parquet_missing_column,
    case_emocomics35_csv_missing_column,
]


class _Ctx:
    def __init__(self, tmp: Path, synthetic, tiny_model) -> None:
        self.tmp, self.synthetic, self.tiny_model = tmp, synthetic, tiny_model
        self.out = tmp / "out"


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.removeprefix("case_") for c in CASES])
def test_bad_input_table(tmp_path, synthetic, tiny_model, case):
    ctx = _Ctx(tmp_path, synthetic, tiny_model)
    args, first_words = case(ctx)
    result = runner.invoke(app, args)
    _assert_one_line(result)
    assert result.stderr.startswith(f"error: {first_words}"), (first_words, result.stderr)
    assert result.stdout == ""
    assert not ctx.out.exists()
