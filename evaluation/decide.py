"""From label scores to predicted labels: argmax, validation-chosen thresholds, or top-k.

First-label scoring (one score per label): multi-label decisions work on p(label) = softmax over
the candidate labels' scores, so one threshold means the same thing for every utterance whatever
the prompt length; it is chosen on a validation part (EmoComics35 has no validation split;
:mod:`.holdout` carves one out of train by book) to maximise example-based F1.

Label-set scoring (one score per candidate label set, :mod:`.scoring`): each label's presence
probability is the mass of the sets that contain it (:func:`set_marginals`), and each label is
decided by its own threshold tuned on validation for its F1 — the headline macro-F1 is the mean
of per-label F1s, so the thresholds are independent — or by one shared macro-F1 threshold where
that does better out of fold (:func:`choose_label_thresholds`).

Every EmoComics35 utterance carries at least one label (Neutral is a label), so when no label
clears its threshold the best label is predicted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def label_probs(values: Sequence[float]) -> np.ndarray:
    """Softmax of the per-label scores (log-probabilities, summed or per-token)."""
    v = np.asarray(values, dtype=float)
    e = np.exp(v - v.max())
    return e / e.sum()


def argmax_label(values: Sequence[float], label_set: Sequence[str]) -> str:
    """The best-scoring label (first one on ties)."""
    return label_set[int(np.argmax(values))]


def threshold_labels(
    values: Sequence[float], label_set: Sequence[str], threshold: float
) -> list[str]:
    """Labels with p ≥ threshold (the argmax alone when none does), in label-set order."""
    p = label_probs(values)
    keep = [lab for lab, q in zip(label_set, p) if q >= threshold]
    return keep or [argmax_label(values, label_set)]


def topk_labels(values: Sequence[float], label_set: Sequence[str], k: int) -> list[str]:
    """The ``k`` best labels (k = the gold count: an oracle on *how many*, not *which*)."""
    order = np.argsort(-np.asarray(values, dtype=float), kind="stable")[: max(k, 1)]
    return [label_set[i] for i in sorted(order)]


def choose_threshold(
    values: Sequence[Sequence[float]],
    gold: Sequence[Sequence[str]],
    label_set: Sequence[str],
    *,
    chunk: int = 256,
) -> float:
    """The threshold on p(label) that maximises example-based F1 on validation samples.

    Candidates are the midpoints between consecutive distinct probabilities seen on validation
    (every distinct decision is reachable); ties go to the higher threshold (fewer labels).
    All candidates are scored at once, ``chunk`` at a time ([chunk, n, C] booleans), with the
    decision rule of :func:`threshold_labels` and the F1 of :func:`metrics.example_f1`.
    """
    probs = np.array([label_probs(v) for v in values])  # [n, C]
    index = {lab: j for j, lab in enumerate(label_set)}
    g = np.zeros(probs.shape, dtype=bool)  # [n, C]
    for i, row in enumerate(gold):
        for lab in row:
            if lab in index:
                g[i, index[lab]] = True
    top = np.zeros(probs.shape, dtype=bool)
    top[np.arange(len(probs)), np.argmax(probs, axis=1)] = True  # the fallback label
    distinct = np.unique(probs)
    cands = np.concatenate(
        [[distinct[0] / 2], (distinct[:-1] + distinct[1:]) / 2, [min(1.0, distinct[-1] + 1e-9)]]
    )
    f1 = np.empty(len(cands))
    for lo in range(0, len(cands), chunk):
        pred = probs[None] >= cands[lo : lo + chunk, None, None]  # [t, n, C]
        pred |= ~pred.any(axis=2, keepdims=True) & top[None]
        hits = (pred & g[None]).sum(axis=2)
        denom = pred.sum(axis=2) + g.sum(axis=1)[None]
        f1[lo : lo + chunk] = np.mean(
            np.divide(2 * hits, denom, out=np.zeros(hits.shape), where=denom > 0), axis=1
        )
    best = f1.max()
    return float(cands[np.flatnonzero(f1 >= best - 1e-12)[-1]])


# ------------------------------------------------------------------ label-set (presence) scoring


def set_marginals(
    values: Sequence[float], sets: Sequence[Sequence[int]], n_labels: int
) -> np.ndarray:
    """Presence probability of every label: Σ_{S ∋ label} p(S), p = softmax over the candidate
    label sets' scores (``sets[k]`` holds the label indices of candidate k)."""
    member = np.zeros((len(sets), n_labels))
    for k, s in enumerate(sets):
        member[k, list(s)] = 1.0
    return label_probs(values) @ member


