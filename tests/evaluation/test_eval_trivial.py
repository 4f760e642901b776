"""Trivial baselines: their predictions, their metrics by hand, and pairing with model rows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from emomerge.evaluation import metrics as M
from emomerge.evaluation.trivial import (
    ALL_LABELS,
    FROM_EVALUATED,
    FROM_TRAIN,
    MAJORITY,
    majority_labels,
    trivial_predictions,
)
from emomerge.merging.errors import InputError

SINGLE_SET = ["A", "B", "C", "D"]
MULTI_SET = ["Anger", "Joy", "Sadness", "Fear"]


def sample(
    sid: str, group: str, labels: list[str], label_set: list[str], **meta
) -> SimpleNamespace:
    return SimpleNamespace(
        id=sid, group=group, labels=labels, label_set=label_set, meta=meta, target=", ".join(labels)
    )


def single_samples() -> list[SimpleNamespace]:
    return [sample(f"s{i}", f"s{i}", [g], SINGLE_SET) for i, g in enumerate("ABACD")]


def multi_samples() -> list[SimpleNamespace]:
    gold = [["Anger"], ["Joy", "Sadness"], ["Sadness"], ["Anger", "Joy"]]
    return [sample(f"u{i + 1}", f"p{i // 2 + 1}", g, MULTI_SET) for i, g in enumerate(gold)]


def test_single_majority_from_train_labels_by_hand():
    train = [["A"], ["A"], ["B"], ["A"], ["B"], ["C"]]
    tb = trivial_predictions("single", single_samples(), train)
    assert tb.source == FROM_TRAIN and [name for name, _ in tb] == [MAJORITY]
    ((_, p),) = tb
    assert p.pred == ["A"] * 5 and p.top1 is None
    got = M.compute(p)
    # gold A B A C D, always A: accuracy 2/5; A: TP 2 FP 3 -> F1 4/7, B C D 0 -> (4/7)/4 = 1/7
    assert got["accuracy"] == pytest.approx(2 / 5)
    assert got["macro_f1"] == pytest.approx(1 / 7)
    assert "'A'" in tb.scoring[MAJORITY] and FROM_TRAIN in tb.scoring[MAJORITY]


def test_single_ties_go_to_label_set_order_and_fallback_is_noted():
    # A and B twice each in train: A (first in the label set), whatever the reading order
    tb = trivial_predictions("single", single_samples(), [["B"], ["B"], ["A"], ["A"]])
    assert next(iter(tb))[1].pred[0] == "A"
    # no train labels: counted on the evaluated gold (A twice) and said so
    tb = trivial_predictions("single", single_samples(), None)
    assert tb.source == FROM_EVALUATED and next(iter(tb))[1].pred == ["A"] * 5
    assert FROM_EVALUATED in tb.scoring[MAJORITY]


def test_multi_majority_and_all_labels_by_hand():
    # train: Anger 3/4, Joy 2/4, Sadness 1/4 -> labels of at least half: {Anger, Joy}; top1 Anger
    train = [["Anger"], ["Anger", "Joy"], ["Joy"], ["Anger", "Sadness"]]
    tb = trivial_predictions("multi", multi_samples(), train)
    named = dict(tb)
    assert list(named) == [MAJORITY, ALL_LABELS] and len(tb) == 2
    maj, every = named[MAJORITY], named[ALL_LABELS]
    assert maj.pred == [["Anger", "Joy"]] * 4 and maj.top1 == ["Anger"] * 4
    assert every.pred == [MULTI_SET] * 4 and every.top1 == ["Anger"] * 4
    # gold u1 {Anger}, u2 {Joy, Sadness}, u3 {Sadness}, u4 {Anger, Joy}; majority {Anger, Joy}:
    #   subset 1/4; example F1 (2/3 + 1/2 + 0 + 1)/4 = 13/24
    #   Anger TP2 FP2 -> 2/3, Joy 2/3, Sadness 0, Fear 0 -> macro 1/3; micro TP4 FP4 FN2 -> 4/7
    #   single view (u1 Anger, u3 Sadness), top1 Anger: acc 1/2, macro (2/3)/4 = 1/6
    got = M.compute(maj)
    assert got == pytest.approx(
        {
            "subset_accuracy": 1 / 4,
            "example_f1": 13 / 24,
            "macro_f1": 1 / 3,
            "micro_f1": 4 / 7,
            "single_accuracy": 1 / 2,
            "single_macro_f1": 1 / 6,
        }
    )
    # every label: subset 0; example F1 (2/5 + 2/3 + 2/5 + 2/3)/4 = 8/15
    #   Anger, Joy, Sadness TP2 FP2 -> 2/3 each, Fear TP0 FP4 -> 0: macro 1/2; micro TP6 FP10 -> 6/11
    got = M.compute(every)
    assert got == pytest.approx(
        {
            "subset_accuracy": 0.0,
            "example_f1": 8 / 15,
            "macro_f1": 1 / 2,
            "micro_f1": 6 / 11,
            "single_accuracy": 1 / 2,
            "single_macro_f1": 1 / 6,
        }
    )


def test_multi_majority_without_a_half_label_is_the_most_frequent():
    # n = 5, Anger 2 (< half): no label reaches half -> the single most frequent
    assert majority_labels([["Anger"], ["Joy"], ["Sadness"], ["Fear"], ["Anger"]], MULTI_SET) == [
        "Anger"
    ]
    # exactly half counts
    assert majority_labels([["Joy"], ["Joy", "Fear"], ["Anger"], ["Fear"]], MULTI_SET) == [
        "Joy",
        "Fear",
    ]


def test_vqa_has_none_and_bad_task_is_an_input_error():
    assert list(trivial_predictions("vqa", multi_samples(), None)) == []
    with pytest.raises(InputError, match="--task-type"):
        trivial_predictions("regression", multi_samples(), None)


def test_page_samples_expand_like_generated_answers():
    page = sample(
        "000001-p00001",
        "000001-p00001",
        ["Anger", "Joy"],
        MULTI_SET,
        utterance_labels=[["Anger"], ["Joy"]],
    )
    (_, p), _ = trivial_predictions("multi", [page], [["Joy"], ["Joy"]])
    assert p.ids == ["000001-p00001#u000", "000001-p00001#u001"]
    assert p.groups == ["000001-p00001"] * 2 and p.gold == [["Anger"], ["Joy"]]
    assert p.pred == [["Joy"], ["Joy"]]


@pytest.mark.parametrize("task", ["single", "multi"])
def test_predictions_pair_with_a_likelihood_variant(tmp_path, task):
    from emomerge.evaluation.bootstrap import paired_bootstrap
    from emomerge.evaluation.cache import PredictionCache
    from emomerge.evaluation.outputs import from_likelihood

    samples = single_samples() if task == "single" else multi_samples()
    cache = PredictionCache(tmp_path, "v", "h" * 16)
    n_labels = len(samples[0].label_set)
    cache.add(
        "sh",
        [
            {"id": s.id, "scores": [[-1.0 - ((i + j) % n_labels), 1] for j in range(n_labels)]}
            for i, s in enumerate(samples)
        ],
    )
    kw = {} if task == "single" else {"multilabel": "topk"}
    model = from_likelihood(task, samples, cache, "sh", length_norm=False, **kw)
    for _, p in trivial_predictions(task, samples, None):
        for f in ("task", "ids", "groups", "gold", "label_set"):
            assert getattr(p, f) == getattr(model, f), f
        assert (p.top1 is None) == (model.top1 is None)
        delta, pval = paired_bootstrap(model, p, "macro_f1", n_boot=50, seed=0)
        assert delta == pytest.approx(M.compute(model)["macro_f1"] - M.compute(p)["macro_f1"])
        assert 0 < pval <= 1
