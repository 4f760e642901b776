"""Cached raw outputs → per-sample predictions, with parse failures counted.

Likelihood records (one score per label, or per candidate label set with its ``sets``) become
labels by the decision rules of :mod:`.decide`; generated texts go
through :mod:`.parsing`. Page-level EmoComics35 samples (``meta["utterance_labels"]``) expand to
one prediction per utterance, grouped by page, so page answers and utterance answers are scored
the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from emomerge.merging.errors import InputError

from . import decide
from .cache import PredictionCache
from .metrics import INVALID, Predictions
from .parsing import Parsed, parse_labels, parse_page


@dataclass
class ParseReport:
    """What the parser could not read: counts by reason and the out-of-set strings seen."""

    failures: int = 0
    lenient: int = 0
    extra_items: int = 0
    by_reason: Counter = field(default_factory=Counter)
    out_of_set: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "failures": self.failures,
            "lenient": self.lenient,
            "extra_items": self.extra_items,
            "by_reason": dict(self.by_reason),
            "out_of_set": dict(self.out_of_set.most_common(50)),
        }


def label_values(record: dict[str, Any], length_norm: bool) -> list[float]:
    """Per-candidate scores of a likelihood record (per-token mean when ``length_norm``)."""
    return [lp / n if length_norm else lp for lp, n in record["scores"]]


def presence(record: dict[str, Any], n_labels: int, length_norm: bool = False) -> np.ndarray:
    """Per-label presence probabilities of a label-set record (its ``sets`` are the candidates'
    label indices; :func:`decide.set_marginals`)."""
    if "sets" not in record:
        raise RuntimeError(f"record {record.get('id')}: not a label-set record")  # a runner bug
    return decide.set_marginals(label_values(record, length_norm), record["sets"], n_labels)


def _record(cache: PredictionCache, split_hash: str, sample: Any) -> dict[str, Any]:
    rec = cache.get(split_hash, sample.id)
    if rec is None:
        raise RuntimeError(f"no cached prediction for sample {sample.id}")  # a runner bug
    return rec


def from_likelihood(
    task: str,
    samples: list[Any],
    cache: PredictionCache,
    split_hash: str,
    *,
    length_norm: bool,
    multilabel: str = "threshold",
    threshold: float | None = None,
    thresholds: Sequence[float] | None = None,
) -> Predictions:
    """Predictions by argmax (single) or threshold / gold-count top-k (multi).

    Records of label-set scoring (they hold ``sets``) are decided on presence probabilities:
    per-label ``thresholds`` (label-set order), else ``threshold`` for every label; ``top1`` is
    the most probable label. Records of one score per label use the softmax over labels
    (first-label scoring) and the single ``threshold``.
    """
    if task == "vqa":
        raise InputError("--mode likelihood: MangaVQA answers are free text, use --mode generate")
    gold, pred, top1 = [], [], []
    for s in samples:
        if "utterance_labels" in s.meta:
            raise InputError(
                f"sample {s.id}: page-level samples need --mode generate "
                "(use the utterance task for label likelihood)"
            )
        rec = _record(cache, split_hash, s)
        if "sets" in rec:
            values = list(presence(rec, len(s.label_set), length_norm))
        else:
            values = label_values(rec, length_norm)
        best = decide.argmax_label(values, s.label_set)
        gold.append(list(s.labels))
        top1.append(best)
        if task == "single":
            pred.append(best)
        elif multilabel == "topk":
            pred.append(decide.topk_labels(values, s.label_set, len(s.labels)))
        elif "sets" in rec:
            per = (
                thresholds
                if thresholds is not None
                else (None if threshold is None else [threshold] * len(s.label_set))
            )
            if per is None:
                raise ValueError("multi-label threshold decision without a threshold")
            pred.append(decide.presence_labels(values, s.label_set, per))
        else:
            if threshold is None:
                raise ValueError("multi-label threshold decision without a threshold")
            pred.append(decide.threshold_labels(values, s.label_set, threshold))
    return Predictions(
        task=task,
        ids=[s.id for s in samples],
        groups=[s.group for s in samples],
        gold=gold,
        pred=pred,
        label_set=list(samples[0].label_set),
        top1=top1 if task == "multi" else None,
    )


def _scored(p: Parsed) -> list[str]:
    # What a multi-label answer is scored as: its labels *and* what could not be read. The
    # metrics count any non-label item as a wrong predicted label (metrics._binarize), so
    # "Joy, Shock" for gold {Joy} is not an exact match, as McNemar's correctness already says.
    return p.labels + p.invalid


def from_generation(
    task: str, samples: list[Any], cache: PredictionCache, split_hash: str
) -> tuple[Predictions, ParseReport]:
    """Predictions from generated answers; every unreadable answer counted in the report."""
    rep = ParseReport()
    ids, groups, gold, pred, top1 = [], [], [], [], []

    def note(p: Any) -> None:
        if not p.ok:
            rep.failures += 1
            rep.by_reason[p.failure] += 1
            rep.out_of_set.update(p.invalid)
        rep.lenient += int(p.lenient)

    for s in samples:
        text = _record(cache, split_hash, s)["text"]
        if task == "vqa":
            ids.append(s.id), groups.append(s.group), gold.append(list(s.labels or [s.target]))
            pred.append(text.strip())
            continue
        if "utterance_labels" in s.meta:
            per, extra = parse_page(text, len(s.meta["utterance_labels"]), s.label_set)
            rep.extra_items += extra
            for k, (p, g) in enumerate(zip(per, s.meta["utterance_labels"])):
                note(p)
                ids.append(f"{s.id}#u{k:03d}"), groups.append(s.group), gold.append(list(g))
                pred.append(_scored(p)), top1.append(p.labels[0] if p.labels else INVALID)
            continue
        p = parse_labels(text, s.label_set, multi=task == "multi")
        note(p)
        ids.append(s.id), groups.append(s.group), gold.append(list(s.labels))
        if task == "single":
            pred.append(p.labels[0] if p.ok else None)
        else:
            pred.append(_scored(p)), top1.append(p.labels[0] if p.labels else INVALID)
    label_set = list(samples[0].label_set) if samples else []
    return Predictions(
        task=task,
        ids=ids,
        groups=groups,
        gold=gold,
        pred=pred,
        label_set=label_set,
        top1=top1 if task == "multi" else None,
    ), rep
