"""Optional LLM judge for MangaVQA answers, behind an OpenAI-compatible endpoint the user names.

Off by default and never called in tests against a real service: it sends the question, the gold
answer(s) and the model's answer to ``{url}/chat/completions`` (OpenAI, or a local
``vllm serve``) and reads a score. The API key, if the endpoint needs one, comes from the
environment variable the user names (default ``OPENAI_API_KEY``); it is never written to results.

Two protocols (:data:`PROTOCOLS`), because a judge score means nothing without its prompt:

- ``binary`` (the default, emomerge's own): "is the candidate correct?", a 0/1 verdict. Not a
  published protocol; its numbers compare only with other ``binary`` rows.
- ``mangavqa-1-10``: the published MangaVQA protocol (Baek et al. 2025, "MangaVQA and MangaLMM"),
  system and user prompts copied character for character from ``evaluation/inference_VQA.py``
  of https://github.com/manga109/MangaLMM (commit d477a1cf): a 1–10 score, judged by
  ``gpt-4o-2024-11-20`` at temperature 0, seed 0, ``max_tokens`` 100, and a reply that is not an
  integer counted as 1 (the script's own rule: "regard exception as lowest score"). Its mean is
  comparable with the paper's scores only when the judge model is the published one;
  :func:`provenance` records which model judged, the prompt and its sha256, so a leaderboard row
  says what its ``judge_score`` measures.

A reply without a score never stops an evaluation: it is counted (:class:`JudgeReport`
``unscored``, with the replies themselves) and scored by the protocol's fallback. A request that
fails (endpoint down, unknown model, timeout) is an :class:`InputError`: the numbers would be
missing, not merely low.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from emomerge.merging.errors import InputError

#: emomerge's original prompt (the ``binary`` protocol); kept byte-identical so earlier
#: ``binary`` rows stay comparable.
PROMPT = (
    "You grade answers to questions about a Japanese manga page.\n"
    "Question: {question}\nReference answer(s): {gold}\nCandidate answer: {answer}\n"
    "Is the candidate answer correct (same meaning as a reference)? Reply with 1 or 0 only."
)

#: The MangaVQA judge's system prompt, verbatim (note the one typographic apostrophe in the
#: first sentence, the em dashes and the en dash of "1–10": they are the published bytes).
MANGAVQA_SYSTEM = """You are an evaluator. Your task is to rate how appropriate a model’s response is to a question about a manga image. For each case, you will be given a question (based on a manga image), a human-written answer, and the model's response. The image is not shown, but the question and answer are based on it. Please evaluate as if the image were available.
Please rate how well the model's response answers the question, considering the intended image context and the human answer as a reference, using a scale from 1 to 10:
1 — Completely inappropriate or unrelated to the question or image context.
2 — Mostly unrelated with major misunderstandings or incorrect information.
3 — Slightly relevant, but largely incorrect or unhelpful.
4 — Somewhat relevant, but contains significant errors or omissions.
5 — Partially correct with noticeable inaccuracies, vagueness, or missing key points.
6 — Generally okay, but missing core points or includes some incorrect interpretations.
7 — Mostly correct and relevant, with only minor issues or small omissions.
8 — Almost entirely accurate with only slight room for improvement.
9 — Very appropriate, accurate, and well-aligned with the question and image context.
10 — Perfectly appropriate, accurate, and fully answers the question as if the image were visible.
Only return a single number (1–10). Do not include any explanations, justifications, or comments."""

#: The MangaVQA judge's user message: the published f-string with its leading space, indentation
#: and the space after "Your score:", as a ``str.format`` template.
MANGAVQA_USER = (
    " Input:\n"
    '        "question": {question},\n'
    '        "human-written answer": {gold},\n'
    '        "model\'s response": {answer},\n'
    "\n"
    "    Your score: \n"
)

MANGAVQA_SOURCE = (
    "https://github.com/manga109/MangaLMM/blob/"
    "d477a1cfa1c61a11655f4aa2142d6829d2fbee84/evaluation/inference_VQA.py"
)


def _binary_score(reply: str) -> float | None:
    """1/0 when the reply starts with 1/0; None (unscored) otherwise."""
    text = reply.strip()
    if text.startswith("1"):
        return 1.0
    if text.startswith("0"):
        return 0.0
    return None


def _int_1_10(reply: str) -> float | None:
    """The published rule, ``int(reply.strip())``, kept to the 1–10 scale.

    Anything else ("Score: 8", "8/10", an empty reply) is unscored, as the published script's
    ``int()`` raised on it; a number outside 1–10 is unscored too (the script would have averaged
    it in; no judge following the prompt returns one).
    """
    try:
        value = int(reply.strip())
    except ValueError:
        return None
    return float(value) if 1 <= value <= 10 else None


@dataclass(frozen=True)
class Protocol:
    """A judge protocol: the prompt, the request settings, and how a reply becomes a score."""

    name: str
    #: ``str.format`` template of the user message ({question}, {gold}, {answer}).
    user: str
    #: System message, or None for a user message only.
    system: str | None
    #: Lowest and highest score (the ``judge_score`` column is on this scale).
    scale: tuple[float, float]
    max_tokens: int
    #: Sent as the request's ``seed`` when not None (vLLM and OpenAI both accept it).
    seed: int | None
    #: What a reply without a score counts as in the mean.
    unscored_value: float
    #: Reply text → score, or None when the reply holds no score.
    score: Callable[[str], float | None]
    #: The judge model of the published numbers (None: not a published protocol).
    published_model: str | None
    #: Where the prompt comes from.
    source: str
    temperature: float = 0.0
    #: The question as the dataset asks it (``meta["question"]``), not the model's prompt (which
    #: appends emomerge's answer instruction). ``binary`` has always sent the prompt: kept so.
    raw_question: bool = True

    def messages(self, question: str, gold: list[str], answer: str) -> list[dict[str, str]]:
        """The chat messages of one judgement."""
        user = self.user.format(question=question, gold=" / ".join(gold), answer=answer)
        msgs = [{"role": "system", "content": self.system}] if self.system is not None else []
        return msgs + [{"role": "user", "content": user}]

    def body(self, model: str, question: str, gold: list[str], answer: str) -> dict[str, Any]:
        """The ``/chat/completions`` request body of one judgement."""
        body: dict[str, Any] = {
            "model": model,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "messages": self.messages(question, gold, answer),
        }
        if self.seed is not None:
            body["seed"] = self.seed
        return body


PROTOCOLS: dict[str, Protocol] = {
    "binary": Protocol(
        name="binary",
        user=PROMPT,
        system=None,
        scale=(0.0, 1.0),
        max_tokens=2,
        seed=None,
        unscored_value=0.0,
        score=_binary_score,
        published_model=None,
        source="emomerge (not a published protocol)",
        raw_question=False,
    ),
    "mangavqa-1-10": Protocol(
        name="mangavqa-1-10",
        user=MANGAVQA_USER,
        system=MANGAVQA_SYSTEM,
        scale=(1.0, 10.0),
        max_tokens=100,
        seed=0,
        unscored_value=1.0,
        score=_int_1_10,
        published_model="gpt-4o-2024-11-20",
        source=MANGAVQA_SOURCE,
    ),
}
DEFAULT_PROTOCOL = "binary"


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; an unknown name is an :class:`InputError`."""
    if name not in PROTOCOLS:
        raise InputError(
            f"--judge-protocol: unknown protocol '{name}' (expected one of {sorted(PROTOCOLS)})"
        )
    return PROTOCOLS[name]


