"""Parse generated answers into labels, and say plainly when an answer cannot be parsed.

Models answer in many shapes: ``Joy``, ``["Joy", "Fear"]``, ``['Joy']`` (Python repr), a JSON
object, a fenced code block, ``[Neutral]`` (unquoted, as in the EmoComics35 CSV itself), or a
sentence. Case and a small table of synonyms are forgiven ("Happy" → Joy, "Angry" → Anger), but
anything else outside the label set ("Shock") is *out of set*: it is kept as written, counted as
a parse failure and never mapped to a class. The caller reports the count (``parse_failures``).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any

#: Groups of interchangeable emotion words. Within a task, a group maps to a label only when
#: exactly one word of the group *is* a label of the task's set: "happy" means Joy for EmoComics35,
#: but nothing for EmoArt, whose set has both Happy and Glad (a synonym must never choose between
#: two real classes). "shock" is deliberately in no group: it is out of set.
SYNONYM_GROUPS: tuple[frozenset[str], ...] = tuple(frozenset(g) for g in (
    {"joy", "happy", "happiness", "joyful", "glad", "joyous"},
    {"anger", "angry", "furious", "rage", "enraged"},
    {"sadness", "sad", "sorrow", "sorrowful", "unhappy"},
    {"fear", "afraid", "scared", "fearful", "frightened"},
    {"surprise", "surprised", "astonished", "astonishment"},
    {"disgust", "disgusted", "disgusting"},
    {"neutral", "neutrality"},
    {"excitement", "excited"},
    {"contentment", "content", "contented"},
))

_FENCE = re.compile(r"```[\w+-]*\s*\n?(.*?)```", re.DOTALL)
_SPLIT = re.compile(r"\s*(?:[,;/|\n]|\band\b)\s*", re.IGNORECASE)
_STRIP = " \t\r\n\"'`.!?*()"


@dataclass
class Parsed:
    """Labels read from one answer (canonical spelling, first-seen order) and what went wrong."""

    labels: list[str] = field(default_factory=list)
    #: Items outside the label set, as written (after stripping quotes and punctuation).
    invalid: list[str] = field(default_factory=list)
    #: None when the answer parsed cleanly; else "unparsable", "out_of_set", "empty",
    #: "several_labels" (single-label task) or "missing" (page answer too short).
    failure: str | None = None
    #: True when labels were found by scanning free text for label words (no list structure).
    lenient: bool = False

    @property
    def ok(self) -> bool:
        return self.failure is None


def label_lookup(label_set: list[str]) -> dict[str, str]:
    """Lower-case word → canonical label: the labels themselves, then their unambiguous synonyms."""
    lookup = {lab.lower(): lab for lab in label_set}
    for group in SYNONYM_GROUPS:
        members = [lab for lab in label_set if lab.lower() in group]
        if len(members) == 1:
            for word in group:
                lookup.setdefault(word, members[0])
    return lookup


def strip_fences(text: str) -> str:
    """The content of the first fenced code block, or the text itself."""
    m = _FENCE.search(text or "")
    return m.group(1).strip() if m else (text or "").strip()


def _structured(text: str) -> Any | None:
    """JSON or a Python literal, else None."""
    for loader in (json.loads, ast.literal_eval):
        try:
            return loader(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return None


def _from_dict(obj: dict) -> Any:
    for key, value in obj.items():
        if str(key).lower() in ("emotion", "emotions", "label", "labels", "answer", "answers"):
            return value
    return None


def _items(text: str) -> tuple[list[str] | None, bool]:
    """(answer items, structured?) of one answer; items None when it has no usable shape."""
    obj = _structured(text)
    if isinstance(obj, dict):
        obj = _from_dict(obj)
        if obj is None:
            return None, True
    if isinstance(obj, str):
        return [obj], True
    if isinstance(obj, (list, tuple)):
        if all(isinstance(x, str) for x in obj):
            return list(obj), True
        return None, True
    if obj is not None:
        return None, True
    inner = text.strip()
    if inner.startswith("[") and inner.endswith("]"):
        # An unquoted list such as [Neutral] or [Joy, Fear].
        inner = inner[1:-1]
    return [x for x in _SPLIT.split(inner) if x.strip(_STRIP)], False


def parse_labels(text: str, label_set: list[str], *, multi: bool) -> Parsed:
    """Labels of one answer; ``multi=False`` asks for exactly one label."""
    lookup = label_lookup(label_set)
    body = strip_fences(text)
    items, structured = _items(body)
    if items is None:
        return Parsed(failure="unparsable", invalid=[body[:80]])
    labels: list[str] = []
    invalid: list[str] = []
    for item in items:
        word = item.strip(_STRIP)
        lab = lookup.get(word.lower())
        if lab is None:
            invalid.append(word)
        elif lab not in labels:
            labels.append(lab)
    lenient = False
    if invalid and not structured:
        # Free text ("The character feels angry."): accept label words found in it, but only
        # when the whole answer contains no list structure that we failed to read.
        hits = sorted((m.start(), lab) for word, lab in lookup.items()
                      for m in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", body, re.IGNORECASE))
        if hits:
            labels = list(dict.fromkeys(lab for _, lab in hits))
            invalid, lenient = [], True
    if invalid:
        return Parsed(labels=labels, invalid=invalid, failure="out_of_set", lenient=lenient)
    if not labels:
        return Parsed(failure="empty")
    if not multi and len(labels) > 1:
        return Parsed(labels=labels, failure="several_labels", lenient=lenient)
    return Parsed(labels=labels, lenient=lenient)


def parse_page(text: str, n_utterances: int, label_set: list[str]) -> tuple[list[Parsed], int]:
    """Per-utterance labels of a page-level answer, and how many extra items it had.

    The answer should be a list with one entry per utterance, each a label or a list of labels
    (possibly itself a string such as ``"['Anger']"``, as in the EmoComics35 CSV). A short answer
    leaves the last utterances ``missing`` (failures); extra entries are counted, not used.
    """
    body = strip_fences(text)
    obj = _structured(body)
    if isinstance(obj, dict):
        obj = _from_dict(obj)
    if not isinstance(obj, (list, tuple)):
        return [Parsed(failure="unparsable", invalid=[body[:80]])] * n_utterances, 0
    out = []
    for entry in list(obj)[:n_utterances]:
        if isinstance(entry, dict):
            # {"utterance": 1, "emotions": [...]}, the shape of the page task's target
            entry = _from_dict(entry)
        if isinstance(entry, (list, tuple)):
            entry = json.dumps([str(x) for x in entry])
        out.append(parse_labels(str(entry), label_set, multi=True))
    out += [Parsed(failure="missing") for _ in range(n_utterances - len(out))]
    return out, max(0, len(obj) - n_utterances)
