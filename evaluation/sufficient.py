"""Per-sample sufficient statistics, so a bootstrap replicate is one matrix product.

Every headline metric is a function of *sums over samples* of a per-sample vector: per-class
TP/FP/FN counts for the F1s, a correctness bit and a 1 for accuracies. A bootstrap replicate that
draws sample i w_i times therefore has sums ``w @ S``; all B replicates are ``W @ S`` with
W = [B, n]. Calling sklearn 1000 times per metric per variant cost minutes; this costs
milliseconds. The formulas here mirror sklearn's definitions (zero_division=0; macro averages
over the dataset's whole label set, a class absent from a replicate scoring 0) and the test suite
checks every metric against the sklearn-based :data:`metrics.METRICS` on random predictions and
random resamples.

The encoding is :func:`metrics._binarize`'s: C label columns plus a last *invalid* column that a
prediction sets when it holds anything outside the label set (gold never does). Count blocks are
therefore [n, C + 1] each; macro averages skip the invalid column, micro pools it (an FP).
The F1 statistics end with one more column, the count of samples that take part (all of them,
or those with one gold label for the single-label view): a replicate that drew none of them has
no value (NaN), as the sklearn-based definition says, rather than an F1 of 0.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .metrics import INVALID, Predictions, char_f1, exact_match

StatsFn = Callable[[Predictions], np.ndarray]  # -> [n, k]
ReduceFn = Callable[[np.ndarray], np.ndarray]  # [B, k] sums -> [B] metric values


def _onehot(rows: list[list[str]], labels: list[str], *, gold: bool = False) -> np.ndarray:
    # [n, C + 1]; predicted items outside the set mark the last (invalid) column, gold ones
    # are dropped (as metrics._binarize does)
    index = {lab: j for j, lab in enumerate(labels)}
    out = np.zeros((len(rows), len(labels) + 1))
    for i, row in enumerate(rows):
        for lab in row:
            j = index.get(lab, None if gold else len(labels))
            if j is not None:
                out[i, j] = 1.0
    return out


def _counts(gold: np.ndarray, pred: np.ndarray) -> np.ndarray:
    # [n, C] each -> [n, 3C + 1]: TP | FP | FN per class | 1 (the sample takes part)
    return np.concatenate(
        [gold * pred, (1 - gold) * pred, gold * (1 - pred), np.ones((len(gold), 1))], axis=1
    )


def _split(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    c = (sums.shape[1] - 1) // 3
    return sums[:, :c], sums[:, c : 2 * c], sums[:, 2 * c : 3 * c], sums[:, -1]


def _macro(sums: np.ndarray) -> np.ndarray:
    tp, fp, fn, n = _split(sums)
    tp, fp, fn = tp[:, :-1], fp[:, :-1], fn[:, :-1]  # the invalid column is no class
    denom = 2 * tp + fp + fn
    # zero_division=0: a class with no gold and no predicted instance scores 0 and still counts
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    n_labels = tp.shape[1]
    if n_labels == 0:
        return np.full(len(sums), np.nan)
    return np.where(n > 0, f1.sum(axis=1) / n_labels, np.nan)


def _micro(sums: np.ndarray) -> np.ndarray:
    tp, fp, fn, n = _split(sums)
    tp, fp, fn = tp.sum(axis=1), fp.sum(axis=1), fn.sum(axis=1)
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return np.where(n > 0, f1, np.nan)


def _ratio(sums: np.ndarray) -> np.ndarray:
    return np.divide(sums[:, 0], sums[:, 1], out=np.full(len(sums), np.nan), where=sums[:, 1] > 0)


def _single_rows(p: Predictions) -> tuple[list[list[str]], list[list[str]]]:
    return p.gold, [[x] if isinstance(x, str) and x else [INVALID] for x in p.pred]


def _multi_rows(p: Predictions) -> tuple[list[list[str]], list[list[str]]]:
    return p.gold, [list(x or []) for x in p.pred]


def _mask_single_gold(p: Predictions) -> np.ndarray:
    return np.array([len(g) == 1 for g in p.gold], dtype=float)[:, None]


def s_accuracy(p: Predictions) -> np.ndarray:
    ok = [float(isinstance(x, str) and x == g[0]) for x, g in zip(p.pred, p.gold)]
    return np.column_stack([ok, np.ones(len(p))])


def s_macro(p: Predictions) -> np.ndarray:
    gold, pred = _single_rows(p) if p.task == "single" else _multi_rows(p)
    return _counts(_onehot(gold, p.label_set, gold=True), _onehot(pred, p.label_set))


def s_subset(p: Predictions) -> np.ndarray:
    g, q = _onehot(p.gold, p.label_set, gold=True), _onehot(_multi_rows(p)[1], p.label_set)
    ok = (g == q).all(axis=1).astype(float)
    return np.column_stack([ok, np.ones(len(p))])


def s_example_f1(p: Predictions) -> np.ndarray:
    g, q = _onehot(p.gold, p.label_set, gold=True), _onehot(_multi_rows(p)[1], p.label_set)
    denom = g.sum(1) + q.sum(1)
    f1 = np.divide(2 * (g * q).sum(1), denom, out=np.zeros(len(p)), where=denom > 0)
    return np.column_stack([f1, np.ones(len(p))])


def s_single_accuracy(p: Predictions) -> np.ndarray:
    m = _mask_single_gold(p)[:, 0]
    top1 = p.top1 or [""] * len(p)
    ok = [float(t == g[0]) for t, g in zip(top1, p.gold)]
    return np.column_stack([np.array(ok) * m, m])


def s_single_macro(p: Predictions) -> np.ndarray:
    top1 = p.top1 or [""] * len(p)
    counts = _counts(
        _onehot(p.gold, p.label_set, gold=True),
        _onehot([[t or INVALID] for t in top1], p.label_set),
    )
    return counts * _mask_single_gold(p)


def _mean_of(values: Callable[[Predictions], list[float]]) -> StatsFn:
    return lambda p: np.column_stack([values(p), np.ones(len(p))])


STATS: dict[str, tuple[StatsFn, ReduceFn]] = {
    "accuracy": (s_accuracy, _ratio),
    "macro_f1": (s_macro, _macro),
    "subset_accuracy": (s_subset, _ratio),
    "example_f1": (s_example_f1, _ratio),
    "micro_f1": (s_macro, _micro),
    "single_accuracy": (s_single_accuracy, _ratio),
    "single_macro_f1": (s_single_macro, _macro),
    "exact_match": (
        _mean_of(lambda p: [exact_match(g, x or "") for g, x in zip(p.gold, p.pred)]),
        _ratio,
    ),
    "char_f1": (_mean_of(lambda p: [char_f1(g, x or "") for g, x in zip(p.gold, p.pred)]), _ratio),
    "judge_score": (
        _mean_of(lambda p: list(p.judge) if p.judge is not None else [np.nan] * len(p)),
        _ratio,
    ),
}


def replicate_values(p: Predictions, metric: str, weights: np.ndarray) -> np.ndarray:
    """The metric on every replicate; ``weights`` [B, n] counts how often each sample is drawn."""
    stats, reduce = STATS[metric]
    return reduce(weights @ stats(p))
