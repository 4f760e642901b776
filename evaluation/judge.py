"""Optional LLM judge for MangaVQA answers, behind an OpenAI-compatible endpoint the user names.

Off by default and never called in tests: it sends the question, the gold answers and the model's
answer to ``{url}/chat/completions`` and reads a 0/1 verdict. The API key, if the endpoint needs
one, comes from the environment variable the user names (default ``OPENAI_API_KEY``); it is never
written to results.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from emomerge.merging.errors import InputError

PROMPT = (
    "You grade answers to questions about a Japanese manga page.\n"
    "Question: {question}\nReference answer(s): {gold}\nCandidate answer: {answer}\n"
    "Is the candidate answer correct (same meaning as a reference)? Reply with 1 or 0 only."
)


def judge_one(url: str, model: str, question: str, gold: list[str], answer: str, *,
              api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0) -> float:
    """1.0 when the judge says the answer is correct, 0.0 otherwise."""
    body = {"model": model, "temperature": 0, "max_tokens": 2, "messages": [
        {"role": "user", "content": PROMPT.format(question=question, gold=" / ".join(gold),
                                                  answer=answer)}]}
    headers = {"Content-Type": "application/json"}
    if os.environ.get(api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
    req = urllib.request.Request(url.rstrip("/") + "/chat/completions",
                                 data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            reply = json.loads(resp.read())["choices"][0]["message"]["content"]
    except (urllib.error.URLError, KeyError, IndexError, json.JSONDecodeError) as exc:
        raise InputError(f"--judge-url {url}: judge request failed ({exc})") from exc
    return 1.0 if reply.strip().startswith("1") else 0.0


def judge_all(url: str, model: str, samples: list, answers: list[str], **kw) -> list[float]:
    """Verdicts for every (sample, answer) pair, in order."""
    return [judge_one(url, model, s.messages[-1]["content"][-1].get("text", ""),
                      list(s.labels or [s.target]), a, **kw) for s, a in zip(samples, answers)]
