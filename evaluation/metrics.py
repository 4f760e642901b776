"""Task metrics: single-label, multi-label (EmoComics35) and MangaVQA answers.

Classification metrics come from scikit-learn, never re-implemented here, so a number in the
leaderboard means what the sklearn documentation says it means. MangaVQA's character F1 has no
sklearn equivalent and is the one hand-written metric (SQuAD's token F1 with characters as tokens).

Every metric is declared once in :data:`METRICS` (its name, function and printed label) with the
per-task lists in :data:`HEADLINE` (scored, with intervals), :data:`REPORTED` (the report's
tables) and :data:`CORRECTNESS` (McNemar's per-sample test); the bootstrap, the leaderboard's
columns and the report iterate those tables, not ad-hoc names (DESIGN.md, "Where each concept
lives").
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)
from sklearn.preprocessing import MultiLabelBinarizer

#: Stands in for an unparsable / out-of-set answer in single-label predictions. It is never in the
#: label set, so sklearn (given ``labels=label_set``) counts it as a miss of the gold class and a
#: false positive of no class: the sample is wrong, and no class gets credit for it.
INVALID = "<invalid>"

TASKS = ("single", "multi", "vqa")


@dataclass(frozen=True)
class Predictions:
    """Per-sample gold and predictions of one variant on one split, in a fixed sample order.

    ``pred`` holds one label (single), a list of labels (multi) or an answer string (vqa).
    ``top1`` is the single best label of multi-label samples (likelihood argmax, or the first label
    of a generated answer); it feeds the single-label view of EmoComics35.
    """

    task: str
    ids: list[str]
    groups: list[str]
    gold: list[list[str]]
    pred: list[Any]
    label_set: list[str]
    top1: list[str] | None = None
    judge: list[float] | None = None

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------- single-label (EmoArt, EMID)


def _single_pred(pred: Sequence[Any]) -> list[str]:
    return [p if isinstance(p, str) and p else INVALID for p in pred]


def accuracy(gold: Sequence[str], pred: Sequence[Any]) -> float:
    """Fraction of samples whose predicted label equals the gold label."""
    return float(accuracy_score(list(gold), _single_pred(pred)))


def macro_f1(gold: Sequence[str], pred: Sequence[Any], labels: Sequence[str]) -> float:
    """Unweighted mean of the per-class F1 over *every* class of ``labels`` (zero_division=0).

    The label set is the dataset's declared one, the same for every variant: averaging over the
    classes present in gold or prediction would average two variants over different sets, and a
    variant that never predicts a rare class would drop its F1 of 0 from its mean. A class absent
    from both gold and prediction (possible in a small resample) scores 0, as sklearn's
    ``zero_division=0`` says. INVALID is no class of ``labels``: a miss, nobody's credit.
    """
    if not labels:
        return float("nan")
    return float(
        f1_score(
            list(gold), _single_pred(pred), labels=list(labels), average="macro", zero_division=0
        )
    )


def per_class(gold: Sequence[str], pred: Sequence[Any], labels: Sequence[str]) -> dict:
    """Per-class precision, recall, F1 and support."""
    p, r, f, s = precision_recall_fscore_support(
        list(gold), _single_pred(pred), labels=list(labels), zero_division=0
    )
    return {
        lab: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
        }
        for i, lab in enumerate(labels)
    }


def confusion(gold: Sequence[str], pred: Sequence[Any], labels: Sequence[str]) -> dict:
    """Confusion matrix (rows gold, columns predicted); an extra last column counts invalid answers."""
    cols = list(labels) + [INVALID]
    cm = confusion_matrix(list(gold), _single_pred(pred), labels=cols)
    return {"labels": list(labels), "columns": cols, "matrix": cm[: len(labels)].tolist()}


# ---------------------------------------------------------------- multi-label (EmoComics35)


def _binarize(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], labels: Sequence[str]):
    """[n, C + 1] gold and predicted indicator matrices: column k is ``labels[k]``, the last
    column marks a prediction holding anything outside the set (an out-of-set word, an unreadable
    answer). Gold never sets it, so such a prediction is a false positive there: the label sets
    differ (subset accuracy 0), the example F1 counts one extra predicted label, micro-F1 one
    extra FP. Macro-F1 and the per-label scores read the first C columns only."""
    mlb = MultiLabelBinarizer(classes=list(labels))
    keep = set(labels)
    y_true = mlb.fit_transform([[g for g in row if g in keep] for row in gold])
    y_pred = mlb.transform([[p for p in (row or []) if p in keep] for row in pred])
    bad = np.array(
        [int(any(p not in keep for p in (row or []))) for row in pred], dtype=y_pred.dtype
    ).reshape(len(pred), 1)
    return np.hstack([y_true, np.zeros_like(bad)]), np.hstack([y_pred, bad])


def subset_accuracy(gold, pred, labels) -> float:
    """Fraction of samples whose predicted label *set* equals the gold set exactly (an out-of-set
    item in the prediction makes the sets differ)."""
    y_true, y_pred = _binarize(gold, pred, labels)
    return float(accuracy_score(y_true, y_pred))


def example_f1(gold, pred, labels) -> float:
    """Example-based F1: per-sample F1 of the two sets, averaged over samples (sklearn 'samples');
    out-of-set predicted items count as one wrong predicted label."""
    y_true, y_pred = _binarize(gold, pred, labels)
    return float(f1_score(y_true, y_pred, average="samples", zero_division=0))


def multilabel_f1(gold, pred, labels, average: str) -> float:
    """Macro (mean over the label set) or micro (pooled counts) F1 of the binarized problem.

    Macro averages over every label of ``labels`` (as :func:`macro_f1`, zero_division=0); the
    invalid column is no label and stays out of it. Micro pools it in: out-of-set answers are
    false positives.
    """
    y_true, y_pred = _binarize(gold, pred, labels)
    if average == "macro":
        if not labels:
            return float("nan")
        y_true, y_pred = y_true[:, :-1], y_pred[:, :-1]
    return float(f1_score(y_true, y_pred, average=average, zero_division=0))


def per_label(gold, pred, labels) -> dict:
    """Per-label precision, recall, F1 and support of the binarized multi-label problem."""
    y_true, y_pred = _binarize(gold, pred, labels)
    p, r, f, s = precision_recall_fscore_support(
        y_true[:, :-1], y_pred[:, :-1], average=None, zero_division=0
    )
    return {
        lab: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
        }
        for i, lab in enumerate(labels)
    }


def per_label_f1(p: Predictions) -> dict[str, float]:
    """F1 of every label of ``p.label_set``, in label-set order: per class for single-label
    tasks, per binarized label column for multi-label ones (``{}`` for MangaVQA answers).

    These are the terms whose mean is ``macro_f1``; the leaderboard keeps them so a macro-F1
    gain can be traced to the labels that made it.
    """
    if p.task == "single":
        return {
            lab: d["f1"]
            for lab, d in per_class([g[0] for g in p.gold], p.pred, p.label_set).items()
        }
    if p.task == "multi":
        return {lab: d["f1"] for lab, d in per_label(p.gold, p.pred, p.label_set).items()}
    return {}


def single_view(preds: Predictions) -> np.ndarray:
    """Indices of the utterances with exactly one gold label (the single-label view)."""
    return np.array([i for i, g in enumerate(preds.gold) if len(g) == 1], dtype=int)


# ---------------------------------------------------------------- MangaVQA


def normalize_answer(text: str) -> str:
    """NFKC (full-width → half-width, compatibility forms) and surrounding whitespace removed."""
    return unicodedata.normalize("NFKC", text or "").strip()


def exact_match(gold: Sequence[str], answer: str) -> float:
    """1 when the normalised answer equals any normalised gold answer."""
    a = normalize_answer(answer)
    return float(any(a == normalize_answer(g) for g in gold))


def char_f1(gold: Sequence[str], answer: str) -> float:
    """Character-level F1 (multiset overlap, whitespace ignored), best over the gold answers."""
    a = Counter(c for c in normalize_answer(answer) if not c.isspace())
    best = 0.0
    for g in gold:
        gc = Counter(c for c in normalize_answer(g) if not c.isspace())
        common = sum((a & gc).values())
        if common == 0:
            continue
        p, r = common / sum(a.values()), common / sum(gc.values())
        best = max(best, 2 * p * r / (p + r))
    return best


# ---------------------------------------------------------------- the declarative table


@dataclass(frozen=True)
class Metric:
    """A headline metric: how to compute it on a subset of samples, how tables print its name,
    and which way is better."""

    name: str
    fn: Callable[[Predictions, np.ndarray], float]
    label: str
    higher_is_better: bool = True


def _take(seq: Sequence[Any], idx: np.ndarray) -> list[Any]:
    return [seq[i] for i in idx]


def _single_gold(p: Predictions, idx: np.ndarray) -> list[str]:
    return [g[0] for g in _take(p.gold, idx)]


def _m_accuracy(p: Predictions, idx: np.ndarray) -> float:
    return accuracy(_single_gold(p, idx), _take(p.pred, idx))


def _m_macro_f1(p: Predictions, idx: np.ndarray) -> float:
    if p.task == "multi":
        return multilabel_f1(_take(p.gold, idx), _take(p.pred, idx), p.label_set, "macro")
    return macro_f1(_single_gold(p, idx), _take(p.pred, idx), p.label_set)


def _m_subset(p: Predictions, idx: np.ndarray) -> float:
    return subset_accuracy(_take(p.gold, idx), _take(p.pred, idx), p.label_set)


def _m_example_f1(p: Predictions, idx: np.ndarray) -> float:
    return example_f1(_take(p.gold, idx), _take(p.pred, idx), p.label_set)


def _m_micro_f1(p: Predictions, idx: np.ndarray) -> float:
    return multilabel_f1(_take(p.gold, idx), _take(p.pred, idx), p.label_set, "micro")


def _single_subset(p: Predictions, idx: np.ndarray) -> np.ndarray:
    return np.array([i for i in idx if len(p.gold[i]) == 1], dtype=int)


def _m_single_acc(p: Predictions, idx: np.ndarray) -> float:
    sub = _single_subset(p, idx)
    if len(sub) == 0:
        return float("nan")
    return accuracy(_single_gold(p, sub), _take(p.top1 or [], sub))


def _m_single_macro_f1(p: Predictions, idx: np.ndarray) -> float:
    sub = _single_subset(p, idx)
    if len(sub) == 0:
        return float("nan")
    return macro_f1(_single_gold(p, sub), _take(p.top1 or [], sub), p.label_set)


def _m_exact(p: Predictions, idx: np.ndarray) -> float:
    return float(np.mean([exact_match(p.gold[i], p.pred[i] or "") for i in idx]))


def _m_char_f1(p: Predictions, idx: np.ndarray) -> float:
    return float(np.mean([char_f1(p.gold[i], p.pred[i] or "") for i in idx]))


def _m_judge(p: Predictions, idx: np.ndarray) -> float:
    if p.judge is None:
        return float("nan")
    return float(np.mean([p.judge[i] for i in idx]))


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("accuracy", _m_accuracy, "accuracy"),
        Metric("macro_f1", _m_macro_f1, "macro-F1"),
        Metric("subset_accuracy", _m_subset, "subset acc"),
        Metric("example_f1", _m_example_f1, "example-F1"),
        Metric("micro_f1", _m_micro_f1, "micro-F1"),
        Metric("single_accuracy", _m_single_acc, "single-label acc"),
        Metric("single_macro_f1", _m_single_macro_f1, "single-label macro-F1"),
        Metric("exact_match", _m_exact, "exact match"),
        Metric("char_f1", _m_char_f1, "char-F1"),
        Metric("judge_score", _m_judge, "judge score"),
    )
}

#: The metrics reported (with intervals and p-values) for each task.
HEADLINE: dict[str, tuple[str, ...]] = {
    "single": ("accuracy", "macro_f1"),
    "multi": (
        "subset_accuracy",
        "example_f1",
        "macro_f1",
        "micro_f1",
        "single_accuracy",
        "single_macro_f1",
    ),
    "vqa": ("exact_match", "char_f1", "judge_score"),
}

#: The columns of a report's table per task; the first is the task's one number in the
#: variant × dataset grid and the plot (experiment/report.py).
REPORTED: dict[str, tuple[str, ...]] = {
    "multi": ("macro_f1", "example_f1", "subset_accuracy"),
    "single": ("macro_f1", "accuracy"),
    "vqa": ("char_f1", "exact_match"),
}

#: The metric :func:`correctness` is the per-sample form of (McNemar's test tests it).
CORRECTNESS: dict[str, str] = {
    "single": "accuracy",
    "multi": "subset_accuracy",
    "vqa": "exact_match",
}


def correctness(p: Predictions) -> np.ndarray:
    """Per-sample 0/1 correctness (exact label / exact set / exact match), for McNemar."""
    if p.task == "single":
        return np.array([int(pr == g[0]) for pr, g in zip(p.pred, p.gold)])
    if p.task == "multi":
        return np.array([int(set(pr or []) == set(g)) for pr, g in zip(p.pred, p.gold)])
    return np.array([int(exact_match(g, pr or "")) for pr, g in zip(p.pred, p.gold)])


def compute(p: Predictions, names: Sequence[str] | None = None) -> dict[str, float]:
    """The headline metrics of ``p`` on all its samples."""
    idx = np.arange(len(p))
    return {n: METRICS[n].fn(p, idx) for n in (names or HEADLINE[p.task])}


def details(p: Predictions) -> dict:
    """Per-class scores and confusion matrix (what the leaderboard row has no room for)."""
    if p.task == "single":
        gold = [g[0] for g in p.gold]
        return {
            "per_class": per_class(gold, p.pred, p.label_set),
            "confusion": confusion(gold, p.pred, p.label_set),
        }
    if p.task == "multi":
        out: dict = {"per_label": per_label(p.gold, p.pred, p.label_set)}
        sub = single_view(p)
        if len(sub) and p.top1 is not None:
            gold = [p.gold[i][0] for i in sub]
            top1 = [p.top1[i] for i in sub]
            out["single_view"] = {
                "n": len(sub),
                "per_class": per_class(gold, top1, p.label_set),
                "confusion": confusion(gold, top1, p.label_set),
            }
        return out
    return {}
