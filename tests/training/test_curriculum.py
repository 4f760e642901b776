"""Curriculum YAML: strict schema, errors naming file and key, no training on the eval split."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from emomerge.merging.errors import InputError
from emomerge.training.curriculum import load_curriculum, parse_curriculum
from emomerge.training.stages import plan_stages

from .conftest import REPO_ROOT

CURRICULA = sorted((REPO_ROOT / "curricula").glob("*.yaml"))


def _stage(**kw):
    return {"name": "s1", "dataset": "emoart", "path": "x", "steps": 1, **kw}


@pytest.mark.parametrize("path", CURRICULA, ids=lambda p: p.name)
def test_every_shipped_curriculum_loads(path):
    cur = load_curriculum(path)
    assert path.read_text().startswith(f"# emomerge train curricula/{path.name}")
    assert cur.stages and cur.lineage in ("continued", "stacked")


def test_shipped_curricula_exist():
    assert len(CURRICULA) >= 3


@pytest.mark.parametrize(
    "data,key,msg",
    [
        ({"base_model": "m", "stages": [_stage()], "lr": 1}, "lr", "unknown key"),
        ({"base_model": "m", "stages": [_stage(epochs=1)]}, "stages.0", "exactly one of"),
        ({"base_model": "m", "stages": [_stage(steps=None)]}, "stages.0", "exactly one of"),
        (
            {"base_model": "m", "stages": [_stage(dataset="coco")]},
            "stages.0.dataset",
            "unknown dataset",
        ),
        ({"base_model": "m", "stages": [_stage(), _stage()]}, "(top level)", "unique"),
        ({"base_model": "m", "stages": [_stage(name="a/b")]}, "stages.0.name", "folder-safe"),
        ({"base_model": "m", "lineage": "chained", "stages": [_stage()]}, "lineage", "continued"),
        ({"base_model": "m", "lora": {"r": 0}, "stages": [_stage()]}, "lora.r", "greater than"),
        (
            {"base_model": "m", "lora": {"target_regex": "("}, "stages": [_stage()]},
            "lora.target_regex",
            "not a valid regex",
        ),
        (
            {"base_model": "m", "stages": [_stage(options={"imageroot": "x"})]},
            "stages.0.options",
            "unknown reader options",
        ),
        ({"base_model": "m", "stages": []}, "stages", "at least 1"),
        (
            {"base_model": "m", "stages": [_stage(holdout={"fraction": 0.1, "sed": 0})]},
            "stages.0.holdout.sed",
            "unknown key",
        ),
        (
            {"base_model": "m", "stages": [_stage(holdout={"fraction": 1.0})]},
            "stages.0.holdout.fraction",
            "less than 1",
        ),
        (
            {"base_model": "m", "stages": [_stage(eval_paht="t")]},
            "stages.0.eval_paht",
            "unknown key",
        ),
        (
            {"base_model": "m", "stages": [_stage(eval_path="t", eval_split=None)]},
            "stages.0",
            "'eval_path' names an evaluation file but 'eval_split' is null",
        ),
    ],
)
def test_bad_curriculum_names_file_and_key(tmp_path, data, key, msg):
    path = tmp_path / "cur.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError) as exc:
        load_curriculum(path)
    text = str(exc.value)
    assert text.startswith(f"{path}: key '{key}'") and msg in text and "\n" not in text


def test_not_yaml_and_missing_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("stages: [unclosed")
    with pytest.raises(InputError, match="not valid YAML"):
        load_curriculum(tmp_path / "bad.yaml")
    with pytest.raises(InputError, match="curriculum file not found"):
        load_curriculum(tmp_path / "none.yaml")


def test_relative_paths_resolve_against_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "cur.yaml"
    path.write_text(
        yaml.safe_dump(
            {"base_model": "Qwen/Qwen2.5-VL-7B-Instruct", "stages": [_stage(path="../data/emoart")]}
        )
    )
    cur = load_curriculum(path)
    assert cur.resolve("../data/emoart") == tmp_path / "sub" / "../data/emoart"
    assert cur.resolved_base() == "Qwen/Qwen2.5-VL-7B-Instruct"  # not a folder: a hub id


def test_training_on_the_test_split_is_refused(synthetic, tmp_path):
    cur = parse_curriculum(
        {
            "base_model": "m",
            "stages": [
                {
                    "name": "vqa",
                    "dataset": "mangavqa",
                    "path": str(synthetic["mangavqa"]),
                    "split": "test",
                    "steps": 1,
                }
            ],
        }
    )
    with pytest.raises(InputError, match="trains on split 'test', which is its evaluation split"):
        plan_stages(cur, tmp_path)


def test_overlapping_splits_are_refused(synthetic, tmp_path):
    # A "train" shard that repeats the test questions must not pass.
    import shutil

    root = tmp_path / "vqa"
    shutil.copytree(synthetic["mangavqa"], root)
    shutil.copy(
        root / "data" / "test-00000-of-00001.parquet",
        root / "data" / "train-00001-of-00002.parquet",
    )
    cur = parse_curriculum(
        {
            "base_model": "m",
            "stages": [{"name": "vqa", "dataset": "mangavqa", "path": str(root), "steps": 1}],
        }
    )
    # MangaVQA is compared by page: the 8 repeated rows are 8 test pages
    with pytest.raises(
        InputError,
        match=r"shares 8 manga pages with the evaluation split 'test' "
        r"\(8 training samples on them, e\.g\. page "
        r"TestTitle/000\)",
    ):
        plan_stages(cur, tmp_path / "out")


def test_emid_overlap_is_found_by_content(synthetic, tmp_path):
    # A train shard repeating test rows: EMID ids are row positions ("train-000024" vs
    # "test-000000"), so only a content identity (image bytes + question) can see the overlap.
    import shutil

    root = tmp_path / "emid"
    shutil.copytree(synthetic["emid"], root)
    shutil.copy(
        root / "data" / "test-00000-of-00001.parquet",
        root / "data" / "train-00001-of-00002.parquet",
    )
    cur = parse_curriculum(
        {
            "base_model": "m",
            "stages": [
                {
                    "name": "emid",
                    "dataset": "emid",
                    "path": str(root),
                    "task": "matching",
                    "steps": 1,
                }
            ],
        }
    )
    with pytest.raises(InputError, match="shares 8 samples with the evaluation split 'test'"):
        plan_stages(cur, tmp_path / "out")
    # the untouched synthetic set has no overlap
    clean = parse_curriculum(
        {
            "base_model": "m",
            "stages": [
                {
                    "name": "emid",
                    "dataset": "emid",
                    "path": str(synthetic["emid"]),
                    "task": "matching",
                    "steps": 1,
                }
            ],
        }
    )
    assert plan_stages(clean, tmp_path / "out")[0].samples


def test_plan_reads_and_limits_samples(synthetic, tmp_path):
    cur = parse_curriculum(
        {
            "base_model": "m",
            "seed": 3,
            "stages": [
                {
                    "name": "a",
                    "dataset": "emoart",
                    "path": str(synthetic["emoart"]),
                    "steps": 1,
                    "max_samples": 5,
                }
            ],
        }
    )
    plan = plan_stages(cur, tmp_path)[0]
    again = plan_stages(cur, tmp_path)[0]
    assert len(plan.samples) == 5 and plan.data_sha256 == again.data_sha256
    assert plan.out_dir == Path(tmp_path) / "adapters" / "a"


def test_eval_path_resolves_against_the_file_and_is_left_out_of_unset_dumps(tmp_path):
    path = tmp_path / "cur.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base_model": "m",
                "stages": [_stage(eval_path="../data/test.parquet"), _stage(name="s2")],
            }
        )
    )
    cur = load_curriculum(path)
    assert cur.stages[0].eval_path == "../data/test.parquet"
    assert cur.resolve(cur.stages[0].eval_path) == tmp_path / "../data/test.parquet"
    # a stage without it dumps as before the key existed (the experiment runner's stage hashes)
    assert "eval_path" not in cur.stages[1].model_dump()
    assert cur.stages[0].model_dump()["eval_path"] == "../data/test.parquet"


def test_missing_eval_path_names_stage_and_key(synthetic, tmp_path):
    cur = parse_curriculum(
        {
            "base_model": "m",
            "stages": [
                {
                    "name": "vqa",
                    "dataset": "mangavqa",
                    "path": str(synthetic["mangavqa"]),
                    "steps": 1,
                    "eval_path": str(tmp_path / "nowhere"),
                }
            ],
        }
    )
    with pytest.raises(InputError) as exc:
        plan_stages(cur, tmp_path / "out")
    assert str(exc.value) == (
        f"<curriculum>: stages.0 (vqa): key 'eval_path': {tmp_path / 'nowhere'} not found"
    )
