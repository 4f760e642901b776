"""Batched label scoring, page-shared prefixes and batched generation equal the one-prompt path.

The reference is the existing one-prompt path (:func:`scoring.score_labels`, itself checked
against one full forward pass per candidate, :func:`scoring.score_labels_full`, here too for one
case). Prompts differ in length and image size, so every batch is padded; both per-label and
label-set (63 candidates) scoring are checked on tiny Qwen2.5-VL (M-RoPE positions) and tiny
LLaVA (1-D RoPE).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from emomerge.evaluation import predict
from emomerge.evaluation.cache import PredictionCache
from emomerge.evaluation.predict import (
    answer_suffix,
    candidate_answers,
    run_generation,
    run_likelihood,
)
from emomerge.evaluation.scoring import (
    answer_context,
    answer_prefix,
    common_prefix,
    continuation_ids,
    cut_rows,
    encode_prompts,
    load_images,
    render_prompt,
    score_labels,
    score_labels_batch,
    score_labels_full,
    score_shared_prefix,
)
from emomerge.evaluation.variants import Variant
from emomerge.training.data.sample import Sample, user_message

LABELS = ["Anger", "Disgust", "Fear", "Joy", "Neutral", "Sadness", "Surprise"]
TEXTS = [
    "Which emotions?",
    (
        "This comic page contains the following utterance, spoken by ALICE (panel 2, balloon "
        '1):\n"I can\'t believe you did that, after everything we went through!"\nWhich '
        "emotions does the speaker express?"
    ),
    'Emotions of: "Oh."',
]
SIZES = [(64, 48), (120, 90), (40, 100)]  # different image token counts too
BASE = Variant("base", "base")


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from emomerge.training.models.tiny import build_tiny_vlm

    return predict.ModelHost.load(build_tiny_vlm("llava", tmp_path_factory.mktemp("llava") / "m"))


@pytest.fixture(params=["qwen2_5_vl", "llava"])
def any_host(request, host, llava):
    return host if request.param == "qwen2_5_vl" else llava


def _candidates(h, messages, max_labels, with_eot=True):
    """Candidate token ids after the prompt, as run_likelihood builds them."""
    prompt = render_prompt(h.processor, messages, h.family)
    answers, _ = candidate_answers(LABELS, max_labels)
    eot = answer_suffix(h.family, h.tokenizer) if with_eot else None
    return prompt, continuation_ids(
        h.tokenizer, prompt, [answer_prefix(h.processor, messages) + a for a in answers], eot
    )


def _one_by_one(h, model, prompts, images, conts):
    pad = h.tokenizer.pad_token_id
    return [
        score_labels(model, encode_prompts(h.processor, h.family, [p], [im]), c, pad)
        for p, im, c in zip(prompts, images, conts)
    ]


def _assert_close(got, want):
    assert [len(g) for g in got] == [len(w) for w in want]
    for g_row, w_row in zip(got, want):
        for g, w in zip(g_row, w_row):
            assert g.n_tokens == w.n_tokens
            assert g.logprob == pytest.approx(w.logprob, abs=1e-4)


def _left(h):
    """The tokenizer set to left padding for the duration (run_likelihood does the same)."""

    class _Ctx:
        def __enter__(self):
            self.old, h.tokenizer.padding_side = h.tokenizer.padding_side, "left"

        def __exit__(self, *exc):
            h.tokenizer.padding_side = self.old

    return _Ctx()


@pytest.mark.parametrize(("max_labels", "packed"), [(None, True), (3, True), (3, False)])
def test_batched_prompts_equal_one_prompt_path(any_host, max_labels, packed):
    """``packed``: candidates packed behind their prompt under a tree mask (sdpa, eager), else
    one row per candidate (what flash-attention gets)."""
    h = any_host
    msgs = [user_message(1, t) for t in TEXTS]
    images = [[Image.new("RGB", s, (40 * i, 180, 60))] for i, s in enumerate(SIZES)]
    prompts, conts = zip(*(_candidates(h, m, max_labels) for m in msgs))
    with h.activate(BASE) as model, _left(h):
        inputs = encode_prompts(h.processor, h.family, list(prompts), images)
        assert not bool(inputs["attention_mask"].all())  # the batch is padded
        got = score_labels_batch(
            model, inputs, list(conts), h.tokenizer.pad_token_id, chunk=40, packed=packed
        )
    with h.activate(BASE) as model:
        want = _one_by_one(h, model, prompts, images, conts)
    assert len(conts[0]) == (63 if max_labels else 7)
    assert len({len(c) for c in conts[0]}) > 1  # ragged continuations
    _assert_close(got, want)


def test_batched_prompts_equal_full_forward(host):
    """Against the plain oracle too: one full forward pass per candidate, no cache."""
    msgs = [user_message(1, t) for t in TEXTS[:2]]
    images = [[Image.new("RGB", s, (200, 40 * i, 60))] for i, s in enumerate(SIZES[:2])]
    prompts, conts = zip(*(_candidates(host, m, 2) for m in msgs))
    conts = [c[::4] for c in conts]  # 7 of the 28 sets each
    with host.activate(BASE) as model:
        want = [
            score_labels_full(model, encode_prompts(host.processor, host.family, [p], [im]), c)
            for p, im, c in zip(prompts, images, conts)
        ]
        with _left(host):
            got = score_labels_batch(
                model,
                encode_prompts(host.processor, host.family, list(prompts), images),
                conts,
                host.tokenizer.pad_token_id,
                chunk=5,
            )
    _assert_close(got, want)


def test_packed_candidates_under_eager_attention(llava):
    """Eager attention adds the mask to the scores: the tree mask goes in as 0 / -inf floats."""
    msgs = [user_message(1, t) for t in TEXTS]
    images = [[Image.new("RGB", s, (90, 40 * i, 60))] for i, s in enumerate(SIZES)]
    prompts, conts = zip(*(_candidates(llava, m, 2) for m in msgs))
    want = _one_by_one(llava, llava.model, prompts, images, conts)
    llava.model.set_attn_implementation("eager")
    try:
        with _left(llava):
            got = score_labels_batch(
                llava.model,
                encode_prompts(llava.processor, llava.family, list(prompts), images),
                list(conts),
                llava.tokenizer.pad_token_id,
            )
    finally:
        llava.model.set_attn_implementation("sdpa")
    _assert_close(got, want)


def test_right_padded_prompts_are_refused(host):
    msgs = [user_message(1, t) for t in TEXTS[:2]]
    images = [[Image.new("RGB", (64, 64))]] * 2
    prompts = [render_prompt(host.processor, m, host.family) for m in msgs]
    old, host.tokenizer.padding_side = host.tokenizer.padding_side, "right"
    try:
        inputs = encode_prompts(host.processor, host.family, prompts, images)
    finally:
        host.tokenizer.padding_side = old
    with host.activate(BASE) as model, pytest.raises(ValueError, match="left-padded"):
        score_labels_batch(model, inputs, [[[1, 2]], [[1, 2]]], 0)


@pytest.mark.parametrize("packed", [True, False])
def test_shared_prefix_equals_whole_prompts(any_host, packed):
    """Two "pages" of three utterances each: the image and the text before the utterance are
    one prefix per page, encoded once (the EmoComics35 prompt puts the utterance after both)."""
    h = any_host
    pages = [Image.new("RGB", (96, 72), (200, 30, 30)), Image.new("RGB", (50, 110), (0, 90, 200))]
    utts = ['"No!"', '"What a lovely day it is today, my friend."', '"Hm."']
    msgs = [
        user_message(1, f"This comic page contains the following utterance: {u}\nWhich?")
        for _ in pages
        for u in utts
    ]
    images = [[pg] for pg in pages for _ in utts]
    prompts, conts = zip(*(_candidates(h, m, 3) for m in msgs))
    pad = h.tokenizer.pad_token_id
    with h.activate(BASE) as model, _left(h):
        full = encode_prompts(h.processor, h.family, list(prompts), images)
        ids = [r[m.bool()].tolist() for r, m in zip(full["input_ids"], full["attention_mask"])]
        cut = [common_prefix(ids[:3]), common_prefix(ids[3:])]
        image_id = h.processor.image_token_id
        assert all(
            max(i for i, t in enumerate(ids[u]) if t == image_id) < cut[u // 3] for u in range(6)
        )  # images inside the prefix
        prefix = cut_rows(
            encode_prompts(h.processor, h.family, [prompts[0], prompts[3]], [images[0], images[3]]),
            cut,
            pad,
        )
        got = score_shared_prefix(
            model,
            prefix,
            [0, 0, 0, 1, 1, 1],
            [ids[u][cut[u // 3] :] for u in range(6)],
            list(conts),
            pad,
            chunk=50,
            packed=packed,
        )
    with h.activate(BASE) as model:
        want = _one_by_one(h, model, prompts, images, conts)
    _assert_close(got, want)


def _run(h, samples, tmp_path, name, **kw):
    cache = PredictionCache(tmp_path / name, "v", "h" * 16)
    assert run_likelihood(h, BASE, samples, cache, "split", progress=False, **kw) == len(samples)
    return [[tuple(x) for x in cache.get("split", s.id)["scores"]] for s in samples]


def _reference(h, samples, max_labels):
    """run_likelihood's records the old way: one prompt per forward pass (score_labels)."""
    out = []
    with h.activate(BASE) as model:
        for s in samples:
            # run_likelihood closes label sets with the end-of-turn text, single labels not
            prompt, conts = _candidates(h, s.messages, max_labels, max_labels is not None)
            out.append(
                score_labels(
                    model,
                    encode_prompts(h.processor, h.family, [prompt], [load_images(s.images)]),
                    conts,
                    h.tokenizer.pad_token_id,
                )
            )
    return [[(x.logprob, x.n_tokens) for x in row] for row in out]


