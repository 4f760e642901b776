"""Seeds aggregate to mean ± sample std (checked against hand-computed values), in the per-set
tables and the variant × dataset grid."""

from __future__ import annotations

import pytest

from emomerge.experiment.report import aggregate, grid_table, markdown_table


def _row(variant, kind, seed, f1, p=None, lo=None, hi=None, dataset="emocomics35", task="multi"):
    return {
        "architecture": "tiny",
        "dataset": dataset,
        "split": "test",
        "task": task,
        "variant": variant,
        "kind": kind,
        "method": "ties" if kind == "merged" else "",
        "seed": str(seed),
        "macro_f1": str(f1),
        "macro_f1_lo": "" if lo is None else str(lo),
        "macro_f1_hi": "" if hi is None else str(hi),
        "macro_f1_p": "" if p is None else str(p),
        "example_f1": "0.5",
        "subset_accuracy": "0.25",
    }


def test_mean_and_sample_std():
    mean, std = aggregate([0.2, 0.4, 0.9])
    assert mean == pytest.approx(0.5)
    # sample std: sqrt(((−0.3)² + (−0.1)² + 0.4²) / 2) = sqrt(0.13)
    assert std == pytest.approx(0.36055512754639896)
    assert aggregate([0.7]) == (0.7, None)


def test_table_over_three_seeds():
    rows = []
    for seed, (stage, merged, p) in enumerate([(0.2, 0.3, 0.01), (0.4, 0.5, 0.2), (0.9, 0.4, 0.5)]):
        rows += [
            _row("emocomics35", "stage", seed, stage),
            _row("ties", "merged", seed, merged, p=p),
        ]
    table = markdown_table(rows, "emocomics35")
    assert "| emocomics35 | stage |  | 0.500 ± 0.361 | 0.500 ± 0.000 | 0.250 ± 0.000 | — |" in table
    # ties: mean 0.4, std sqrt((0.01 + 0.01 + 0) / 2) = 0.1; one p per seed
    assert (
        "| ties | merged | ties | 0.400 ± 0.100 | 0.500 ± 0.000 | 0.250 ± 0.000 | 0.01 / 0.2 / 0.5 |"
        in table
    )
    assert "mean ± std over seeds 0, 1, 2" in table
    assert "No merge scores above `emocomics35` (0.500)" in table


def test_one_seed_shows_the_interval():
    rows = [
        _row("emocomics35", "stage", 0, 0.25, lo=0.1, hi=0.4),
        _row("ties", "merged", 0, 0.3, p=0.04, lo=0.2, hi=0.45),
    ]
    table = markdown_table(rows, "emocomics35")
    assert "| ties | merged | ties | 0.300 [0.200, 0.450] | 0.500 | 0.250 | 0.04 |" in table
    assert (
        "1 of 1 merges score above `emocomics35` (0.250) on macro_f1: ties (0.300, p < 0.05)"
        in table
    )


def test_grid_over_three_seeds_marks_only_when_every_seed_is_significant():
    rows = []
    for seed, (stage, merged, p, art, art_p) in enumerate(
        [(0.2, 0.3, 0.01, 0.5, 0.01), (0.4, 0.5, 0.2, 0.7, 0.03), (0.9, 0.4, 0.5, 0.6, 0.04)]
    ):
        rows += [
            _row("emocomics35", "stage", seed, stage),
            _row("ties", "merged", seed, merged, p=p),
            _row("emocomics35", "stage", seed, 0.1, dataset="emoart", task="single"),
            _row("ties", "merged", seed, art, p=art_p, dataset="emoart", task="single"),
        ]
    table = grid_table(rows, "emocomics35")
    assert (
        "(mean ± std over seeds 0, 1, 2; `*`: p < 0.05 in the paired test vs `emocomics35`, "
        "raw p (unadjusted" in table
    )
    assert (
        "| variant | kind | method | emocomics35/test macro-F1 (mean ± std) "
        "| emoart/test macro-F1 (mean ± std) |"
    ) in table
    # ties on emocomics35: p 0.01 / 0.2 / 0.5, no mark; on emoart: all three below 0.05
    assert "| ties | merged | ties | 0.400 ± 0.100 | 0.600 ± 0.100 * |" in table
    assert "| emocomics35 | stage |  | 0.500 ± 0.361 | 0.100 ± 0.000 |" in table
    assert grid_table(rows, "emocomics35") in markdown_table(rows, "emocomics35")