def presence_labels(
    marginals: Sequence[float], label_set: Sequence[str], thresholds: Sequence[float]
) -> list[str]:
    """Labels whose presence probability clears their own threshold, in label-set order; the most
    probable label alone when none does (every EmoComics35 utterance carries a label)."""
    m = np.asarray(marginals, dtype=float)
    keep = [lab for lab, q, t in zip(label_set, m, thresholds) if q >= t]
    return keep or [label_set[int(np.argmax(m))]]


def _candidates(p: np.ndarray) -> np.ndarray:
    """Thresholds that reach every distinct decision on ``p``: below the smallest value, the
    midpoints between distinct values, and just above the largest (predict none)."""
    d = np.unique(p)
    return np.concatenate([[d[0] / 2], (d[:-1] + d[1:]) / 2, [d[-1] + 1e-9]])


def _counts(p: np.ndarray, g: np.ndarray, cands: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, predicted positives) of ``p ≥ t`` for every candidate t (sorted search)."""
    n = len(p)
    npred = n - np.searchsorted(np.sort(p), cands, side="left")
    pos = np.sort(p[g])
    tp = len(pos) - np.searchsorted(pos, cands, side="left")
    return tp, npred


def _f1(tp: np.ndarray, npred: np.ndarray, ngold: Any, empty: float = 0.0) -> np.ndarray:
    """F1 = 2 TP / (predicted + gold); ``empty`` where a label is neither gold nor predicted."""
    denom = npred + ngold
    return np.divide(
        2.0 * tp, denom, out=np.full(np.shape(tp), empty, dtype=float), where=denom > 0
    )


def best_label_threshold(p: Sequence[float], gold: Sequence[bool]) -> float:
    """The threshold on one label's presence probabilities that maximises that label's F1
    (``p ≥ t`` predicts it); ties go to the higher threshold (fewer predictions). A label never
    gold is best never predicted: F1 counts 1 when it is neither gold nor predicted (macro-F1
    leaves such a label out, where predicting it would add an F1 of 0)."""
    p, g = np.asarray(p, dtype=float), np.asarray(gold, dtype=bool)
    cands = _candidates(p)
    f1 = _f1(*_counts(p, g, cands), int(g.sum()), empty=1.0)
    return float(cands[np.flatnonzero(f1 >= f1.max() - 1e-12)[-1]])


def _label_f1s(probs: np.ndarray, g: np.ndarray, cands: np.ndarray) -> np.ndarray:
    """[T, C] per-label F1 of ``probs ≥ t`` for every global candidate t (0 for a label neither
    gold nor predicted: ``zero_division=0``, as the leaderboard's macro-F1)."""
    f1 = np.empty((len(cands), probs.shape[1]))
    for c in range(probs.shape[1]):
        tp, npred = _counts(probs[:, c], g[:, c], cands)
        f1[:, c] = _f1(tp, npred, int(g[:, c].sum()))
    return f1


def best_global_threshold(probs: np.ndarray, g: np.ndarray) -> float:
    """One threshold for every label that maximises the macro-F1 the leaderboard reports (the
    mean over the whole label set, ``zero_division=0``: :func:`metrics.multilabel_f1`) of
    ``probs ≥ t``; ties go to the higher threshold. A label never gold in ``g`` scores 0 whether
    predicted or not, so it does not pull the shared threshold (a mean over only the labels in
    gold or prediction did: it counted predicting such a label as a 0 added to the mean)."""
    cands = _candidates(np.asarray(probs, dtype=float).ravel())
    macro = _label_f1s(probs, g, cands).mean(axis=1)
    return float(cands[np.flatnonzero(macro >= macro.max() - 1e-12)[-1]])


@dataclass(frozen=True)
class LabelThresholds:
    """Per-label decision thresholds on presence probabilities, and where each came from."""

    thresholds: dict[str, float]  # the threshold each label is decided with
    choice: dict[str, str]  # "label" (its own tuned threshold) or "global" (the shared one)
    global_threshold: float

    def values(self, label_set: Sequence[str]) -> list[float]:
        return [self.thresholds[lab] for lab in label_set]

    @classmethod
    def fixed(cls, threshold: float, label_set: Sequence[str]) -> LabelThresholds:
        """One given threshold for every label (``--threshold``)."""
        return cls(
            {lab: threshold for lab in label_set}, {lab: "global" for lab in label_set}, threshold
        )


def _indicators(gold: Sequence[Sequence[str]], label_set: Sequence[str]) -> np.ndarray:
    index = {lab: j for j, lab in enumerate(label_set)}
    g = np.zeros((len(gold), len(label_set)), dtype=bool)
    for i, row in enumerate(gold):
        for lab in row:
            if lab in index:
                g[i, index[lab]] = True
    return g


def _fold_f1(probs: np.ndarray, g: np.ndarray, folds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-label F1 of the two rules out of fold: thresholds tuned on one fold, counts pooled
    over the other fold(s). Returns (per-label rule F1s, global rule F1s), each [C]."""
    C = probs.shape[1]
    counts = np.zeros((2, 3, C))  # rule × (tp, predicted, gold) × label
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        own = np.array([best_label_threshold(probs[tr, c], g[tr, c]) for c in range(C)])
        shared = best_global_threshold(probs[tr], g[tr])
        for r, t in enumerate((own, np.full(C, shared))):
            pred = probs[te] >= t[None]
            counts[r] += [(pred & g[te]).sum(0), pred.sum(0), g[te].sum(0)]
    return tuple(_f1(tp, npred, ng, empty=1.0) for tp, npred, ng in counts)  # type: ignore


def choose_label_thresholds(
    probs: Sequence[Sequence[float]],
    gold: Sequence[Sequence[str]],
    label_set: Sequence[str],
    groups: Sequence[str] | None = None,
) -> LabelThresholds:
    """Thresholds on presence probabilities for macro-F1, chosen on validation samples.

    Macro-F1 is the mean of per-label F1s, so each label's threshold can be tuned for its own F1
    (:func:`best_label_threshold`); one shared threshold tuned for macro-F1
    (:func:`best_global_threshold`) is the alternative. Tuned on the same samples it is judged
    on, a label's own threshold always wins, so the two are compared out of fold: validation is
    split into two halves by ``groups`` (books), thresholds are tuned on one half and the label's
    F1 counted on the other; a label keeps its own threshold (tuned on all of validation) only
    where that beat the shared one, e.g. not for a rare label whose few validation positives
    make its own threshold noise. Without two groups every label takes its own threshold.
    The searches decide ``p ≥ t`` alone; the decision rule's fallback (the most probable label
    when none clears, :func:`presence_labels`) is left out so labels stay independent.
    """
    p = np.asarray(probs, dtype=float)
    g = _indicators(gold, label_set)
    own = [best_label_threshold(p[:, c], g[:, c]) for c in range(len(label_set))]
    shared = best_global_threshold(p, g)
    use_own = np.ones(len(label_set), dtype=bool)
    if groups is not None and len(set(groups)) >= 2:
        order = {grp: i % 2 for i, grp in enumerate(sorted(set(groups)))}
        own_f1, shared_f1 = _fold_f1(p, g, np.array([order[x] for x in groups]))
        use_own = own_f1 >= shared_f1 - 1e-12  # ties keep the label's own threshold
    return LabelThresholds(
        {lab: float(own[c]) if use_own[c] else shared for c, lab in enumerate(label_set)},
        {lab: "label" if use_own[c] else "global" for c, lab in enumerate(label_set)},
        shared,
    )