def prompt_text(protocol: str | Protocol) -> str:
    """The protocol's full prompt as one text (system message, blank line, user template)."""
    p = get_protocol(protocol) if isinstance(protocol, str) else protocol
    return p.user if p.system is None else f"{p.system}\n\n{p.user}"


def provenance(protocol: str, model: str) -> dict[str, Any]:
    """What a leaderboard row / details JSON must carry for its ``judge_score`` to mean something:
    the protocol, the model that judged, the prompt and its sha256, the request settings, and
    whether the judge is the published one (only then do the numbers sit beside the paper's)."""
    p = get_protocol(protocol)
    text = prompt_text(p)
    return {
        "judge_protocol": p.name,
        "judge_model": model,
        "judge_published_model": p.published_model,
        "judge_matches_published": p.published_model is not None and model == p.published_model,
        "judge_prompt": text,
        "judge_prompt_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "judge_scale": list(p.scale),
        "judge_temperature": p.temperature,
        "judge_seed": p.seed,
        "judge_max_tokens": p.max_tokens,
        "judge_unscored_value": p.unscored_value,
        "judge_source": p.source,
    }


@dataclass
class Verdict:
    """One judgement: the reply as sent back, its score (None: no score in it) and the value the
    mean uses (the score, or the protocol's fallback)."""

    reply: str
    score: float | None
    value: float