def _close_records(got, want):
    for g_row, w_row in zip(got, want, strict=True):
        for (gl, gn), (wl, wn) in zip(g_row, w_row, strict=True):
            assert gn == wn and gl == pytest.approx(wl, abs=1e-4)


def _count_image_rows(monkeypatch, model):
    """Count the images each forward pass encodes (one row per image in a prompt batch)."""
    seen = []
    forward = model.forward

    def spy(*args, **kw):
        if kw.get("pixel_values") is not None:
            seen.append(int(kw["input_ids"].shape[0]))
        return forward(*args, **kw)

    monkeypatch.setattr(model, "forward", spy)
    return seen


@pytest.mark.parametrize("max_labels", [None, 3])
def test_run_likelihood_page_cache_equals_per_utterance(
    any_host, emocomics_dir, tmp_path, monkeypatch, max_labels
):
    """EmoComics35 utterance prompts: each page's image is encoded once per batch."""
    from emomerge.training.data import read_dataset

    h = any_host
    samples = read_dataset("emocomics35", emocomics_dir, "train")
    pages = [s.group for s in samples]
    assert len(set(pages)) < len(samples)  # pages with several utterances
    want = _reference(h, samples, max_labels)
    seen = _count_image_rows(monkeypatch, h.model)
    got = _run(h, samples, tmp_path, "paged", max_labels=max_labels, batch_size=8)
    _close_records(got, want)
    # a page is never split across batches of 8 here (pages hold at most 4 utterances)
    assert sum(seen) == len(set(pages))
    seen.clear()
    _close_records(
        _run(h, samples, tmp_path, "plain", max_labels=max_labels, batch_size=8, page_cache=False),
        want,
    )
    assert sum(seen) == len(samples)


