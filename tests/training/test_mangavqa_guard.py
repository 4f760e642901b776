"""MangaVQA leakage guard: training pages are compared with the test pages, wherever the test
file lives (stage key ``eval_path``), and a stage that cannot be checked says so."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from emomerge.merging.errors import InputError
from emomerge.training.curriculum import load_curriculum, parse_curriculum
from emomerge.training.data import content_id, read_dataset
from emomerge.training.stages import plan_stages, settings_sha256, stage_settings

TRAIN = "train-00000-of-00001.parquet"
TEST = "test-00000-of-00001.parquet"


def _rows(path: Path) -> tuple[list[dict], pa.Schema]:
    table = pq.read_table(path)
    return table.to_pylist(), table.schema


def _write(rows: list[dict], schema: pa.Schema, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema), path)
    return path


def _train_with_test_page(synthetic: Path, out: Path) -> Path:
    """The synthetic train parquet plus one row about test page TestTitle/003, asking a question
    that no test row asks (so no row, and no content id, is shared: only the page)."""
    rows, schema = _rows(synthetic / "data" / TRAIN)
    test_rows, _ = _rows(synthetic / "data" / TEST)
    page = next(r for r in test_rows if r["image_number"] == 3)
    rows.append(
        {
            **rows[0],
            "title": page["title"],
            "image_number": 3,
            "question": "このページに何人いますか？",
            "answer": "二人",
        }
    )
    assert all(r["question"] != "このページに何人いますか？" for r in test_rows)
    return _write(rows, schema, out / "data" / TRAIN)


def _stage(path: Path, **kw) -> dict:
    return {"name": "vqa", "dataset": "mangavqa", "path": str(path), "steps": 1, **kw}


def test_a_shared_page_with_another_question_is_refused(synthetic, tmp_path):
    root = tmp_path / "vqa"
    shutil.copytree(synthetic["mangavqa"], root)
    _train_with_test_page(synthetic["mangavqa"], root)
    # row by row (content ids) nothing is shared: the old check would have let this pass
    train = read_dataset("mangavqa", root, "train")
    test = read_dataset("mangavqa", root, "test")
    assert not {content_id(s) for s in train} & {content_id(s) for s in test}
    cur = parse_curriculum({"base_model": "m", "stages": [_stage(root)]})
    with pytest.raises(InputError) as exc:
        plan_stages(cur, tmp_path / "out")
    assert str(exc.value) == (
        "<curriculum>: stages.0 (vqa): split 'train' shares 1 manga pages with the evaluation "
        "split 'test' (1 training samples on them, e.g. page TestTitle/003); a page seen in "
        "training leaks its evaluation answers, drop those rows from the training data"
    )


def _split_layout(synthetic: Path, tmp_path: Path, *, leak: bool) -> tuple[Path, Path]:
    """MangaVQA-train and MangaVQA as published: two folders, the test set not beside the
    training set; images in a separate Manga109 root."""
    train_dir = tmp_path / "data" / "MangaVQA-train"
    if leak:
        _train_with_test_page(synthetic, train_dir)
    else:
        (train_dir / "data").mkdir(parents=True)
        shutil.copy2(synthetic / "data" / TRAIN, train_dir / "data" / TRAIN)
    test_dir = tmp_path / "data" / "MangaVQA"
    (test_dir / "data").mkdir(parents=True)
    shutil.copy2(synthetic / "data" / TEST, test_dir / "data" / TEST)
    return train_dir, test_dir


def _yaml_curriculum(tmp_path: Path, synthetic: Path, **stage) -> Path:
    path = tmp_path / "curricula" / "cur.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump(
            {
                "base_model": "m",
                "stages": [
                    {
                        "name": "vqa",
                        "dataset": "mangavqa",
                        "path": "../data/MangaVQA-train",
                        "steps": 1,
                        "options": {"manga109_root": str(synthetic)},
                        **stage,
                    }
                ],
            }
        )
    )
    return path


def test_eval_path_names_a_test_file_that_lives_elsewhere(synthetic, tmp_path):
    _, test_dir = _split_layout(synthetic["mangavqa"], tmp_path, leak=False)
    cur = load_curriculum(
        _yaml_curriculum(tmp_path, synthetic["mangavqa"], eval_path="../data/MangaVQA")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checked stage warns about nothing
        plan = plan_stages(cur, tmp_path / "out")[0]
    assert len(plan.samples) == 24
    assert plan.dataset_record(cur)["overlap_check"] == {
        "status": "checked",
        "eval_path": str(test_dir.resolve()),
        "eval_split": "test",
        "eval_samples": 8,
        "level": "page",
        "eval_pages": 8,
    }


def test_eval_path_finds_the_shared_page(synthetic, tmp_path):
    _split_layout(synthetic["mangavqa"], tmp_path, leak=True)
    cur = load_curriculum(
        _yaml_curriculum(tmp_path, synthetic["mangavqa"], eval_path="../data/MangaVQA")
    )
    with pytest.raises(
        InputError,
        match=r"shares 1 manga pages with the evaluation split "
        r"'test' of .*MangaVQA \(1 training samples on them, "
        r"e\.g\. page TestTitle/003\)",
    ):
        plan_stages(cur, tmp_path / "out")


def test_no_test_file_beside_and_none_named_warns_and_records_it(synthetic, tmp_path):
    _split_layout(synthetic["mangavqa"], tmp_path, leak=True)
    cur = load_curriculum(_yaml_curriculum(tmp_path, synthetic["mangavqa"]))
    with pytest.warns(
        UserWarning,
        match=r"stages\.0 \(vqa\): no evaluation split beside .* "
        r"pages were NOT checked .*add 'eval_path: ",
    ):
        plan = plan_stages(cur, tmp_path / "out")[0]
    record = plan.dataset_record(cur)["overlap_check"]
    assert record["status"] == "unchecked" and "no eval_path" in record["reason"]


def test_eval_path_to_a_single_file_uses_its_only_split(synthetic, tmp_path):
    _split_layout(synthetic["mangavqa"], tmp_path, leak=True)
    rows, schema = _rows(synthetic["mangavqa"] / "data" / TEST)
    single = _write(rows, schema, tmp_path / "data" / "mangavqa_eval.parquet")
    cur = load_curriculum(
        _yaml_curriculum(tmp_path, synthetic["mangavqa"], eval_path="../data/mangavqa_eval.parquet")
    )
    with pytest.raises(
        InputError,
        match=r"evaluation split 'mangavqa_eval' of .*"
        r"mangavqa_eval\.parquet \(1 training samples",
    ):
        plan_stages(cur, tmp_path / "out")
    # several splits and no "test" among them: the user must say which
    _write(rows, schema, tmp_path / "data" / "evalset" / "dev.parquet")
    _write(rows, schema, tmp_path / "data" / "evalset" / "val.parquet")
    cur = load_curriculum(
        _yaml_curriculum(tmp_path, synthetic["mangavqa"], eval_path="../data/evalset")
    )
    with pytest.raises(InputError) as exc:
        plan_stages(cur, tmp_path / "out")
    assert str(exc.value).endswith(
        f"key 'eval_path': {cur.resolve('../data/evalset')} has no "
        "'test' split (splits: dev, val); name one with 'eval_split'"
    )
    assert single.is_file()


def test_eval_path_does_not_change_the_resume_fingerprint(synthetic, tmp_path):
    # adding the key to a curriculum whose stages are trained must not invalidate them
    _split_layout(synthetic["mangavqa"], tmp_path, leak=False)
    cur = load_curriculum(_yaml_curriculum(tmp_path, synthetic["mangavqa"]))
    with pytest.warns(UserWarning, match="NOT checked"):
        before = plan_stages(cur, tmp_path / "out")[0]
    cur2 = load_curriculum(
        _yaml_curriculum(tmp_path, synthetic["mangavqa"], eval_path="../data/MangaVQA")
    )
    after = plan_stages(cur2, tmp_path / "out")[0]
    assert before.data_sha256 == after.data_sha256
    assert settings_sha256(stage_settings(before, cur, "qwen2_5_vl", None)) == settings_sha256(
        stage_settings(after, cur2, "qwen2_5_vl", None)
    )
