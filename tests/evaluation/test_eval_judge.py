"""The MangaVQA judge against a fake OpenAI-compatible server on 127.0.0.1: what is sent (the
protocol's exact prompt) and how replies become scores (unscored replies counted, not fatal)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from emomerge.evaluation.judge import (
    MANGAVQA_SYSTEM,
    PROTOCOLS,
    get_protocol,
    judge_all,
    judge_report,
    prompt_text,
    provenance,
)
from emomerge.merging.errors import InputError
from emomerge.training.data.sample import Sample, user_message

#: Every socket wait in these tests is bounded by this many seconds.
TIMEOUT = 5.0


@dataclass
class FakeJudge:
    """Replies queued in order; the JSON bodies of the requests it received."""

    url: str
    replies: list[Any]
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


def _serve(replies: list[Any]) -> Iterator[FakeJudge]:
    """Serve exactly ``len(replies)`` requests on 127.0.0.1, then stop.

    A reply is the message content (str), a ``(status, body bytes)`` pair sent as is, or None for
    a 200 without choices.
    """
    judge = FakeJudge("", list(replies))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            judge.requests.append(json.loads(self.rfile.read(length)))
            judge.headers.append(dict(self.headers))
            reply = judge.replies[len(judge.requests) - 1]
            if isinstance(reply, tuple):
                status, body = reply
            elif reply is None:
                status, body = 200, json.dumps({"choices": []}).encode()
            else:
                status, body = (
                    200,
                    json.dumps(
                        {"choices": [{"message": {"role": "assistant", "content": reply}}]}
                    ).encode(),
                )
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    server.timeout = TIMEOUT  # handle_request gives up after this long without a client
    judge.url = f"http://127.0.0.1:{server.server_address[1]}/v1"

    def loop() -> None:
        for _ in range(len(replies)):  # bounded: one handle_request per queued reply
            server.handle_request()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield judge
    finally:
        thread.join(TIMEOUT * (len(replies) + 1))
        server.server_close()


@pytest.fixture
def fake_judge(request) -> Iterator[FakeJudge]:
    yield from _serve(request.param)


def _sample(question: str, answer: str, k: int) -> Sample:
    # as the MangaVQA reader builds it: the prompt appends the answer instruction, the
    # question as asked is kept in meta
    prompt = f"{question}\n簡潔に日本語で答えてください。"
    return Sample(
        id=f"s{k}",
        images=[],
        messages=user_message(1, prompt),
        target=answer,
        labels=[answer],
        label_set=[],
        group=f"s{k}",
        meta={"question": question},
    )


SAMPLES = [
    _sample("この人物の名前は？", "タロウ", 0),
    _sample("何色ですか？", "赤", 1),
    _sample("どこにいますか？", "学校", 2),
    _sample("誰が話していますか？", "先生", 3),
]
ANSWERS = ["タロウです", "青", "学校", ""]


@pytest.mark.parametrize("fake_judge", [["8", " 10\n", "Score: 7", "3"]], indirect=True)
def test_mangavqa_protocol_sends_the_published_prompt_and_averages(fake_judge):
    rep = judge_report(
        fake_judge.url,
        "gpt-4o-2024-11-20",
        SAMPLES,
        ANSWERS,
        protocol="mangavqa-1-10",
        timeout=TIMEOUT,
    )
    body = fake_judge.requests[0]
    assert body["model"] == "gpt-4o-2024-11-20"
    assert body["temperature"] == 0 and body["seed"] == 0 and body["max_tokens"] == 100
    system, user = body["messages"]
    assert system == {"role": "system", "content": MANGAVQA_SYSTEM}
    assert system["content"].startswith(
        "You are an evaluator. Your task is to rate how appropriate a model’s response"
    )
    assert system["content"].endswith(
        "Only return a single number (1–10). Do not include any "
        "explanations, justifications, or comments."
    )
    # the published user message, byte for byte, with the question as asked (no instruction)
    assert user == {
        "role": "user",
        "content": ' Input:\n        "question": この人物の名前は？,\n'
        '        "human-written answer": タロウ,\n'
        '        "model\'s response": タロウです,\n\n    Your score: \n',
    }
    assert [r["messages"][1]["content"].split("\n")[3] for r in fake_judge.requests] == [
        '        "model\'s response": タロウです,',
        '        "model\'s response": 青,',
        '        "model\'s response": 学校,',
        '        "model\'s response": ,',
    ]
    # "Score: 7" is no integer: the published rule counts it as 1, and it is reported
    assert [v.score for v in rep.verdicts] == [8.0, 10.0, None, 3.0]
    assert rep.values == [8.0, 10.0, 1.0, 3.0]
    assert rep.unscored == 1 and rep.mean == pytest.approx(22 / 4)
    assert rep.mean_scored == pytest.approx(21 / 3)
    info = rep.to_dict()
    assert info["unscored"] == 1 and info["unscored_replies"] == ["Score: 7"]
    assert info["judge_protocol"] == "mangavqa-1-10" and info["judge_matches_published"] is True


@pytest.mark.parametrize("fake_judge", [["1", "0", "yes", "1"]], indirect=True)
def test_binary_protocol_is_the_default_and_unchanged(fake_judge, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test")
    values = judge_all(
        fake_judge.url,
        "local-model",
        SAMPLES,
        ANSWERS,
        timeout=TIMEOUT,
        api_key_env="JUDGE_TEST_KEY",
    )
    assert fake_judge.headers[0]["Authorization"] == "Bearer sk-test"
    assert values == [1.0, 0.0, 0.0, 1.0]  # "yes" is neither 1 nor 0: counted as 0, as before
    body = fake_judge.requests[1]
    assert body["max_tokens"] == 2 and "seed" not in body and len(body["messages"]) == 1
    # the question as emomerge always sent it to this judge: the prompt, instruction included
    assert body["messages"][0]["content"] == (
        "You grade answers to questions about a Japanese manga page.\n"
        "Question: 何色ですか？\n簡潔に日本語で答えてください。\nReference answer(s): 赤\n"
        "Candidate answer: 青\n"
        "Is the candidate answer correct (same meaning as a reference)? Reply with 1 or 0 only."
    )


@pytest.mark.parametrize("fake_judge", [["11", "", None, "７", "8.5", "  2  "]], indirect=True)
def test_replies_without_a_score_are_counted_not_fatal(fake_judge):
    samples, answers = SAMPLES[:2] * 3, ANSWERS[:2] * 3
    rep = judge_report(
        fake_judge.url, "m", samples, answers, protocol="mangavqa-1-10", timeout=TIMEOUT
    )
    # out of scale, empty, no choices at all, a decimal: unscored; a full-width digit and
    # padding pass Python's int() as in the published script
    assert [v.score for v in rep.verdicts] == [None, None, None, 7.0, None, 2.0]
    assert rep.unscored == 4 and rep.values == [1.0, 1.0, 1.0, 7.0, 1.0, 2.0]
    assert rep.mean == pytest.approx(13 / 6) and rep.mean_scored == pytest.approx(4.5)


@pytest.mark.parametrize("fake_judge", [[(404, b'{"error": "model x not served"}')]], indirect=True)
def test_failed_request_is_one_line_input_error(fake_judge):
    with pytest.raises(InputError) as exc:
        judge_report(
            fake_judge.url, "x", SAMPLES[:1], ANSWERS[:1], protocol="mangavqa-1-10", timeout=TIMEOUT
        )
    text = str(exc.value)
    assert text.startswith(f"--judge-url {fake_judge.url}: ") and "HTTP 404" in text
    assert "model x not served" in text and "\n" not in text


def test_unknown_protocol_and_provenance():
    assert set(PROTOCOLS) == {"binary", "mangavqa-1-10"}
    with pytest.raises(
        InputError,
        match=r"^--judge-protocol: unknown protocol 'gpt' "
        r"\(expected one of \['binary', 'mangavqa-1-10'\]\)$",
    ):
        get_protocol("gpt")
    info = provenance("mangavqa-1-10", "Qwen/Qwen2.5-72B-Instruct")
    assert info["judge_prompt"] == prompt_text("mangavqa-1-10")
    assert info["judge_prompt"].startswith(MANGAVQA_SYSTEM + "\n\n Input:\n")
    assert (
        info["judge_prompt_sha256"]
        == hashlib.sha256(info["judge_prompt"].encode("utf-8")).hexdigest()
    )
    # another judge model: the row must not claim comparability with the paper
    assert info["judge_matches_published"] is False
    assert info["judge_published_model"] == "gpt-4o-2024-11-20"
    assert info["judge_scale"] == [1.0, 10.0] and info["judge_unscored_value"] == 1.0
    binary = provenance("binary", "m")
    assert binary["judge_published_model"] is None and binary["judge_matches_published"] is False
    assert binary["judge_prompt_sha256"] != info["judge_prompt_sha256"]
    json.dumps(info)  # goes into the details JSON as is
