"""Metrics pinned to values computed by hand (fractions written out below), and macro-F1 over the
fixed label set against sklearn called plainly in the test."""

from __future__ import annotations

import numpy as np
import pytest

from emomerge.evaluation import metrics as M
from emomerge.evaluation.metrics import INVALID, Predictions
from tests.evaluation.eval_cases import MULTI_LABELS, multi_preds, single_preds


def test_single_label_headline():
    got = M.compute(single_preds())
    assert got["accuracy"] == pytest.approx(4 / 6)
    # over the whole label set A B C D (D: no gold, no prediction -> F1 0 by zero_division=0):
    # (2/3 + 4/5 + 2/3 + 0) / 4 = 8/15, not the present-classes mean 32/45
    assert got["macro_f1"] == pytest.approx(8 / 15)


def test_single_label_per_class_and_confusion():
    d = M.details(single_preds())
    pc = d["per_class"]
    assert (pc["A"]["precision"], pc["A"]["recall"], pc["A"]["f1"]) == pytest.approx(
        (1, 0.5, 2 / 3)
    )
    assert (pc["B"]["precision"], pc["B"]["recall"], pc["B"]["f1"]) == pytest.approx(
        (2 / 3, 1, 0.8)
    )
    assert pc["C"]["recall"] == pytest.approx(0.5) and pc["C"]["support"] == 2
    assert pc["D"]["support"] == 0
    cm = d["confusion"]
    assert cm["columns"] == ["A", "B", "C", "D", INVALID]
    assert cm["matrix"] == [[1, 1, 0, 0, 0], [0, 2, 0, 0, 0], [0, 0, 1, 0, 1], [0, 0, 0, 0, 0]]


def test_multi_label_headline():
    got = M.compute(multi_preds())
    assert got["subset_accuracy"] == pytest.approx(1 / 2)
    assert got["example_f1"] == pytest.approx(2 / 3)
    # Anger 4/5, Joy 1, Sadness 0, Fear (never gold nor predicted) 0 -> 9/20 (not 3/5)
    assert got["macro_f1"] == pytest.approx(9 / 20)
    assert got["micro_f1"] == pytest.approx(8 / 11)
    assert got["single_accuracy"] == pytest.approx(1 / 2)
    # single view: Anger 2/3, Joy 0, Sadness 0, Fear 0 -> 1/6 (not 1/3)
    assert got["single_macro_f1"] == pytest.approx(1 / 6)


def test_multi_label_per_label_and_set_semantics():
    d = M.details(multi_preds())
    assert d["per_label"]["Anger"]["f1"] == pytest.approx(4 / 5)
    assert d["per_label"]["Joy"]["f1"] == pytest.approx(1.0)
    assert d["per_label"]["Sadness"]["recall"] == 0.0
    assert d["single_view"]["n"] == 2
    # Order inside a label list must not matter (sets, never positions).
    p = multi_preds()
    swapped = Predictions(
        **{**p.__dict__, "pred": [["Anger"], ["Joy"], ["Anger"], ["Joy", "Anger"]]}
    )
    assert M.compute(swapped)["subset_accuracy"] == pytest.approx(1 / 2)


def test_multi_label_out_of_set_prediction_is_not_credited():
    p = multi_preds()
    # s1 predicted "Shock" (out of set): it matches nothing, so s1 loses its exact-set credit.
    bad = Predictions(**{**p.__dict__, "pred": [["Shock"], ["Joy"], ["Anger"], ["Anger", "Joy"]]})
    assert M.compute(bad)["subset_accuracy"] == pytest.approx(1 / 4)


def test_vqa_exact_match_and_char_f1():
    assert M.exact_match(["東京タワー"], " 東京タワー ") == 1.0
    assert M.exact_match(["ＡＢＣ１２３"], "ABC123") == 1.0  # NFKC: full-width digits
    assert M.exact_match(["東京"], "京都") == 0.0
    # 京都 vs 東京: one shared char, P 1/2, R 1/2 -> 1/2
    assert M.char_f1(["東京"], "京都") == pytest.approx(1 / 2)
    # 東京都 vs 東京: two shared, P 2/3, R 1 -> 4/5
    assert M.char_f1(["東京"], "東京都") == pytest.approx(4 / 5)
    # best over alternative gold answers
    assert M.char_f1(["大阪", "東京"], "東京") == pytest.approx(1.0)
    p = Predictions(
        task="vqa",
        ids=["a", "b"],
        groups=["a", "b"],
        gold=[["東京"], ["ＡＢ"]],
        pred=["東京都", "AB"],
        label_set=[],
    )
    got = M.compute(p, ["exact_match", "char_f1"])
    assert got["exact_match"] == pytest.approx(1 / 2)
    assert got["char_f1"] == pytest.approx((4 / 5 + 1) / 2)


