"""From label scores to predicted labels: argmax, a validation-chosen threshold, or top-k.

Multi-label decisions work on p(label) = softmax over the candidate labels' scores, so one
threshold means the same thing for every utterance whatever the prompt length. The threshold is
chosen on a validation part (EmoComics35 has no validation split; :mod:`.holdout` carves one out
of train by book) to maximise example-based F1. Every EmoComics35 utterance carries at least one
label (Neutral is a label), so when no label clears the threshold the argmax is predicted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .metrics import example_f1


def label_probs(values: Sequence[float]) -> np.ndarray:
    """Softmax of the per-label scores (log-probabilities, summed or per-token)."""
    v = np.asarray(values, dtype=float)
    e = np.exp(v - v.max())
    return e / e.sum()


def argmax_label(values: Sequence[float], label_set: Sequence[str]) -> str:
    """The best-scoring label (first one on ties)."""
    return label_set[int(np.argmax(values))]


def threshold_labels(values: Sequence[float], label_set: Sequence[str], threshold: float) -> list[str]:
    """Labels with p ≥ threshold (the argmax alone when none does), in label-set order."""
    p = label_probs(values)
    keep = [lab for lab, q in zip(label_set, p) if q >= threshold]
    return keep or [argmax_label(values, label_set)]


def topk_labels(values: Sequence[float], label_set: Sequence[str], k: int) -> list[str]:
    """The ``k`` best labels (k = the gold count: an oracle on *how many*, not *which*)."""
    order = np.argsort(-np.asarray(values, dtype=float), kind="stable")[: max(k, 1)]
    return [label_set[i] for i in sorted(order)]


def choose_threshold(values: Sequence[Sequence[float]], gold: Sequence[Sequence[str]],
                     label_set: Sequence[str]) -> float:
    """The threshold on p(label) that maximises example-based F1 on validation samples.

    Candidates are the midpoints between consecutive distinct probabilities seen on validation
    (every distinct decision is reachable); ties go to the higher threshold (fewer labels).
    """
    probs = np.array([label_probs(v) for v in values])
    distinct = np.unique(probs)
    cands = np.concatenate([[distinct[0] / 2], (distinct[:-1] + distinct[1:]) / 2,
                            [min(1.0, distinct[-1] + 1e-9)]])
    best_t, best_f = float(cands[-1]), -1.0
    for t in cands[::-1]:
        pred = [threshold_labels(v, label_set, t) for v in values]
        f = example_f1(gold, pred, label_set)
        if f > best_f + 1e-12:
            best_t, best_f = float(t), f
    return best_t
