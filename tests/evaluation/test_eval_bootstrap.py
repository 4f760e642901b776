"""Bootstrap intervals, paired bootstrap and McNemar against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from emomerge.evaluation.bootstrap import (
    bootstrap,
    group_index,
    mcnemar,
    paired_bootstrap,
    replicate_indices,
)
from emomerge.evaluation.metrics import Predictions
from tests.evaluation.eval_cases import multi_preds, single_preds

# Correctness of single_preds(): [1, 0, 1, 1, 1, 0]. Five hand-picked replicates:
REPS = [np.array(r) for r in ([0] * 6, [1] * 6, [0, 1, 2, 3, 4, 5], [0, 1] * 3, [2, 3, 4, 5, 2, 3])]
# their accuracies: 1, 0, 4/6, 1/2, 5/6 -> sorted 0, 1/2, 2/3, 5/6, 1
# np.quantile (linear): q=.025 at position 4*.025 = 0.1 -> 0 + 0.1*(1/2) = 0.05
#                       q=.975 at position 3.9       -> 5/6 + 0.9*(1/6) = 0.98333...


def perfect(p: Predictions) -> Predictions:
    return Predictions(**{**p.__dict__, "pred": [g[0] for g in p.gold]})


def test_percentile_interval_by_hand():
    est = bootstrap(single_preds(), ["accuracy"], replicates=REPS)["accuracy"]
    assert est.value == pytest.approx(4 / 6)
    assert est.lo == pytest.approx(0.05)
    assert est.hi == pytest.approx(5 / 6 + 0.9 / 6)


def test_paired_bootstrap_by_hand():
    # delta = 2/3 - 1 = -1/3; replicate deltas 0, -1, -1/3, -1/2, -1/6; centred |d* - d| =
    # 1/3, 2/3, 0, 1/6, 1/6 -> two are >= 1/3 -> p = (1 + 2) / (5 + 1) = 1/2
    delta, p = paired_bootstrap(
        single_preds(), perfect(single_preds()), "accuracy", replicates=REPS
    )
    assert delta == pytest.approx(-1 / 3)
    assert p == pytest.approx(0.5)


def test_paired_bootstrap_identical_variants_is_not_significant():
    delta, p = paired_bootstrap(single_preds(), single_preds(), "macro_f1", n_boot=50, seed=1)
    assert delta == 0.0 and p == 1.0


def test_mcnemar_exact_by_hand():
    # discordant pairs: a right/b wrong 0, a wrong/b right 2 -> P(X=0)+P(X=2), X~Bin(2,1/2) = 1/2
    assert mcnemar(single_preds(), perfect(single_preds())) == pytest.approx(0.5)
    gold = [["A"]] * 10
    a = Predictions(
        "single",
        [str(i) for i in range(10)],
        [str(i) for i in range(10)],
        gold,
        ["B"] * 5 + ["A"] * 5,
        ["A", "B"],
    )
    b = Predictions(**{**a.__dict__, "pred": ["A"] * 10})
    # 5 discordant, all one way: 2 * (1/2)^5 = 1/16
    assert mcnemar(a, b) == pytest.approx(1 / 16)
    assert mcnemar(a, a) == 1.0


def test_group_resampling_keeps_pages_whole_and_is_seeded():
    groups = ["p1", "p1", "p2", "p2", "p2", "p3"]
    assert [g.tolist() for g in group_index(groups)] == [[0, 1], [2, 3, 4], [5]]
    reps = replicate_indices(groups, 20, seed=7)
    whole = [{0, 1}, {2, 3, 4}, {5}]
    for r in reps:
        members = set(r.tolist())
        assert all(g <= members or not (g & members) for g in whole)
    again = replicate_indices(groups, 20, seed=7)
    assert all((x == y).all() for x, y in zip(reps, again))
    assert any(
        (x != y).any() if len(x) == len(y) else True
        for x, y in zip(reps, replicate_indices(groups, 20, seed=8))
    )


def test_multilabel_bootstrap_interval_brackets_value():
    est = bootstrap(multi_preds(), ["example_f1", "macro_f1"], n_boot=200, seed=0)
    for e in est.values():
        assert e.lo <= e.value <= e.hi


def _random_preds(task: str, rng: np.random.Generator, n: int = 40) -> Predictions:
    labels = ["A", "B", "C", "D", "E"]
    if task == "single":
        gold = [[labels[i]] for i in rng.integers(0, 4, n)]  # E never gold
        pred = [
            None if r < 0.1 else labels[i] for r, i in zip(rng.random(n), rng.integers(0, 5, n))
        ]
        top1 = None
    elif task == "multi":
        gold = [
            sorted({labels[i] for i in rng.integers(0, 4, rng.integers(1, 3))}) for _ in range(n)
        ]
        pred = [
            sorted({labels[i] for i in rng.integers(0, 5, rng.integers(0, 3))})
            + (["Shock"] if rng.random() < 0.1 else [])
            for _ in range(n)
        ]
        top1 = [labels[i] for i in rng.integers(0, 5, n)]
    else:
        words = ["東京", "京都", "大阪", "ABC", "ＡＢＣ"]
        gold = [[words[i]] for i in rng.integers(0, 5, n)]
        pred = [words[i] + ("都" if rng.random() < 0.3 else "") for i in rng.integers(0, 5, n)]
        top1 = None
    groups = [f"g{i // 3}" for i in range(n)]
    return Predictions(task, [str(i) for i in range(n)], groups, gold, pred, labels, top1)


@pytest.mark.parametrize("task", ["single", "multi", "vqa"])
def test_fast_replicates_equal_sklearn_on_resamples(task):
    """The sufficient-statistics replicates equal the sklearn metric on the resampled samples."""
    from emomerge.evaluation.bootstrap import weight_matrix
    from emomerge.evaluation.metrics import HEADLINE, METRICS
    from emomerge.evaluation.sufficient import replicate_values

    rng = np.random.default_rng(0)
    p = _random_preds(task, rng)
    reps = replicate_indices(p.groups, 25, seed=3)
    weights = weight_matrix(reps, len(p))
    for name in HEADLINE[task]:
        if name == "judge_score":
            continue
        fast = replicate_values(p, name, weights)
        slow = np.array([METRICS[name].fn(p, idx) for idx in reps])
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12, err_msg=name)


def test_fast_replicates_fixed_label_set_and_empty_single_view():
    """Replicates that miss whole labels (they still count, F1 0) or every single-gold sample
    (single-view metrics undefined: NaN on both paths) agree with the sklearn definitions."""
    from emomerge.evaluation.bootstrap import weight_matrix
    from emomerge.evaluation.metrics import HEADLINE, METRICS
    from emomerge.evaluation.sufficient import replicate_values

    labels = ["A", "B", "C", "D"]
    # page g0: two two-label utterances (no single-gold sample); g1: one A; g2: one C, wrong
    p = Predictions(
        "multi",
        ["u0", "u1", "u2", "u3"],
        ["g0", "g0", "g1", "g2"],
        [["A", "B"], ["B", "C"], ["A"], ["C"]],
        [["A"], ["B", "C", "Shock"], ["A"], ["D"]],
        labels,
        top1=["A", "B", "A", "D"],
    )
    reps = [np.array([0, 1, 0, 1]), np.array([2, 2]), np.array([3, 0, 1]), np.array([0, 1, 2, 3])]
    weights = weight_matrix(reps, len(p))
    for name in HEADLINE["multi"]:
        fast = replicate_values(p, name, weights)
        slow = np.array([METRICS[name].fn(p, idx) for idx in reps])
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12, err_msg=name)
    # by hand: replicate 0 holds no single-gold sample; replicate 1 only u2 (A right):
    # single macro = (1 + 0 + 0 + 0) / 4 over the fixed set A B C D
    single = replicate_values(p, "single_macro_f1", weights)
    assert np.isnan(single[0]) and single[1] == pytest.approx(1 / 4)
    # replicate 1, multi macro: A TP 2 -> 1, B C D absent -> 0 -> 1/4
    assert replicate_values(p, "macro_f1", weights)[1] == pytest.approx(1 / 4)