def test_correctness_vectors():
    assert M.correctness(single_preds()).tolist() == [1, 0, 1, 1, 1, 0]
    assert M.correctness(multi_preds()).tolist() == [1, 0, 0, 1]
    assert M.single_view(multi_preds()).tolist() == [0, 2]
    assert isinstance(M.single_view(multi_preds()), np.ndarray)


def test_out_of_set_item_next_to_a_right_label_is_not_an_exact_match():
    # gold {Joy}, answer "Joy, Shock": the sets differ -> subset accuracy 0, as McNemar says;
    # example F1 = 2*|{Joy}| / (|gold| 1 + |pred| 2) = 2/3; micro: TP 1 (Joy), FP 1 (the invalid
    # column), FN 0 -> 2/3; macro over the label set only: Joy F1 1, Anger 0 -> 1/2.
    p = Predictions(
        task="multi",
        ids=["u"],
        groups=["p"],
        gold=[["Joy"]],
        pred=[["Joy", "Shock"]],
        label_set=["Anger", "Joy"],
        top1=["Joy"],
    )
    got = M.compute(p)
    assert got["subset_accuracy"] == 0.0
    assert got["example_f1"] == pytest.approx(2 / 3)
    assert got["micro_f1"] == pytest.approx(2 / 3)
    assert got["macro_f1"] == pytest.approx(1 / 2)
    assert M.correctness(p).tolist() == [0]
    assert list(M.details(p)["per_label"]) == ["Anger", "Joy"]  # no column for the invalid item
    # the fast bootstrap statistics read the same encoding
    from emomerge.evaluation.bootstrap import bootstrap

    est = bootstrap(p, ["subset_accuracy", "example_f1", "micro_f1", "macro_f1"], n_boot=20)
    assert (est["subset_accuracy"].lo, est["subset_accuracy"].hi) == (0.0, 0.0)
    assert est["example_f1"].hi == pytest.approx(2 / 3)
    assert est["micro_f1"].hi == pytest.approx(2 / 3)
    assert est["macro_f1"].lo == pytest.approx(1 / 2)


def test_generated_out_of_set_words_reach_the_metrics():
    import tempfile
    from types import SimpleNamespace

    from emomerge.evaluation.cache import PredictionCache
    from emomerge.evaluation.outputs import from_generation

    s = SimpleNamespace(
        id="u1", group="p1", labels=["Joy"], label_set=["Anger", "Joy"], meta={}, target=""
    )
    with tempfile.TemporaryDirectory() as d:
        cache = PredictionCache(d, "v", "h" * 16)
        cache.add("sh", [{"id": "u1", "text": "['Joy', 'Shock']"}])
        preds, rep = from_generation("multi", [s], cache, "sh")
    assert preds.pred == [["Joy", "Shock"]]
    assert rep.failures == 1 and rep.out_of_set == {"Shock": 1}
    assert M.compute(preds)["subset_accuracy"] == 0.0


# ---------------------------------------------------------------- fixed label sets

FIXED = ["Anger", "Disgust", "Fear", "Joy"]  # Disgust is the rare label


def _pair_single() -> tuple[Predictions, Predictions]:
    # gold has Disgust once; variant a predicts it once (right), variant b never predicts it
    gold = ["Anger", "Anger", "Joy", "Joy", "Fear", "Disgust"]
    a = ["Anger", "Joy", "Joy", "Joy", "Fear", "Disgust"]
    b = ["Anger", "Anger", "Joy", "Joy", "Fear", "Joy"]

    def mk(pred):
        return Predictions(
            "single",
            [f"s{i}" for i in range(6)],
            [f"s{i}" for i in range(6)],
            [[g] for g in gold],
            pred,
            FIXED,
        )

    return mk(a), mk(b)


def test_single_macro_f1_averages_the_fixed_label_set_for_every_variant():
    from sklearn.metrics import f1_score

    a, b = _pair_single()
    gold = [g[0] for g in a.gold]
    for p in (a, b):
        expected = f1_score(gold, p.pred, labels=FIXED, average="macro", zero_division=0)
        assert M.compute(p)["macro_f1"] == pytest.approx(expected)
    # b never predicts Disgust: Disgust F1 0 stays in its mean. By hand (fixed set):
    # b: Anger 1, Disgust 0, Fear 1, Joy 2*2/(2*2+1+0)=4/5 -> (1+0+1+4/5)/4 = 7/10
    assert M.compute(b)["macro_f1"] == pytest.approx(7 / 10)
    # the present-labels mean (the old rule) would be the same here, since gold has Disgust;
    # drop Disgust's sample and the old rule would skip it for b entirely:
    keep = [0, 1, 2, 3, 4]
    b2 = Predictions(
        "single",
        [b.ids[i] for i in keep],
        [b.groups[i] for i in keep],
        [b.gold[i] for i in keep],
        [b.pred[i] for i in keep],
        FIXED,
    )
    fixed = f1_score(
        [g[0] for g in b2.gold], b2.pred, labels=FIXED, average="macro", zero_division=0
    )
    old = f1_score(
        [g[0] for g in b2.gold],
        b2.pred,
        labels=["Anger", "Fear", "Joy"],
        average="macro",
        zero_division=0,
    )
    # Anger 1, Fear 1, Joy 1, Disgust 0 -> 3/4 (old rule: 1)
    assert M.compute(b2)["macro_f1"] == pytest.approx(fixed) == pytest.approx(3 / 4)
    assert old == pytest.approx(1.0)


