"""Each reader on generated files in the dataset's published format."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from emomerge.merging.errors import InputError
from emomerge.training.data import emocomics35, inspect_dataset, read_dataset, read_with_report
from emomerge.training.data.emid import LABELS as EMID_LABELS
from emomerge.training.data.emoart import LABELS as EMOART_LABELS
from emomerge.training.data.synthetic import write_synthetic


def _check_sample_shape(s):
    images = [p for p in s.messages[-1]["content"] if p["type"] == "image"]
    assert len(images) == len(s.images) >= 1
    assert s.messages[-1]["content"][-1]["type"] == "text"


# --- EmoComics35 -----------------------------------------------------------------------------


def test_emocomics35_utterances_follow_the_csv(synthetic):
    path = synthetic["emocomics35"]
    rows = list(csv.DictReader((path / "emocomics35_pg_images_original.csv").open()))
    samples = read_dataset("emocomics35", path, "train")
    train_rows = [r for r in rows if r["Split"] == "TRAIN"]
    utts = [u for r in train_rows for u in eval(r["PageUtterances"])]
    assert len(samples) == len(utts)
    s = samples[0]
    _check_sample_shape(s)
    assert s.meta["utterance_index"] == 0 and s.group == s.id.rsplit("-u", 1)[0]
    assert f'"{utts[0]}"' in s.prompt_text
    assert s.target == ", ".join(sorted(s.labels, key=emocomics35.LABELS.index))
    assert set(s.label_set) == set(emocomics35.LABELS)
    # Images resolve by FileNr and page under the root, not via the annotators' absolute path.
    assert s.images[0].endswith("images/001000/images/page00001.jpg")


def test_emocomics35_counts_unquoted_repairs(synthetic):
    text = (synthetic["emocomics35"] / "emocomics35_pg_images_original.csv").read_text()
    _, report = read_with_report("emocomics35", synthetic["emocomics35"], "TRAIN")
    _, test_report = read_with_report("emocomics35", synthetic["emocomics35"], "test")
    total = report.repairs["unquoted_label_list"] + test_report.repairs["unquoted_label_list"]
    assert total == text.count("'[Neutral]'") > 0


def test_emocomics35_missing_images(tmp_path):
    root = write_synthetic("emocomics35", tmp_path / "ec", n=8, seed=3)
    (root / "images" / "001000" / "images" / "page00001.jpg").unlink()
    with pytest.warns(UserWarning, match="1 image files missing"):
        kept = read_dataset("emocomics35", root, "train")
    placeholder = read_dataset("emocomics35", root, "train", allow_missing_images=True)
    assert len(placeholder) > len(kept)
    assert isinstance(placeholder[0].images[0], Image.Image)


def test_emocomics35_bad_rows_name_the_line(tmp_path):
    root = write_synthetic("emocomics35", tmp_path / "ec", n=4, seed=0)
    csv_path = root / "emocomics35_pg_images_original.csv"
    text = csv_path.read_text().replace("Anger", "Angry", 1)
    if "Angry" not in text:
        text = csv_path.read_text().replace("Joy", "Jolly", 1)
    csv_path.write_text(text)
    with pytest.raises(InputError, match=r"\.csv:\d+ PageEmotions\[\d+\]: unknown emotion"):
        read_dataset("emocomics35", root, "train", allow_missing_images=True)


def test_unknown_split_lists_the_available_ones(synthetic):
    with pytest.raises(InputError, match="split 'validation' not found.*TEST, TRAIN"):
        read_dataset("emocomics35", synthetic["emocomics35"], "validation")


# --- EmoArt ----------------------------------------------------------------------------------


def test_emoart_splits_are_disjoint_and_cover_all(synthetic):
    records = json.loads((synthetic["emoart"] / "Annotation.json").read_text())
    ids = {
        s: {x.id for x in read_dataset("emoart", synthetic["emoart"], s)}
        for s in ("train", "val", "test")
    }
    assert sum(map(len, ids.values())) == len(records)
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["val"])
    s = read_dataset("emoart", synthetic["emoart"], "train")[0]
    _check_sample_shape(s)
    assert s.target in EMOART_LABELS and s.label_set == EMOART_LABELS
    # Windows "Images\\Style\\file.jpg" resolved portably.
    assert "\\" not in s.images[0] and s.images[0].endswith(".jpg")


def test_emoart_valence_and_arousal(synthetic):
    val = read_dataset("emoart", synthetic["emoart"], "train", task="valence")
    aro = read_dataset("emoart", synthetic["emoart"], "train", task="arousal")
    assert val[0].label_set == ["negative", "positive"] and aro[0].label_set == ["high", "low"]
    assert {s.target for s in val} <= {"negative", "positive"}


def test_emoart_description_as_json_string_is_repaired(tmp_path, synthetic):
    root = tmp_path / "emoart"
    shutil.copytree(synthetic["emoart"], root)
    records = json.loads((root / "Annotation.json").read_text())
    records[0]["description"] = "```json\n" + json.dumps(records[0]["description"]) + "\n```"
    (root / "Annotation.json").write_text(json.dumps(records))
    total = Counter()
    for split in ("train", "val", "test"):
        total += read_with_report("emoart", root, split)[1].repairs
    assert total["description_as_json_string"] == 1


# --- EMID ------------------------------------------------------------------------------------


def test_emid_matching_reads_parquet_without_touching_audio(tmp_path, synthetic):
    src = synthetic["emid"] / "data" / "train-00000-of-00001.parquet"
    table = pq.read_table(src)
    # Audio that cannot be decoded: the reader must never read it.
    garbage = pa.array(
        [{"bytes": b"not audio", "path": "x.wav"}] * len(table), table.schema.field("audio").type
    )
    broken = table.set_column(table.schema.get_field_index("audio"), "audio", garbage)
    (tmp_path / "data").mkdir()
    pq.write_table(broken, tmp_path / "data" / "train-00000-of-00001.parquet")
    samples = read_dataset("emid", tmp_path, "train")
    answers = table.column("answer").to_pylist()
    assert [s.target for s in samples] == answers
    assert [s.labels[0] for s in samples] == [
        "yes" if a.startswith("yes") else "no" for a in answers
    ]
    _check_sample_shape(samples[0])
    assert samples[0].images[0].size == (64, 64)


def test_emid_original_layout_image_emotion(synthetic):
    report = inspect_dataset("emid", synthetic["emid"], task="image_emotion")
    n_images = sum(r["samples"] for r in report["splits"].values())
    rows = list(csv.DictReader((synthetic["emid"] / "EMID_data.csv").open()))
    assert n_images == 3 * len(rows)
    s = read_dataset("emid", synthetic["emid"], "train", task="image_emotion")[0]
    assert s.target in EMID_LABELS and s.id.startswith(s.target)


# --- MangaVQA --------------------------------------------------------------------------------


def test_mangavqa_both_type_columns_and_japanese(synthetic):
    train = read_dataset("mangavqa", synthetic["mangavqa"], "train")
    test = read_dataset("mangavqa", synthetic["mangavqa"], "test")
    assert {s.meta["type"] for s in train} == {"exact_extraction", "understanding"}
    assert {s.meta["type"] for s in test} == {"exact_extraction", "understanding"}
    s = train[0]
    _check_sample_shape(s)
    assert "ですか" in s.prompt_text and s.target and s.label_set == []
    assert s.images[0].endswith(f"images/{s.meta['title']}/{s.meta['image_number']:03d}.jpg")
    assert not ({x.id for x in train} & {x.id for x in test})


def test_mangavqa_names_the_page_and_keeps_the_question(synthetic):
    train = read_dataset("mangavqa", synthetic["mangavqa"], "train")
    test = read_dataset("mangavqa", synthetic["mangavqa"], "test")
    s = train[5]
    # the page is the Manga109 image file below images/, without its extension
    assert (
        s.meta["page_id"] == f"SyntheticManga/{s.meta['image_number']:03d}" == "SyntheticManga/005"
    )
    assert s.images[0].endswith(f"images/{s.meta['page_id']}.jpg")
    assert [t.meta["page_id"] for t in test] == [f"TestTitle/{i:03d}" for i in range(8)]
    # the question as asked; the prompt appends the answer instruction to it
    assert s.meta["question"] in (
        "このページの図形は何色ですか？",
        "このページの図形はどんな形ですか？",
    )
    assert s.prompt_text == f"{s.meta['question']}\n簡潔に日本語で答えてください。"


def test_mangavqa_separate_manga109_root(tmp_path, synthetic):
    data = tmp_path / "vqa"
    shutil.copytree(synthetic["mangavqa"] / "data", data / "data")
    assert (
        read_with_report("mangavqa", data, "train", allow_missing_images=True)[1].missing_images
        == 24
    )
    samples = read_dataset("mangavqa", data, "train", manga109_root=synthetic["mangavqa"])
    assert len(samples) == 24


def test_unknown_dataset_and_path():
    with pytest.raises(InputError, match="unknown dataset"):
        read_dataset("coco", "/", "train")
    with pytest.raises(InputError, match="no such file"):
        read_dataset("emoart", "/nonexistent/emoart", "train")


def test_mangavqa_repeated_question_on_a_page_gets_its_own_stable_id(tmp_path, synthetic):
    # The same question on the same page, twice, with another gold answer each time.
    table = pq.read_table(synthetic["mangavqa"] / "data" / "train-00000-of-00001.parquet")
    rows = table.to_pylist()
    rows.insert(3, {**rows[2], "answer": rows[2]["answer"] + "（別解）"})
    root = tmp_path / "vqa"
    (root / "data").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(rows, table.schema), root / "data" / "train-00000-of-00001.parquet"
    )
    samples = read_dataset("mangavqa", root, "train", manga109_root=synthetic["mangavqa"])
    ids = [s.id for s in samples]
    assert len(set(ids)) == len(ids) == len(rows)
    assert ids == [
        s.id for s in read_dataset("mangavqa", root, "train", manga109_root=synthetic["mangavqa"])
    ]
    # both rows are the same input, which the train/evaluation overlap check must still see
    assert samples[2].meta["content_id"] == samples[3].meta["content_id"]
    assert samples[2].target != samples[3].target


# --- image paths stay inside the dataset root ------------------------------------------------


@pytest.mark.parametrize(
    "raw,want",
    [
        ("Images\\Style\\a.jpg", "Images/Style/a.jpg"),
        ("Images/Style/./a.jpg", "Images/Style/a.jpg"),
        ("Images\\Other\\..\\Style\\a.jpg", "Images/Style/a.jpg"),  # '..' that stays inside
        ("C:\\EmoArt\\Images\\a.jpg", "EmoArt/Images/a.jpg"),  # anchors are dropped
        ("/EmoArt/Images/a.jpg", "EmoArt/Images/a.jpg"),
    ],
)
def test_relative_inside_cleans_the_path(tmp_path, raw, want):
    from emomerge.training.data.sample import relative_inside

    assert relative_inside(tmp_path, raw, "f").as_posix() == want


@pytest.mark.parametrize(
    "raw", ["..\\..\\etc\\passwd", "../x.jpg", "Images/../../x.jpg", "C:\\..\\x.jpg"]
)
def test_relative_inside_refuses_an_escape(tmp_path, raw):
    from emomerge.training.data.sample import relative_inside

    with pytest.raises(InputError) as exc:
        relative_inside(tmp_path, raw, "Annotation.json record 3")
    assert str(exc.value) == (
        f"Annotation.json record 3: image path {raw!r} resolves outside the dataset root {tmp_path}"
    )


def test_emoart_escaping_image_path_names_the_record(tmp_path, synthetic):
    root = tmp_path / "emoart"
    shutil.copytree(synthetic["emoart"], root)
    (tmp_path / "secret.jpg").write_bytes((root / "Images").rglob("*.jpg").__next__().read_bytes())
    records = json.loads((root / "Annotation.json").read_text())
    records[4]["image_path"] = "..\\secret.jpg"  # exists, but outside the root
    (root / "Annotation.json").write_text(json.dumps(records))
    with pytest.raises(
        InputError,
        match=r"Annotation.json record 4 \(req-[0-9a-f]+\) key "
        r"'image_path': image path '\.\.\\\\secret\.jpg' "
        r"resolves outside the dataset root",
    ):
        read_dataset("emoart", root, "train")


def test_emoart_symlinked_image_folder_inside_the_root_is_allowed(tmp_path, synthetic):
    """The check is lexical: a link the user placed in the root is theirs to make."""
    store = tmp_path / "big_disk"
    shutil.copytree(synthetic["emoart"] / "Images", store)
    root = tmp_path / "emoart"
    root.mkdir()
    shutil.copy(synthetic["emoart"] / "Annotation.json", root)
    (root / "Images").symlink_to(store, target_is_directory=True)
    assert len(read_dataset("emoart", root, "train")) == len(
        read_dataset("emoart", synthetic["emoart"], "train")
    )


def test_emid_csv_escaping_file_name_names_the_line(tmp_path, synthetic):
    root = tmp_path / "emid"
    shutil.copytree(synthetic["emid"], root)
    path = root / "EMID_data.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    first = lines[3].split(",")
    first[4] = "../../x.jpg"  # Image1_filename of the third data row
    lines[3] = ",".join(first)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(
        InputError,
        match=r"EMID_data.csv:4 column Image1_filename: image path "
        r"'\.\./\.\./x\.jpg' resolves outside",
    ):
        read_dataset("emid", root, "train", task="image_emotion")


# --- undecodable and mis-shaped data files ----------------------------------------------------


def test_csv_with_a_byte_order_mark_reads_like_without(tmp_path, synthetic):
    root = tmp_path / "ec"
    shutil.copytree(synthetic["emocomics35"], root)
    path = next(root.glob("*.csv"))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as Excel saves "UTF-8 CSV"
    assert len(read_dataset("emocomics35", root, "TRAIN")) == len(
        read_dataset("emocomics35", synthetic["emocomics35"], "TRAIN")
    )


def test_parquet_string_column_with_invalid_utf8_names_column_and_row(tmp_path, synthetic):
    root = tmp_path / "vqa"
    shutil.copytree(synthetic["mangavqa"], root)
    shard = root / "data" / "train-00000-of-00001.parquet"
    table = pq.read_table(shard)
    raw = [q.encode() for q in table.column("question").to_pylist()]
    raw[7] = b"\xff\xfe broken"
    column = pa.array(raw, pa.binary()).view(pa.string())  # parquet stores it unchecked
    pq.write_table(
        table.set_column(table.schema.get_field_index("question"), "question", column), shard
    )
    with pytest.raises(InputError) as exc:
        read_dataset("mangavqa", root, "train")
    assert str(exc.value) == (f"{shard}: column question row 7 is not valid UTF-8 (byte b'\\xff')")


def test_emid_csv_without_the_image_columns_is_refused(tmp_path):
    (tmp_path / "EMID_data.csv").write_text("Audio_Filename,emotion\nclip.wav,awe\n")
    with pytest.raises(InputError, match=r"EMID_data.csv: missing columns \['Image1_filename'"):
        read_dataset("emid", tmp_path, "train", task="image_emotion")


def test_emid_image_column_of_the_wrong_type_names_file_and_row(tmp_path, synthetic):
    table = pq.read_table(synthetic["emid"] / "data" / "train-00000-of-00001.parquet")
    wrong = table.set_column(
        table.schema.get_field_index("image"), "image", pa.array(range(len(table)), pa.int64())
    )
    (tmp_path / "data").mkdir()
    shard = tmp_path / "data" / "train-00000-of-00001.parquet"
    pq.write_table(wrong, shard)
    with pytest.raises(
        InputError,
        match=rf"^{shard} row 0: column image holds int, not image "
        r"bytes \(wrong schema\?\)$",
    ):
        read_dataset("emid", tmp_path, "train", task="matching")
