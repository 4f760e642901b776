"""Parse generated answers into labels, and say plainly when an answer cannot be parsed.

Models answer in many shapes: ``Joy``, ``["Joy", "Fear"]``, ``['Joy']`` (Python repr), a JSON
object, a fenced code block, ``[Neutral]`` (unquoted, as in the EmoComics35 CSV itself), or a
sentence. Case and a small table of synonyms are forgiven ("Happy" → Joy, "Angry" → Anger), but
anything else outside the label set ("Shock") is *out of set*: it is kept as written, counted as
a parse failure and never mapped to a class. The caller reports the count (``parse_failures``)
and scores the kept items as a wrong label (``metrics._binarize``).

Free text is scanned for label words only when the answer is one sentence-like item (no list
structure, and no item that is itself a label): "The speaker is clearly angry." → Anger, flagged
``lenient``. A list with an unknown item ("Shock, Joy") is never rescued by scanning. In a
scanned sentence, emotion words outside the set ("I feel shock but also joy") are out of set, and
a negated label ("not angry") is ``ambiguous``: a failure, never the label it negates.

Before any of that, the answer is trimmed to what is meant as the label: a leading
``Emotion:``/``Emotions:``/``Label(s):``/``Answer:`` (anywhere in the text: "Sure! Emotion: Joy")
is dropped, an ``Explanation:``/``Reason:`` line and what follows it is cut, and a single-label
answer is read from its first line only ("Joy\nThe speaker smiles" is Joy, not a sentence to
scan). "and" separates items only between two emotion words ("angry and scared" → Anger, Fear);
elsewhere ("she is angry and the boy is scared") it is part of a sentence. Japanese emotion words
(喜び, 怒り, 悲しい, 怖い ...) belong to the same synonym groups as their English counterparts, so
they map under the same one-candidate rule.

A yes/no question (label set exactly yes, no) is answered by the answer's leading word: EMID's
matching targets are "yes - <emotion>" and "no", so "yes - awe" is yes, not an out-of-set "awe".
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
#: Japanese words (MangaVQA-trained adapters often answer in Japanese) sit in the group of their
#: English meaning, in dictionary form: "嬉しくない" (not happy) contains none of them.
SYNONYM_GROUPS: tuple[frozenset[str], ...] = tuple(
    frozenset(g)
    for g in (
        {
            "joy",
            "happy",
            "happiness",
            "joyful",
            "glad",
            "joyous",
            "喜び",
            "嬉しい",
            "うれしい",
            "楽しい",
            "幸せ",
            "喜んでいる",
        },
        {"anger", "angry", "furious", "rage", "enraged", "怒り", "怒っている", "怒った"},
        {"sadness", "sad", "sorrow", "sorrowful", "unhappy", "悲しみ", "悲しい"},
        {"fear", "afraid", "scared", "fearful", "frightened", "恐怖", "怖い", "こわい", "恐れ"},
        {"surprise", "surprised", "astonished", "astonishment", "驚き", "驚いた", "びっくり"},
        {"disgust", "disgusted", "disgusting", "嫌悪", "嫌悪感"},
        {"neutral", "neutrality", "中立", "ニュートラル"},
        {"excitement", "excited", "興奮"},
        {"contentment", "content", "contented", "満足"},
    )
)

#: Emotion words that are labels of none of our tasks' usual sets. Together with the synonym
#: groups they are the vocabulary a free-text answer is checked against: a word of it that maps
#: to no label of the task makes the answer out of set instead of silently ignored.
OTHER_EMOTION_WORDS: frozenset[str] = frozenset(
    {
        "shock",
        "shocked",
        "confused",
        "confusion",
        "love",
        "calm",
        "anxious",
        "anxiety",
        "embarrassed",
        "embarrassment",
        "nervous",
        "worried",
        "worry",
        "pride",
        "proud",
        "shame",
        "ashamed",
        "guilt",
        "guilty",
        "curious",
        "curiosity",
        "amused",
        "amusement",
        "bored",
        "boredom",
        "tired",
        "relief",
        "relieved",
        "hope",
        "hopeful",
        "awe",
        "annoyed",
        "annoyance",
        "frustrated",
        "frustration",
        "determined",
        "contempt",
        "jealous",
        "jealousy",
        "lonely",
        "loneliness",
        "nostalgia",
        "nostalgic",
        "tense",
        "tension",
        "serene",
        "serenity",
        "alarmed",
        "aroused",
        "despair",
        "panic",
        "terror",
        "terrified",
        "horror",
        "horrified",
        "grief",
        "melancholy",
        "irritated",
        "irritation",
        "admiration",
        "gratitude",
        "trust",
        "anticipation",
        "disappointed",
        "disappointment",
        "不安",
        "困惑",
        "恥ずかしい",
        "悔しい",
        "愛",
        "安心",
        "穏やか",
        "退屈",
    }
)
EMOTION_WORDS: frozenset[str] = frozenset().union(*SYNONYM_GROUPS, OTHER_EMOTION_WORDS)

#: A negation within the three words before a label word ("not angry", "never really sad").
_NEGATED = re.compile(
    r"(?:\b(?:not|no|never|without|hardly|neither|nor)|n't)\W+(?:\w+\W+){0,2}$", re.IGNORECASE
)

_FENCE = re.compile(r"```[\w+-]*\s*\n?(.*?)```", re.DOTALL)
#: Separators that always split a list (ASCII and Japanese punctuation).
_SPLIT = re.compile(r"\s*[,;/|\n、，；・]\s*")
#: "and" (or Japanese と/および) between two items: a separator only when every part it leaves is
#: an emotion word (:func:`_split_and`).
_AND = re.compile(r"(?:^|\s+)and\s+|\s*(?:および|と)\s*", re.IGNORECASE)
#: "Emotion:" / "Labels:" / "Answer:" before the answer, at a line start or inside a line.
_PREFIX = re.compile(r"(?<![\w\"'])(?:emotions?|labels?|answers?)\s*[:：]\s*", re.IGNORECASE)
#: The same prefix repeated at later line starts ("Emotion: Joy\nEmotion: Fear").
_LINE_PREFIX = re.compile(
    r"^[ \t]*(?:emotions?|labels?|answers?)[ \t]*[:：][ \t]*", re.IGNORECASE | re.MULTILINE
)
#: An explanation after the answer: everything from it on is not part of the label list.
_EXPLANATION = re.compile(
    r"(?<!\w)(?:explanation|reason(?:ing)?|rationale|理由|説明)\s*[:：]", re.IGNORECASE
)
_STRIP = " \t\r\n\"'`.!?*()。！？「」『』【】"


@dataclass
class Parsed:
    """Labels read from one answer (canonical spelling, first-seen order) and what went wrong."""

    labels: list[str] = field(default_factory=list)
    #: Items outside the label set, as written (after stripping quotes and punctuation).
    invalid: list[str] = field(default_factory=list)
    #: None when the answer parsed cleanly; else "unparsable", "out_of_set", "ambiguous" (a
    #: negated label word), "empty", "several_labels" (single-label task) or "missing" (page
    #: answer too short).
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


def _trim(body: str, multi: bool) -> str:
    """The part of a free-form answer that is meant as the label(s).

    Drops everything up to a label prefix ("Sure! Emotion: Joy" → "Joy"; further prefixes at
    line starts go too), cuts an explanation that follows the answer, and keeps a single-label
    answer's first line: the lines after it explain, they are not more labels (and scanning
    them would find the explanation's emotion words).
    """
    m = _PREFIX.search(body)
    if m:
        body = _LINE_PREFIX.sub("", body[m.end() :])
    m = _EXPLANATION.search(body)
    if m and body[: m.start()].strip(_STRIP):
        body = body[: m.start()]
    body = body.strip()
    if not multi:
        body = next((line for line in body.splitlines() if line.strip(_STRIP)), "")
    return body.strip()


def _split_and(piece: str, vocab: set[str]) -> list[str]:
    """``piece`` split at "and" when every part is an emotion word ("angry and scared", "and
    Fear" after an Oxford comma), else whole: "and" inside a sentence joins clauses, and
    splitting there would turn the sentence into unreadable fragments."""
    raw = _AND.split(piece)
    parts = [x.strip(_STRIP) for x in raw]
    parts = [x for x in parts if x]
    if len(raw) > 1 and parts and all(x.lower() in vocab for x in parts):
        return parts
    return [piece]


def _items(text: str, vocab: set[str]) -> tuple[list[str] | None, bool]:
    """(answer items, structured?) of one answer; items None when it has no usable shape.

    ``vocab`` (lower-case label and emotion words) decides where "and" separates items.
    """
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
    items = [part for piece in _SPLIT.split(inner) for part in _split_and(piece, vocab)]
    return [x for x in items if x.strip(_STRIP)], False


def _word_hits(text: str, words: object) -> list[tuple[int, str]]:
    """(position, word) of every whole-word, case-insensitive occurrence of ``words`` in text."""
    return sorted(
        (m.start(), w)
        for w in words
        for m in re.finditer(rf"(?<!\w){re.escape(w)}(?!\w)", text, re.IGNORECASE)
    )


def _negated(text: str, lookup: dict[str, str]) -> list[str]:
    """The label words of ``text`` that a negation governs, as "<negation …> word" phrases."""
    out = []
    for pos, word in _word_hits(text, lookup):
        m = _NEGATED.search(text[:pos])
        if m:
            out.append(text[m.start() : pos + len(word)].strip())
    return out


def _scan(body: str, lookup: dict[str, str]) -> Parsed:
    """Labels of one free-text sentence; out-of-set emotion words and negations are failures."""
    negated = _negated(body, lookup)
    labels = list(
        dict.fromkeys(
            lookup[w.lower()]
            for pos, w in _word_hits(body, lookup)
            if not _NEGATED.search(body[:pos])
        )
    )
    others = list(dict.fromkeys(w for _, w in _word_hits(body, EMOTION_WORDS - lookup.keys())))
    if negated:
        return Parsed(labels=labels, invalid=negated + others, failure="ambiguous", lenient=True)
    if others:
        return Parsed(labels=labels, invalid=others, failure="out_of_set", lenient=True)
    if labels:
        return Parsed(labels=labels, lenient=True)
    return Parsed(invalid=[body.strip(_STRIP)[:80]], failure="out_of_set")


#: The answer to a yes/no question starts with its label: EMID's matching targets are
#: "yes - <emotion>" and "no", and the reader labels a row by that leading word
#: (training/data/emid.py), so the emotion after "yes -" is not an out-of-set label.
_YES_NO = re.compile(r"[\s\"'`*\[(]*(yes|no)(?!\w)", re.IGNORECASE)


def parse_labels(text: str, label_set: list[str], *, multi: bool) -> Parsed:
    """Labels of one answer; ``multi=False`` asks for exactly one label."""
    lookup = label_lookup(label_set)
    body = strip_fences(text)
    if _structured(body) is None:
        body = _trim(body, multi)
    m = _YES_NO.match(body) if not multi and set(lookup) == {"yes", "no"} else None
    if m:  # a yes/no question: the leading word decides ("yes - awe", EMID's own target)
        return Parsed(labels=[lookup[m.group(1).lower()]])
    items, structured = _items(body, set(lookup) | EMOTION_WORDS)
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
    if invalid and not structured and len(items) == 1 and len(invalid[0].split()) > 1:
        # One sentence ("The character feels angry."), not a list: read the label words in it.
        parsed = _scan(body, lookup)
    elif invalid:
        # A list with items we cannot read ("Shock, Joy"): keep them, never scan them away.
        negated = any(_negated(w, lookup) for w in invalid)
        parsed = Parsed(
            labels=labels, invalid=invalid, failure="ambiguous" if negated else "out_of_set"
        )
    else:
        parsed = Parsed(labels=labels)
    if parsed.failure is None and not parsed.labels:
        return Parsed(failure="empty")
    if parsed.failure is None and not multi and len(parsed.labels) > 1:
        parsed.failure = "several_labels"
    return parsed


_GROUP = re.compile(r"\[([^\[\]]*)\]")


def _unquoted_nested(body: str) -> list[str] | None:
    """``[[Neutral], [Joy, Fear]]`` (unquoted, so neither JSON nor Python) as its inner groups."""
    inner = body.strip()
    if not (inner.startswith("[") and inner.endswith("]")):
        return None
    inner = inner[1:-1]
    groups = _GROUP.findall(inner)
    # only a plain sequence of bracketed groups: anything between them makes the shape unknown
    if not groups or _GROUP.sub("", inner).strip(" ,;\n\t"):
        return None
    return [f"[{g}]" for g in groups]


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
    if obj is None:
        obj = _unquoted_nested(body)
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