def test_multilabel_macro_f1_is_over_the_fixed_label_set():
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    gold = [["Anger"], ["Anger", "Disgust"], ["Joy"], ["Fear", "Joy"]]
    a = [["Anger"], ["Anger", "Disgust"], ["Joy"], ["Joy"]]
    b = [["Anger"], ["Anger"], ["Joy"], ["Joy", "Shock"]]  # never Disgust; Shock out of set
    mlb = MultiLabelBinarizer(classes=FIXED).fit([FIXED])
    for pred in (a, b):
        p = Predictions(
            "multi",
            ["u1", "u2", "u3", "u4"],
            ["p1", "p1", "p2", "p2"],
            gold,
            pred,
            FIXED,
            top1=[row[0] for row in pred],
        )
        y_true = mlb.transform(gold)
        y_pred = mlb.transform([[x for x in row if x in FIXED] for row in pred])
        expected = f1_score(y_true, y_pred, average="macro", zero_division=0)
        assert M.compute(p)["macro_f1"] == pytest.approx(expected)
    # by hand, b: Anger 1, Disgust 0 (1 FN), Fear 0 (1 FN), Joy 1 -> 1/2
    pb = Predictions(
        "multi",
        ["u1", "u2", "u3", "u4"],
        ["p1", "p1", "p2", "p2"],
        gold,
        b,
        FIXED,
        top1=["Anger"] * 4,
    )
    assert M.compute(pb)["macro_f1"] == pytest.approx(1 / 2)
    # Shock stays a false positive for micro: TP 4, FP 1 (Shock), FN 2 -> 8/11, no macro column
    assert M.compute(pb)["micro_f1"] == pytest.approx(8 / 11)
    assert list(M.per_label_f1(pb)) == FIXED


def test_multilabel_macro_fixed_differs_from_present_labels_rule():
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    # Disgust is in neither gold nor b's predictions; a predicts it once (a false positive).
    gold = [["Anger"], ["Joy"], ["Fear"]]
    a = [["Anger", "Disgust"], ["Joy"], ["Fear"]]
    b = [["Anger"], ["Joy"], ["Anger"]]
    mlb = MultiLabelBinarizer(classes=FIXED).fit([FIXED])
    got, old = [], []
    for pred in (a, b):
        p = Predictions(
            "multi",
            ["u1", "u2", "u3"],
            ["p1", "p2", "p3"],
            gold,
            pred,
            FIXED,
            top1=[row[0] for row in pred],
        )
        y_true, y_pred = mlb.transform(gold), mlb.transform(pred)
        got.append(M.compute(p)["macro_f1"])
        assert got[-1] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
        cols = (y_true.sum(0) + y_pred.sum(0)) > 0
        old.append(f1_score(y_true[:, cols], y_pred[:, cols], average="macro", zero_division=0))
    # fixed set, by hand: a: Anger 1, Disgust 0, Fear 1, Joy 1 -> 3/4;
    #                     b: Anger 2/3, Disgust 0, Fear 0, Joy 1 -> 5/12
    assert got == pytest.approx([3 / 4, 5 / 12])
    # the old rule averaged a over 4 labels but b over 3 (Disgust absent): 3/4 vs 5/9
    assert old == pytest.approx([3 / 4, 5 / 9])
    assert got[1] != pytest.approx(old[1])


def test_per_label_f1_in_label_set_order():
    # single: per class of eval_cases.single_preds (A 2/3, B 4/5, C 2/3, D 0)
    assert M.per_label_f1(single_preds()) == pytest.approx(
        {"A": 2 / 3, "B": 4 / 5, "C": 2 / 3, "D": 0.0}
    )
    assert list(M.per_label_f1(single_preds())) == ["A", "B", "C", "D"]
    # multi: eval_cases.multi_preds (Anger 4/5, Joy 1, Sadness 0, Fear 0)
    got = M.per_label_f1(multi_preds())
    assert list(got) == MULTI_LABELS
    assert got == pytest.approx({"Anger": 4 / 5, "Joy": 1.0, "Sadness": 0.0, "Fear": 0.0})
    # their mean is the macro-F1
    assert np.mean(list(got.values())) == pytest.approx(M.compute(multi_preds())["macro_f1"])
    vqa = Predictions("vqa", ["q"], ["q"], [["東京"]], ["東京"], [])
    assert M.per_label_f1(vqa) == {}