def test_prefix_without_the_image_falls_back_to_whole_prompts(host, tmp_path):
    """Text before the image that differs between utterances: no common prefix holds the image,
    so each prompt is encoded whole (still batched) and the scores stay the same."""
    page = Image.new("RGB", (80, 60), (10, 200, 10))
    samples = [
        Sample(
            id=f"u{i}",
            images=[page],
            target="Joy",
            labels=["Joy"],
            label_set=LABELS,
            group="p",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": f"Utterance {t}. Page:"},
                        {"type": "image"},
                        {"type": "text", "text": "Which?"},
                    ],
                }
            ],
        )
        for i, t in enumerate(['"a"', '"quite a lot longer"', '"b"'])
    ]
    _close_records(
        _run(host, samples, tmp_path, "x", max_labels=2, batch_size=4), _reference(host, samples, 2)
    )


def test_answer_context_tokenizes_candidates_like_the_whole_prompt(any_host):
    h = any_host
    answers, _ = candidate_answers(LABELS, 3)
    eot = answer_suffix(h.family, h.tokenizer)
    for text in TEXTS:
        msgs = user_message(1, text)
        prompt = render_prompt(h.processor, msgs, h.family)
        cands = [answer_prefix(h.processor, msgs) + a for a in answers]
        context = answer_context(h.tokenizer, prompt)
        assert len(context) < len(prompt)
        assert continuation_ids(h.tokenizer, context, cands, eot) == continuation_ids(
            h.tokenizer, prompt, cands, eot
        )


def test_next_batch_keeps_pages_whole():
    pages = [1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 4]
    s = [
        Sample(
            id=str(i),
            images=[f"p{p}.jpg"],
            messages=[],
            target="",
            labels=[],
            label_set=[],
            group=f"p{p}",
        )
        for i, p in enumerate(pages)
    ]
    sizes, start = [], 0
    while start < len(s):
        b = predict._next_batch(s, start, 4, True)
        sizes.append(len(b))
        start += len(b)
    assert sizes == [3, 2, 4, 3]  # page 2 not split at 4; page 3 (6 > 4) split, rest + page 4
    assert len(predict._next_batch(s, 0, 4, False)) == 4


