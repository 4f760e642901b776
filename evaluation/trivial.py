"""Trivial baselines: what a leaderboard number is worth next to a model that looks at nothing.

A merge "beating" the base by a few macro-F1 points means little if predicting the majority
label does as well. Each baseline answers every sample the same way, from label frequencies:

- ``trivial-majority``: single-label, the most frequent label; multi-label, every label carried by
  at least half of the training examples (or, if none is, the single most frequent label).
- ``trivial-all-labels`` (multi-label only): every label of the label set for every example —
  the recall-1 corner, which macro-F1 over a skewed label set can reward.

The frequencies come from the train split. Without one, they come from the evaluated split's own
gold labels — an optimistic baseline (it peeks at the answers' distribution), and the returned
``source`` says so. The :class:`~.metrics.Predictions` are built sample for sample as
:mod:`.outputs` builds a model's (ids, page groups, gold, label set, ``top1``), so the paired
bootstrap against every model variant resamples the same pages for both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from emomerge.merging.errors import InputError

from .metrics import Predictions

MAJORITY = "trivial-majority"
ALL_LABELS = "trivial-all-labels"

#: ``TrivialBaselines.source`` values: where the label frequencies came from.
FROM_TRAIN = "train split"
FROM_EVALUATED = "evaluated split (no train labels)"


@dataclass(frozen=True)
class TrivialBaselines:
    """The trivial variants of one evaluation; iterates as ``(name, predictions)`` pairs.

    ``source`` says whose labels were counted (:data:`FROM_TRAIN` / :data:`FROM_EVALUATED`) and
    ``scoring`` holds, per variant, the free text for the leaderboard's ``scoring`` column.
    """

    variants: list[tuple[str, Predictions]] = field(default_factory=list)
    source: str = ""
    scoring: dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Iterator[tuple[str, Predictions]]:
        return iter(self.variants)

    def __len__(self) -> int:
        return len(self.variants)


def _units(samples: Sequence[Any]) -> tuple[list[str], list[str], list[list[str]]]:
    """(ids, groups, gold) of the scored units: one per sample, or one per utterance of a
    page-level sample with the ``#uNNN`` ids :func:`outputs.from_generation` gives them."""
    ids, groups, gold = [], [], []
    for s in samples:
        if "utterance_labels" in s.meta:
            for k, g in enumerate(s.meta["utterance_labels"]):
                ids.append(f"{s.id}#u{k:03d}"), groups.append(s.group), gold.append(list(g))
        else:
            ids.append(s.id), groups.append(s.group), gold.append(list(s.labels))
    return ids, groups, gold


def label_counts(labels: Sequence[Sequence[str]], label_set: Sequence[str]) -> Counter:
    """How many examples carry each label of ``label_set`` (a label counts once per example;
    labels outside the set are ignored)."""
    keep = set(label_set)
    return Counter(lab for row in labels for lab in set(row) if lab in keep)


def most_frequent(counts: Counter, label_set: Sequence[str]) -> str:
    """The most frequent label; ties go to the label first in the declared label set, so the
    choice does not depend on the order the examples were read in."""
    return max(label_set, key=lambda lab: (counts[lab], -list(label_set).index(lab)))


def majority_labels(labels: Sequence[Sequence[str]], label_set: Sequence[str]) -> list[str]:
    """Labels carried by at least half of the examples (label-set order), else the single most
    frequent one: the multi-label majority answer."""
    counts = label_counts(labels, label_set)
    half = [lab for lab in label_set if 2 * counts[lab] >= len(labels)]
    return half or [most_frequent(counts, label_set)]


def trivial_predictions(
    task: str, samples: list[Any], train_labels: list[list[str]] | None
) -> TrivialBaselines:
    """The trivial baselines of ``task`` on ``samples`` (none for ``vqa``).

    ``train_labels`` are the gold label lists of the training examples (one list per example);
    ``None`` or empty falls back to the evaluated samples' own gold labels, noted in ``source``.
    """
    if task == "vqa" or not samples:
        return TrivialBaselines()
    if task not in ("single", "multi"):
        raise InputError(f"--task-type: expected single, multi or vqa, got '{task}'")
    label_set = list(samples[0].label_set)
    if not label_set:
        raise InputError(f"sample {samples[0].id}: no label set, no trivial baseline")
    ids, groups, gold = _units(samples)
    source = FROM_TRAIN if train_labels else FROM_EVALUATED
    counted = train_labels if train_labels else gold
    if not any(lab in set(label_set) for row in counted for lab in row):
        raise InputError(f"trivial baselines: the {source} has no label of {label_set}")
    top = most_frequent(label_counts(counted, label_set), label_set)

    def make(pred: list[Any]) -> Predictions:
        return Predictions(
            task=task,
            ids=list(ids),
            groups=list(groups),
            gold=[list(g) for g in gold],
            pred=pred,
            label_set=list(label_set),
            top1=[top] * len(ids) if task == "multi" else None,
        )

    if task == "single":
        return TrivialBaselines(
            [(MAJORITY, make([top] * len(ids)))],
            source,
            {MAJORITY: f"trivial: always '{top}', the most frequent label of the {source}"},
        )
    major = majority_labels(counted, label_set)
    return TrivialBaselines(
        [
            (MAJORITY, make([list(major) for _ in ids])),
            (ALL_LABELS, make([list(label_set) for _ in ids])),
        ],
        source,
        {
            MAJORITY: f"trivial: always {{{', '.join(major)}}}, the labels of at least half the "
            f"examples (else the most frequent) of the {source}",
            ALL_LABELS: "trivial: every label of the label set for every example",
        },
    )
