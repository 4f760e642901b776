"""Stage option ``holdout``: validation books left out of training and recorded for evaluation."""

from __future__ import annotations

import pytest

from emomerge.merging.errors import InputError
from emomerge.training.curriculum import parse_curriculum
from emomerge.training.data import read_dataset
from emomerge.training.data.holdout import book_of, holdout_books
from emomerge.training.stages import plan_stages


def _plan(synthetic, tmp_path, dataset="emocomics35", **stage):
    cur = parse_curriculum(
        {
            "base_model": "m",
            "stages": [
                {
                    "name": "s",
                    "dataset": dataset,
                    "path": str(synthetic[dataset]),
                    "steps": 1,
                    "holdout": {"fraction": 0.1, "seed": 0},
                    **stage,
                }
            ],
        }
    )
    return cur, plan_stages(cur, tmp_path)[0]


def test_evaluation_reexports_the_same_functions():
    from emomerge.evaluation import holdout as ev
    from emomerge.training.data import holdout as tr

    assert ev.holdout_books is tr.holdout_books and ev.book_of is tr.book_of
    assert ev.holdout_by_book is tr.holdout_by_book


def test_stage_trains_without_the_held_out_books_and_records_them(synthetic, tmp_path):
    full = read_dataset("emocomics35", synthetic["emocomics35"], "train")
    want = holdout_books(full, 0.1, seed=0)
    cur, plan = _plan(synthetic, tmp_path)
    assert want and not {book_of(s) for s in plan.samples} & set(want)
    assert len(plan.samples) == sum(book_of(s) not in want for s in full)
    # the key path the evaluation engineer reads: meta.dataset["holdout"]["books"]
    assert plan.dataset_record(cur)["holdout"] == {"books": want, "fraction": 0.1, "seed": 0}


def test_books_are_drawn_from_the_whole_split_before_max_samples(synthetic, tmp_path):
    full = read_dataset("emocomics35", synthetic["emocomics35"], "train")
    _, plan = _plan(synthetic, tmp_path, max_samples=5)
    assert len(plan.samples) == 5
    assert plan.holdout["books"] == holdout_books(full, 0.1, seed=0)
    assert not {book_of(s) for s in plan.samples} & set(plan.holdout["books"])


def test_no_holdout_no_record(synthetic, tmp_path):
    cur = parse_curriculum(
        {
            "base_model": "m",
            "stages": [
                {
                    "name": "s",
                    "dataset": "emocomics35",
                    "path": str(synthetic["emocomics35"]),
                    "steps": 1,
                }
            ],
        }
    )
    assert "holdout" not in plan_stages(cur, tmp_path)[0].dataset_record(cur)


def test_dataset_without_books_is_refused(synthetic, tmp_path):
    with pytest.raises(
        InputError,
        match=r"stages\.0 \(s\): key 'holdout': dataset 'emoart' "
        "has no books",
    ):
        _plan(synthetic, tmp_path, dataset="emoart")
