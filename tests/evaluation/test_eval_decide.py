"""Decision rules and the by-book validation hold-out, on numbers small enough to check by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from emomerge.evaluation import decide
from emomerge.evaluation.holdout import holdout_books, holdout_by_book
from emomerge.merging.errors import InputError

LABELS = ["A", "B", "C"]
# log-probabilities chosen so the softmax is exact: p = (0.5, 0.3, 0.2)
VALUES = [math.log(0.5), math.log(0.3), math.log(0.2)]


def test_probs_argmax_threshold_topk():
    np.testing.assert_allclose(decide.label_probs(VALUES), [0.5, 0.3, 0.2])
    assert decide.argmax_label(VALUES, LABELS) == "A"
    assert decide.threshold_labels(VALUES, LABELS, 0.25) == ["A", "B"]
    assert decide.threshold_labels(VALUES, LABELS, 0.9) == ["A"]  # none clears: argmax
    assert decide.topk_labels(VALUES, LABELS, 2) == ["A", "B"]
    assert decide.topk_labels(VALUES, LABELS, 1) == ["A"]


def test_choose_threshold_maximises_example_f1():
    # Two validation utterances, both p = (0.5, 0.3, 0.2).
    # gold {A, B} for both: threshold in (0.2, 0.3] predicts {A, B} -> example F1 1 (best);
    # any threshold above 0.3 predicts {A} -> F1 2/3; at or below 0.2 {A,B,C} -> F1 4/5.
    t = decide.choose_threshold([VALUES, VALUES], [["A", "B"], ["A", "B"]], LABELS)
    assert 0.2 < t <= 0.3
    # gold {A} only: the highest threshold that still predicts {A} alone wins
    t = decide.choose_threshold([VALUES], [["A"]], LABELS)
    assert t > 0.3


def _sample(i: int, book: int):
    return SimpleNamespace(id=str(i), group=f"{book:06d}-p{i:05d}", meta={"file_nr": book})


def test_holdout_is_by_book_and_seeded():
    samples = [_sample(i, book) for book in range(10) for i in range(3)]
    books = holdout_books(samples, 0.2, seed=0)
    assert len(books) == 2 and books == holdout_books(samples, 0.2, seed=0)
    val = holdout_by_book(samples, 0.2, seed=0)
    assert len(val) == 6 and {s.meta["file_nr"] for s in val} == {int(b) for b in books}
    with pytest.raises(InputError, match="val-fraction"):
        holdout_books(samples, 1.5)


def test_vectorised_threshold_search_equals_the_plain_loop():
    """The all-candidates-at-once search picks what scoring each candidate with sklearn picks."""
    from emomerge.evaluation.metrics import example_f1

    rng = np.random.default_rng(4)
    labels = ["Anger", "Disgust", "Fear", "Joy", "Neutral", "Sadness", "Surprise"]
    values = rng.normal(size=(60, 7)).tolist()
    gold = [sorted({labels[j] for j in rng.integers(0, 7, rng.integers(1, 4))}) for _ in range(60)]
    probs = np.array([decide.label_probs(v) for v in values])
    distinct = np.unique(probs)
    cands = np.concatenate(
        [[distinct[0] / 2], (distinct[:-1] + distinct[1:]) / 2, [min(1.0, distinct[-1] + 1e-9)]]
    )
    best_t, best_f = None, -1.0
    for t in cands[::-1]:  # highest first: ties keep the higher one
        f = example_f1(gold, [decide.threshold_labels(v, labels, t) for v in values], labels)
        if f > best_f + 1e-12:
            best_t, best_f = float(t), f
    assert decide.choose_threshold(values, gold, labels) == best_t
    assert decide.choose_threshold(values, gold, labels, chunk=7) == best_t
