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
                     label_set: Sequence[str], *, chunk: int = 256) -> float:
    """The threshold on p(label) that maximises example-based F1 on validation samples.

    Candidates are the midpoints between consecutive distinct probabilities seen on validation
    (every distinct decision is reachable); ties go to the higher threshold (fewer labels).
    All candidates are scored at once, ``chunk`` at a time ([chunk, n, C] booleans), with the
    decision rule of :func:`threshold_labels` and the F1 of :func:`metrics.example_f1`.
    """
    probs = np.array([label_probs(v) for v in values])                    # [n, C]
    index = {lab: j for j, lab in enumerate(label_set)}
    g = np.zeros(probs.shape, dtype=bool)                                  # [n, C]
    for i, row in enumerate(gold):
        for lab in row:
            if lab in index:
                g[i, index[lab]] = True
    top = np.zeros(probs.shape, dtype=bool)
    top[np.arange(len(probs)), np.argmax(probs, axis=1)] = True           # the fallback label
    distinct = np.unique(probs)
    cands = np.concatenate([[distinct[0] / 2], (distinct[:-1] + distinct[1:]) / 2,
                            [min(1.0, distinct[-1] + 1e-9)]])
    f1 = np.empty(len(cands))
    for lo in range(0, len(cands), chunk):
        pred = probs[None] >= cands[lo: lo + chunk, None, None]            # [t, n, C]
        pred |= ~pred.any(axis=2, keepdims=True) & top[None]
        hits = (pred & g[None]).sum(axis=2)
        denom = pred.sum(axis=2) + g.sum(axis=1)[None]
        f1[lo: lo + chunk] = np.mean(np.divide(2 * hits, denom, out=np.zeros(hits.shape),
                                               where=denom > 0), axis=1)
    best = f1.max()
    return float(cands[np.flatnonzero(f1 >= best - 1e-12)[-1]])
