"""Batches: images through each family's processor, loss on the answer tokens only."""

from __future__ import annotations

import pytest
from PIL import Image

from emomerge.training.data.sample import Sample, user_message
from emomerge.training.models.batching import IGNORE_INDEX, encode_batch
from emomerge.training.models.families import FAMILIES
from emomerge.training.models.loading import load_vlm

from .conftest import ALL_FAMILIES


def _samples() -> list[Sample]:
    # Different image sizes and prompt lengths so padding and image expansion differ per row.
    return [
        Sample(
            id=str(i),
            images=[Image.new("RGB", (40 + 30 * i, 50), (200, 20 * i, 0))],
            messages=user_message(1, "Which emotion?" + " more words" * 3 * i),
            target=target,
            labels=[],
            label_set=[],
            group=str(i),
        )
        for i, target in enumerate(["Anger", "Joy, Fear", "喜び"])
    ]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_labels_are_exactly_the_answer_tokens(tiny_model, family):
    model, processor, fam = load_vlm(tiny_model(family))
    assert fam == family
    samples = _samples()
    batch = encode_batch(processor, family, samples)
    # the end-of-turn text and what the template writes after it (Qwen "<|im_end|>\n")
    suffix = FAMILIES[family].answer_suffix + FAMILIES[family].answer_tail
    assert suffix.endswith("\n") == family.startswith("qwen")
    # the whitespace the family's template writes before an assistant answer
    prefix = {"llava": " ", "llava_next": " "}.get(family, "")
    bos = processor.tokenizer.bos_token_id
    for row, s in enumerate(samples):
        kept = batch["labels"][row] != IGNORE_INDEX
        assert (
            processor.tokenizer.decode(batch["input_ids"][row][kept]) == prefix + s.target + suffix
        )
        # every family whose tokenizer has a BOS opens with it (LLaVA-1.5 / LLaVA-NeXT: added
        # as the released processor adds it; Mllama / Pixtral: written by the template)
        assert (int(batch["input_ids"][row][0]) == bos) == (bos is not None)
        # The answer is the last run of real tokens: nothing after it but padding.
        last = int(batch["attention_mask"][row].nonzero().max())
        assert bool(kept[last]) and kept.nonzero().min() > 0
    out = model(**batch)
    assert out.loss.isfinite() and out.loss.item() > 0


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_training_and_scoring_render_and_encode_the_same_prompt(tiny_model, family):
    """Scoring reads a label after exactly the prompt tokens training put before it: the same
    string, the same ids (scoring left-pads, training right-pads), and the label + end-of-turn
    tokens training supervises (less the tail after the end-of-turn, which is not scored)."""
    from emomerge.evaluation import scoring
    from emomerge.training.models.batching import answer_prefix, render_prompt

    _, processor, _ = load_vlm(tiny_model(family))
    samples = _samples()
    tok = processor.tokenizer
    batch = encode_batch(processor, family, samples)
    prompts = [render_prompt(processor, s, family) for s in samples]
    assert prompts == [scoring.render_prompt(processor, s.messages, family) for s in samples]
    tok.padding_side = "left"
    enc = scoring.encode_prompts(
        processor, family, prompts, [scoring.load_images(s.images) for s in samples]
    )
    spec = FAMILIES[family]
    tail = (
        len(tok(spec.answer_tail, add_special_tokens=False)["input_ids"]) if spec.answer_tail else 0
    )
    for row, s in enumerate(samples):
        kept = batch["labels"][row] != IGNORE_INDEX
        start = int(kept.nonzero().min())
        scored = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
        assert scored == batch["input_ids"][row][:start].tolist()
        label = scoring.continuation_ids(
            tok, prompts[row], [answer_prefix(processor, s.messages) + s.target], spec.answer_suffix
        )[0]
        trained = batch["input_ids"][row][kept].tolist()
        assert label == trained[: len(trained) - tail]


# llava-hf/llava-1.5-7b-hf's own chat_template.jinja (as released): the generation prompt ends at
# "ASSISTANT:" and an assistant turn is rendered "ASSISTANT: <text> ".
LLAVA_HF = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.mark.parametrize(
    "family,template,expected",
    [
        ("llava", LLAVA_HF, " "),  # the released checkpoint's template
        ("llava", None, " "),  # our fallback
        ("llava_next", None, " "),
        ("qwen2_5_vl", None, ""),
        ("mllama", None, ""),
        ("pixtral", None, ""),
    ],
)
def test_answer_prefix_is_read_off_the_template(tiny_model, family, template, expected):
    from emomerge.training.data.sample import user_message
    from emomerge.training.models.batching import answer_prefix

    _, processor, _ = load_vlm(tiny_model(family))
    if template is not None:
        processor.chat_template = template
    assert answer_prefix(processor, user_message(1, "Which emotion?")) == expected


def test_answer_prefix_of_a_template_that_cannot_render_an_answer_is_empty():
    from emomerge.training.models.batching import answer_prefix

    class Refusing:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            if not add_generation_prompt:
                raise ValueError("this template renders no assistant turns")
            return "USER: hi ASSISTANT:"

    assert answer_prefix(Refusing(), [{"role": "user", "content": "hi"}]) == ""
