"""Cached-prefix label scoring equals one plain full forward pass per label (the oracle)."""

from __future__ import annotations

import pytest
from PIL import Image

from emomerge.evaluation.scoring import (
    continuation_ids,
    encode_prompts,
    render_prompt,
    score_labels,
    score_labels_full,
)
from emomerge.evaluation.variants import Variant, variant_from_dir

LABELS = ["Anger", "Disgust", "Fear", "Joy", "Neutral", "Sadness", "Surprise"]
MESSAGES = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "Which emotions? Joy, Fear."}],
    }
]


@pytest.mark.parametrize("with_eot", [False, True])
@pytest.mark.parametrize("adapter", [False, True])
def test_cached_prefix_matches_full_forward(host, stage_dirs, with_eot, adapter):
    img = Image.new("RGB", (64, 48), (220, 30, 30))
    prompt = render_prompt(host.processor, MESSAGES, host.family)
    assert prompt.endswith("<|im_start|>assistant\n")  # the generation prompt is included
    inputs = encode_prompts(host.processor, host.family, [prompt], [[img]])
    conts = continuation_ids(host.tokenizer, prompt, LABELS, "<|im_end|>" if with_eot else None)
    assert len({len(c) for c in conts}) > 1  # labels of different token counts
    variant = variant_from_dir(stage_dirs[1]) if adapter else Variant("base", "base")
    with host.activate(variant) as model:
        fast = score_labels(model, inputs, conts, host.tokenizer.pad_token_id)
        slow = score_labels_full(model, inputs, conts)
    for f, s in zip(fast, slow):
        assert f.n_tokens == s.n_tokens
        assert f.logprob == pytest.approx(s.logprob, abs=1e-4)


def test_adapters_change_scores(host, stage_dirs, merge_dirs):
    img = Image.new("RGB", (64, 64), (30, 60, 220))
    prompt = render_prompt(host.processor, MESSAGES, host.family)
    inputs = encode_prompts(host.processor, host.family, [prompt], [[img]])
    conts = continuation_ids(host.tokenizer, prompt, LABELS)
    got = []
    for v in [Variant("base", "base")] + [variant_from_dir(d) for d in stage_dirs + merge_dirs]:
        with host.activate(v) as model:
            got.append([round(x.logprob, 4) for x in score_labels(model, inputs, conts, 0)])
    assert len({tuple(g) for g in got}) == len(got)  # five different models


def test_stacked_chain_activates_parents_too(host, stage_dirs, tmp_path):
    """A chain [s1, s2] active at once equals the task-arithmetic merge s1 + s2 (λ = 1)."""
    from emomerge.merging import merge

    summed = merge("task_arithmetic", stage_dirs, tmp_path / "sum", weights=[1.0, 1.0])
    img = Image.new("RGB", (64, 64), (240, 220, 30))
    prompt = render_prompt(host.processor, MESSAGES, host.family)
    inputs = encode_prompts(host.processor, host.family, [prompt], [[img]])
    conts = continuation_ids(host.tokenizer, prompt, LABELS)
    chain = Variant("stacked", "stage", stage_dirs[1], chain=list(stage_dirs))
    with host.activate(chain) as model:
        both = score_labels(model, inputs, conts, 0)
    with host.activate(variant_from_dir(getattr(summed, "out", summed))) as model:
        merged = score_labels(model, inputs, conts, 0)
    for a, b in zip(both, merged):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
