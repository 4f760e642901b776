"""Metrics pinned to values computed by hand (fractions written out below), not by sklearn."""

from __future__ import annotations

import numpy as np
import pytest
from emomerge.evaluation import metrics as M
from emomerge.evaluation.metrics import INVALID, Predictions

from tests.evaluation.eval_cases import MULTI_LABELS, multi_preds, single_preds  # noqa: F401


def test_single_label_headline():
    got = M.compute(single_preds())
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["macro_f1"] == pytest.approx(32 / 45)


def test_single_label_per_class_and_confusion():
    d = M.details(single_preds())
    pc = d["per_class"]
    assert (pc["A"]["precision"], pc["A"]["recall"], pc["A"]["f1"]) == pytest.approx((1, .5, 2 / 3))
    assert (pc["B"]["precision"], pc["B"]["recall"], pc["B"]["f1"]) == pytest.approx((2 / 3, 1, .8))
    assert pc["C"]["recall"] == pytest.approx(0.5) and pc["C"]["support"] == 2
    assert pc["D"]["support"] == 0
    cm = d["confusion"]
    assert cm["columns"] == ["A", "B", "C", "D", INVALID]
    assert cm["matrix"] == [[1, 1, 0, 0, 0], [0, 2, 0, 0, 0], [0, 0, 1, 0, 1], [0, 0, 0, 0, 0]]


def test_multi_label_headline():
    got = M.compute(multi_preds())
    assert got["subset_accuracy"] == pytest.approx(1 / 2)
    assert got["example_f1"] == pytest.approx(2 / 3)
    assert got["macro_f1"] == pytest.approx(3 / 5)
    assert got["micro_f1"] == pytest.approx(8 / 11)
    assert got["single_accuracy"] == pytest.approx(1 / 2)
    assert got["single_macro_f1"] == pytest.approx(1 / 3)


def test_multi_label_per_label_and_set_semantics():
    d = M.details(multi_preds())
    assert d["per_label"]["Anger"]["f1"] == pytest.approx(4 / 5)
    assert d["per_label"]["Joy"]["f1"] == pytest.approx(1.0)
    assert d["per_label"]["Sadness"]["recall"] == 0.0
    assert d["single_view"]["n"] == 2
    # Order inside a label list must not matter (sets, never positions).
    p = multi_preds()
    swapped = Predictions(**{**p.__dict__, "pred": [["Anger"], ["Joy"], ["Anger"], ["Joy", "Anger"]]})
    assert M.compute(swapped)["subset_accuracy"] == pytest.approx(1 / 2)


def test_multi_label_out_of_set_prediction_is_not_credited():
    p = multi_preds()
    # s1 predicted "Shock" (out of set): it matches nothing, so s1 loses its exact-set credit.
    bad = Predictions(**{**p.__dict__, "pred": [["Shock"], ["Joy"], ["Anger"], ["Anger", "Joy"]]})
    assert M.compute(bad)["subset_accuracy"] == pytest.approx(1 / 4)


def test_vqa_exact_match_and_char_f1():
    assert M.exact_match(["東京タワー"], " 東京タワー ") == 1.0
    assert M.exact_match(["ＡＢＣ１２３"], "ABC123") == 1.0          # NFKC: full-width digits
    assert M.exact_match(["東京"], "京都") == 0.0
    # 京都 vs 東京: one shared char, P 1/2, R 1/2 -> 1/2
    assert M.char_f1(["東京"], "京都") == pytest.approx(1 / 2)
    # 東京都 vs 東京: two shared, P 2/3, R 1 -> 4/5
    assert M.char_f1(["東京"], "東京都") == pytest.approx(4 / 5)
    # best over alternative gold answers
    assert M.char_f1(["大阪", "東京"], "東京") == pytest.approx(1.0)
    p = Predictions(task="vqa", ids=["a", "b"], groups=["a", "b"], gold=[["東京"], ["ＡＢ"]],
                    pred=["東京都", "AB"], label_set=[])
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
    # column), FN 0 -> 2/3; macro over the labels only: Joy F1 1 -> 1.
    p = Predictions(task="multi", ids=["u"], groups=["p"], gold=[["Joy"]],
                    pred=[["Joy", "Shock"]], label_set=["Anger", "Joy"], top1=["Joy"])
    got = M.compute(p)
    assert got["subset_accuracy"] == 0.0
    assert got["example_f1"] == pytest.approx(2 / 3)
    assert got["micro_f1"] == pytest.approx(2 / 3)
    assert got["macro_f1"] == pytest.approx(1.0)
    assert M.correctness(p).tolist() == [0]
    assert list(M.details(p)["per_label"]) == ["Anger", "Joy"]   # no column for the invalid item
    # the fast bootstrap statistics read the same encoding
    from emomerge.evaluation.bootstrap import bootstrap
    est = bootstrap(p, ["subset_accuracy", "example_f1", "micro_f1", "macro_f1"], n_boot=20)
    assert (est["subset_accuracy"].lo, est["subset_accuracy"].hi) == (0.0, 0.0)
    assert est["example_f1"].hi == pytest.approx(2 / 3)
    assert est["micro_f1"].hi == pytest.approx(2 / 3)
    assert est["macro_f1"].lo == pytest.approx(1.0)


def test_generated_out_of_set_words_reach_the_metrics():
    import tempfile
    from types import SimpleNamespace

    from emomerge.evaluation.cache import PredictionCache
    from emomerge.evaluation.outputs import from_generation

    s = SimpleNamespace(id="u1", group="p1", labels=["Joy"], label_set=["Anger", "Joy"],
                        meta={}, target="")
    with tempfile.TemporaryDirectory() as d:
        cache = PredictionCache(d, "v", "h" * 16)
        cache.add("sh", [{"id": "u1", "text": "['Joy', 'Shock']"}])
        preds, rep = from_generation("multi", [s], cache, "sh")
    assert preds.pred == [["Joy", "Shock"]]
    assert rep.failures == 1 and rep.out_of_set == {"Shock": 1}
    assert M.compute(preds)["subset_accuracy"] == 0.0