@dataclass
class JudgeReport:
    """Every judgement of one variant, and how many replies carried no score."""

    protocol: str
    model: str
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def values(self) -> list[float]:
        """Per-sample values, in sample order (``Predictions.judge``)."""
        return [v.value for v in self.verdicts]

    @property
    def unscored(self) -> int:
        return sum(v.score is None for v in self.verdicts)

    @property
    def mean(self) -> float:
        """Mean over every sample, unscored ones at the fallback (the published number)."""
        vals = self.values
        return sum(vals) / len(vals) if vals else math.nan

    @property
    def mean_scored(self) -> float:
        """Mean over the replies that carried a score (how much the fallback moved the mean)."""
        vals = [v.score for v in self.verdicts if v.score is not None]
        return sum(vals) / len(vals) if vals else math.nan

    def to_dict(self, examples: int = 20) -> dict[str, Any]:
        """JSON-ready summary for the details file (the first ``examples`` unscored replies)."""
        bad = [v.reply for v in self.verdicts if v.score is None]
        return {
            **provenance(self.protocol, self.model),
            "n": len(self.verdicts),
            "mean": self.mean,
            "mean_scored": self.mean_scored,
            "unscored": len(bad),
            "unscored_replies": bad[:examples],
        }


def _reply_text(raw: bytes) -> str | None:
    """The first choice's message content, or None when the body has none (a malformed reply)."""
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def judge_verdict(
    url: str,
    model: str,
    question: str,
    gold: list[str],
    answer: str,
    *,
    protocol: str = DEFAULT_PROTOCOL,
    api_key_env: str = "OPENAI_API_KEY",
    timeout: float = 60.0,
) -> Verdict:
    """One judgement under ``protocol``; a reply without a score is a Verdict with score None."""
    p = get_protocol(protocol)
    headers = {"Content-Type": "application/json"}
    if os.environ.get(api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
    req = urllib.request.Request(
        url.rstrip("/") + "/chat/completions",
        data=json.dumps(p.body(model, question, gold, answer)).encode(),
        headers=headers,
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:200].decode("utf-8", "replace").replace("\n", " ")
        raise InputError(
            f"--judge-url {url}: judge request failed (HTTP {exc.code}: {detail})"
        ) from exc
    except (urllib.error.URLError, OSError) as exc:  # refused, unreachable, timed out
        raise InputError(f"--judge-url {url}: judge request failed ({exc})") from exc
    text = _reply_text(raw)
    if text is None:  # 200 with no message content: the judge said nothing we can score
        return Verdict(
            reply=raw[:200].decode("utf-8", "replace"), score=None, value=p.unscored_value
        )
    score = p.score(text)
    return Verdict(reply=text, score=score, value=p.unscored_value if score is None else score)


def judge_one(
    url: str, model: str, question: str, gold: list[str], answer: str, **kw: Any
) -> float:
    """The value one judgement adds to the mean (``binary``: 1.0 correct, 0.0 otherwise)."""
    return judge_verdict(url, model, question, gold, answer, **kw).value


def question_of(sample: Any, raw: bool = True) -> str:
    """The question the judge sees: as asked in the dataset (``meta["question"]``, which
    MangaVQA's reader keeps) when ``raw``, else, or without it, the prompt's text."""
    q = (getattr(sample, "meta", None) or {}).get("question") if raw else None
    return str(q) if q is not None else sample.messages[-1]["content"][-1].get("text", "")


def judge_report(
    url: str,
    model: str,
    samples: list,
    answers: list[str],
    *,
    protocol: str = DEFAULT_PROTOCOL,
    **kw: Any,
) -> JudgeReport:
    """Every (sample, answer) pair judged in order, with the unscored replies counted."""
    p = get_protocol(protocol)  # an unknown name fails before any request
    report = JudgeReport(protocol=protocol, model=model)
    for s, a in zip(samples, answers):
        report.verdicts.append(
            judge_verdict(
                url,
                model,
                question_of(s, p.raw_question),
                list(s.labels or [s.target]),
                a,
                protocol=protocol,
                **kw,
            )
        )
    return report


def judge_all(url: str, model: str, samples: list, answers: list[str], **kw: Any) -> list[float]:
    """Per-sample values for every (sample, answer) pair, in order (``Predictions.judge``)."""
    return judge_report(url, model, samples, answers, **kw).values
