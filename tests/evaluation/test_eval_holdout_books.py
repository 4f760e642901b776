"""The multi-label threshold is chosen on the books the variant's training stages held out.

Stage metadata is written by hand here in the shape training records (``dataset.holdout``), so
these tests need no model.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from emomerge.evaluation import variants as V
from emomerge.evaluation.runner import VALIDATION_SPLIT, EvalConfig, validation_for
from emomerge.merging.lineage import Lineage, StageMetadata, write_stage_metadata


def _stage(
    root: Path, name: str, dataset: str, books: list[str] | None, parent: str | None = None
) -> Path:
    d = root / name
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    record = {"name": dataset, "split": "train", "sha256": "0" * 64}
    if books is not None:
        record["holdout"] = {"books": books, "fraction": 0.25, "seed": 3}
    write_stage_metadata(
        d,
        StageMetadata(
            stage=name,
            stage_index=0,
            dataset=record,
            lineage=Lineage(mode="continued" if parent else None, parent=parent),
        ),
    )
    return d


def _merge(root: Path, name: str, inputs: list[Path]) -> Path:
    d = root / name
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    (d / "emomerge.json").write_text(
        json.dumps(
            {
                "kind": "merge",
                "method": "linear",
                "params": {},
                "adapters": [{"path": str(p), "stage": p.name} for p in inputs],
            }
        )
    )
    return d


@pytest.fixture()
def folders(tmp_path):
    art = _stage(tmp_path, "art", "emoart", None)
    ec = _stage(tmp_path, "ec", "emocomics35", ["b1", "b2"], parent="../art")
    ec2 = _stage(tmp_path, "ec2", "emocomics35", ["b3"])
    ec_all = _stage(tmp_path, "ec_all", "emocomics35", None)  # trained on every book
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_config.json").write_text("{}")  # no emomerge.json
    return {
        "art": art,
        "ec": ec,
        "ec2": ec2,
        "ec_all": ec_all,
        "bare": bare,
        "m": _merge(tmp_path, "m", [ec, ec2]),
        "m_all": _merge(tmp_path, "m_all", [ec, ec_all]),
        "m_overlap": _merge(
            tmp_path, "m_overlap", [ec, _stage(tmp_path, "ec3", "emocomics35", ["b2", "b4"])]
        ),
        "m_same": _merge(
            tmp_path, "m_same", [ec, _stage(tmp_path, "ec4", "emocomics35", ["b2", "b1"])]
        ),
    }


def test_recorded_books_per_variant(folders):
    v = {k: V.variant_from_dir(p) for k, p in folders.items()}
    assert V.heldout_books(v["ec"], "emocomics35") == (["b1", "b2"], V.HELDOUT)
    # a merge of inputs with disjoint hold-outs: each trained on the other's books, so no book is
    # unseen by both; the union is used and the row says it is partial
    assert V.heldout_books(v["m"], "emocomics35") == (["b1", "b2", "b3"], V.HELDOUT_PARTIAL)
    # overlapping hold-outs: the books neither input saw
    assert V.heldout_books(v["m_overlap"], "emocomics35") == (["b2"], V.HELDOUT)
    assert V.heldout_books(v["m_same"], "emocomics35") == (["b1", "b2"], V.HELDOUT)
    # one input trained on every book: the records are used, and the row says it is partial
    assert V.heldout_books(v["m_all"], "emocomics35") == (["b1", "b2"], V.HELDOUT_PARTIAL)
    assert V.heldout_books(v["ec_all"], "emocomics35") == (None, V.NOT_HELD_OUT)
    assert V.heldout_books(v["bare"], "emocomics35") == (None, V.NOT_HELD_OUT)
    assert V.heldout_books(v["art"], "emocomics35") == (None, V.UNSEEN)
    assert V.heldout_books(V.Variant("base", "base"), "emocomics35") == (None, V.UNSEEN)


def _pool() -> list[SimpleNamespace]:
    return [
        SimpleNamespace(
            id=f"{b}-{i}",
            group=f"{b}-p{i}",
            meta={"file_nr": b},
            labels=["Joy"],
            label_set=["Joy", "Fear"],
        )
        for b in ("b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8")
        for i in range(2)
    ]


def test_threshold_books_follow_the_record_and_the_holdout_seed(folders):
    pool = _pool()
    cfg = EvalConfig(dataset="emocomics35", val_fraction=0.25, seed=0, holdout_seed=0)
    val, source = validation_for(V.variant_from_dir(folders["m_overlap"]), cfg, None, pool)
    assert source == V.HELDOUT
    assert [s.id for s in val] == ["b2-0", "b2-1"]
    val, source = validation_for(V.variant_from_dir(folders["m"]), cfg, None, pool)
    assert source == V.HELDOUT_PARTIAL
    assert [s.id for s in val] == ["b1-0", "b1-1", "b2-0", "b2-1", "b3-0", "b3-1"]
    # no record: a seeded draw of 2 of the 8 books, labelled as not held out
    val, source = validation_for(V.variant_from_dir(folders["ec_all"]), cfg, None, pool)
    assert source == V.NOT_HELD_OUT and len({s.meta["file_nr"] for s in val}) == 2

    # the draw follows holdout_seed, never the bootstrap seed
    def books(c):
        return sorted(
            {s.meta["file_nr"] for s in validation_for(V.Variant("base", "base"), c, None, pool)[0]}
        )

    other_boot = EvalConfig(dataset="emocomics35", val_fraction=0.25, seed=7, holdout_seed=0)
    assert books(other_boot) == books(cfg)
    assert any(
        books(EvalConfig(dataset="emocomics35", val_fraction=0.25, holdout_seed=h)) != books(cfg)
        for h in range(1, 6)
    )
    # a validation split wins over everything
    assert validation_for(V.variant_from_dir(folders["ec"]), cfg, pool[:2], pool) == (
        pool[:2],
        VALIDATION_SPLIT,
    )


def test_recorded_books_missing_from_the_pool_is_an_input_error(folders):
    from emomerge.merging.errors import InputError

    pool = [s for s in _pool() if s.meta["file_nr"] not in ("b1", "b2")]
    with pytest.raises(InputError, match="held out books"):
        validation_for(
            V.variant_from_dir(folders["ec"]), EvalConfig(dataset="emocomics35"), None, pool
        )