@pytest.mark.parametrize("limit", ["rows", "tokens"])
def test_cuda_oom_halves_the_batch_and_retries(host, emocomics_dir, tmp_path, monkeypatch, limit):
    """A forward pass of more than two rows (``rows``), or a candidate pass longer than 30 new
    tokens a row (``tokens``), runs out of memory: the run halves the batch size, then the
    candidates a row, until it fits, warns, and gives the scores of a run that never ran out."""
    from emomerge.training.data import read_dataset

    samples = read_dataset("emocomics35", emocomics_dir, "train")[:6]
    want = _run(host, samples, tmp_path, "ok", max_labels=3, batch_size=8)
    forward, shapes = host.model.forward, []

    def tight(*args, **kw):
        rows, width = kw["input_ids"].shape
        shapes.append((rows, width))
        cached = kw.get("cache") or kw.get("past_key_values")  # a candidate pass
        if rows > 2 if limit == "rows" else (cached and width > 30):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(*args, **kw)

    monkeypatch.setattr(host.model, "forward", tight)
    last = "batch size 2, chunk 8" if limit == "rows" else "batch size 1, chunk 4"
    with pytest.warns(UserWarning, match=f"out of memory; retrying with {last}"):
        got = _run(host, samples, tmp_path, "oom", max_labels=3, batch_size=8, chunk=8)
    _close_records(got, want)
    assert len(shapes) > 6  # it did run out and retry


def test_cuda_oom_at_size_one_is_raised(host, tmp_path, monkeypatch):
    def never(*args, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(host.model, "forward", never)
    s = [
        Sample(
            id="a",
            images=[Image.new("RGB", (32, 32))],
            messages=user_message(1, "Which?"),
            target="Joy",
            labels=["Joy"],
            label_set=LABELS,
            group="a",
        )
    ]
    cache = PredictionCache(tmp_path, "v", "h" * 16)
    with pytest.warns(UserWarning), pytest.raises(torch.cuda.OutOfMemoryError):
        run_likelihood(host, BASE, s, cache, "split", batch_size=2, chunk=2, progress=False)
    assert cache.get("split", "a") is None


def test_batched_generation_equals_one_by_one(any_host, tmp_path):
    """Left-padded batches of mixed prompt lengths and image sizes decode to the same greedy
    answers as one prompt at a time."""
    h = any_host
    samples = [
        Sample(
            id=f"q{i}",
            images=[Image.new("RGB", SIZES[i % 3], (50 * i, 90, 140))],
            messages=user_message(1, TEXTS[i % 3] + "!" * i),
            target="",
            labels=[],
            label_set=[],
            group=f"q{i}",
        )
        for i in range(5)
    ]
    texts = {}
    for b in (1, 5):
        cache = PredictionCache(tmp_path / str(b), "v", "h" * 16)
        run_generation(
            h, BASE, samples, cache, "split", max_new_tokens=12, batch_size=b, progress=False
        )
        texts[b] = [cache.get("split", s.id)["text"] for s in samples]
    assert any(texts[1])  # something was generated
    assert texts[5] == texts[1]


def test_the_cache_keyword_follows_the_forward_signature():
    """``cache`` where the model's forward takes it (past_key_values goes in transformers 5.40),
    ``past_key_values`` for the older releases pyproject allows; a PEFT wrapper is looked through.
    (pyproject turns the deprecation warning into an error, so every scoring test checks the
    installed release's side.)"""
    from emomerge.evaluation.scoring import _cache_arg, _out_cache

    class New:
        def forward(self, input_ids=None, cache=None, use_cache=None): ...

    class Old:
        def forward(self, input_ids=None, past_key_values=None, use_cache=None): ...

    class Wrapped:
        def __init__(self, inner):
            self.inner = inner

        def get_base_model(self):
            return self.inner

        def forward(self, *args, **kwargs): ...

    assert _cache_arg(New(), "c") == {"cache": "c"}
    assert _cache_arg(Old(), "c") == {"past_key_values": "c"}
    assert _cache_arg(Wrapped(New()), "c") == {"cache": "c"}
    assert _cache_arg(Wrapped(Old()), "c") == {"past_key_values": "c"}

    class Out(dict):
        past_key_values = "old"

    assert _out_cache(Out(cache="new")) == "new"
    assert _out_cache(Out()) == "old"
