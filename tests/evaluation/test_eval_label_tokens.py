"""Label tokens are scored as training encodes them: after the prompt, not on their own.

A SentencePiece-style (Metaspace) tokenizer — the kind Llama/Mistral-based LLaVA-1.5 and
LLaVA-NeXT-Mistral use — prefixes the first word of a string with "▁". Built here offline with
the ``tokenizers`` library, it shows the standalone encoding differs from the in-context one.
"""

from __future__ import annotations

import pytest

from emomerge.evaluation.scoring import continuation_ids
from emomerge.merging.errors import InputError

PROMPT = "USER: Which emotion is shown? ASSISTANT:"


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    return _metaspace()


@pytest.fixture(scope="module")
def metaspace_bos_tokenizer():
    """The same with a BOS "<s>": prepend_scheme "first" is what transformers 5 builds for a
    Llama/Mistral tokenizer with ``legacy: false``."""
    return _metaspace(bos="<s>")


def _metaspace(bos=None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
            pre_tokenizers.Punctuation(),
        ]
    )
    from tokenizers import decoders

    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = [
        "USER: Which emotion is shown? ASSISTANT:Joy",
        "Joy Fear Anger Joy Fear",
        "ASSISTANT:Fear",
        "ASSISTANT:Anger",
        "Joy",
        "Fear",
        "Anger",
    ] * 20
    tk.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=200, special_tokens=["<unk>", "<pad>", "</s>"] + ([bos] if bos else [])
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", bos_token=bos
    )


class _TextProcessor:
    """The slice of a VLM processor that training's encode path uses, for text-only samples."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return PROMPT

    def __call__(self, text, images=None, **kw):
        return self.tokenizer(text, **kw)


def test_standalone_label_tokens_differ_from_the_trained_ones(metaspace_tokenizer):
    from emomerge.training.data import Sample
    from emomerge.training.models.batching import encode_batch
    from emomerge.training.models.families import get_family

    tok = metaspace_tokenizer
    eot = get_family("llava").answer_suffix  # "</s>"
    standalone = tok("Joy" + eot, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(standalone)[0].startswith("▁")  # the prefix space

    sample = Sample(
        id="s",
        images=[],
        messages=[],
        target="Joy",
        labels=["Joy"],
        label_set=["Anger", "Fear", "Joy"],
        group="s",
    )
    batch = encode_batch(_TextProcessor(tok), "llava", [sample])
    trained = [int(t) for t in batch["labels"][0] if t != -100]  # the answer tokens trained on

    got = continuation_ids(tok, PROMPT, ["Joy"], eot)[0]
    assert got == trained
    assert got != standalone
    assert not tok.convert_ids_to_tokens(got)[0].startswith("▁")


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_a_bos_opened_prompt_is_encoded_as_the_released_processor_does(
    metaspace_bos_tokenizer, padding_side
):
    # LLaVA prompts open with "<s>" (the BOS llava-hf's processor adds through its tokenizer).
    # Tokenized in one string, a "first"-scheme Metaspace gives the text after the special token
    # no "▁" ("<s>USER" -> "U"...); training and scoring encode the BOS id, then the prompt on
    # its own, as the processor (add_special_tokens) and LLaMA-Factory (a BOS slot) do.
    from emomerge.training.data import Sample
    from emomerge.training.models.batching import chat_prompt, encode_batch, process_texts

    tok = metaspace_bos_tokenizer
    tok.padding_side = padding_side
    proc = _TextProcessor(tok)
    prompt = chat_prompt(proc, [], "llava")
    assert prompt == "<s>" + PROMPT
    fresh = tok(PROMPT, add_special_tokens=False)["input_ids"]
    one_string = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(fresh)[0].startswith("▁")
    assert one_string[1:] != fresh  # the premise: in one string the "▁" is lost
    # two rows of different lengths: the BOS sits before each row's first real token
    enc = process_texts(proc, "llava", [prompt, "<s>" + PROMPT + " Joy"], [[], []])
    for row, text in zip(range(2), [PROMPT, PROMPT + " Joy"]):
        real = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
        assert real == [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    short = enc["attention_mask"][0].tolist()  # the shorter row: padding on its side only
    n = len(fresh) + 1
    pads = [0] * (len(short) - n)
    assert short == ([1] * n + pads if padding_side == "right" else pads + [1] * n) and pads
    # the label tokens training supervises are the ones scoring reads after the prompt
    sample = Sample(
        id="s",
        images=[],
        messages=[],
        target="Joy",
        labels=["Joy"],
        label_set=["Anger", "Joy"],
        group="s",
    )
    tok.padding_side = "right"
    batch = encode_batch(proc, "llava", [sample])
    assert batch["input_ids"][0][0] == tok.bos_token_id
    trained = [int(t) for t in batch["labels"][0] if t != -100]
    assert continuation_ids(tok, prompt, ["Joy"], "</s>")[0] == trained


def test_prompt_that_merges_with_the_label_is_refused(metaspace_tokenizer):
    # prompt "…:J" + label "oy": the prompt's last token "J" becomes part of "Joy" once the label
    # is appended, so the label's tokens cannot be cut out of the joint encoding.
    tok = metaspace_tokenizer
    head = tok("ASSISTANT:J", add_special_tokens=False)["input_ids"]
    full = tok("ASSISTANT:Joy", add_special_tokens=False)["input_ids"]
    assert full[: len(head)] != head  # the premise of this test
    with pytest.raises(InputError, match="not a prefix"):
        continuation_ids(tok, "ASSISTANT:J", ["oy"])


def test_labels_are_scored_as_trained_with_the_template_prefix(tmp_path):
    # tiny LLaVA: training encodes "ASSISTANT: Joy</s>" (the template's answer prefix " "); the
    # label-likelihood path must score exactly those tokens
    from PIL import Image

    from emomerge.evaluation.scoring import answer_prefix, render_prompt
    from emomerge.training.data import Sample
    from emomerge.training.data.sample import user_message
    from emomerge.training.models.batching import encode_batch
    from emomerge.training.models.families import get_family
    from emomerge.training.models.loading import load_vlm
    from emomerge.training.models.tiny import build_tiny_vlm

    _, processor, family = load_vlm(str(build_tiny_vlm("llava", tmp_path / "llava")))
    messages = user_message(1, "Which emotion?")
    sample = Sample(
        id="s",
        images=[Image.new("RGB", (40, 50))],
        messages=messages,
        target="Joy",
        labels=["Joy"],
        label_set=["Anger", "Joy"],
        group="s",
    )
    batch = encode_batch(processor, family, [sample])
    trained = [int(t) for t in batch["labels"][0] if t != -100]
    prompt = render_prompt(processor, messages, family)
    assert prompt.startswith("<s>USER: <image>")  # the BOS the released processor adds
    prefix = answer_prefix(processor, messages)
    assert prefix == " "
    got = continuation_ids(
        processor.tokenizer, prompt, [prefix + "Joy"], get_family(family).answer_suffix
    )[0]
    assert got == trained


def test_cached_scores_are_keyed_by_the_answer_prefix(tmp_path):
    # LLaVA scores labels after the template's space and after a BOS-opened prompt: its cache key
    # says so in both modes (outputs from before are not reused); Qwen has no prefix, scores
    # labels up to <|im_end|> as before (the "\n" trained after it is not scored) and keeps the
    # key it had
    from types import SimpleNamespace

    from emomerge.evaluation.runner import inference_key
    from emomerge.training.data.sample import user_message
    from emomerge.training.models.loading import load_vlm
    from emomerge.training.models.tiny import build_tiny_vlm

    cfg = SimpleNamespace(append_eot=False, max_new_tokens=8)
    samples = [SimpleNamespace(messages=user_message(1, "Which emotion?"))]
    keys = {}
    for family in ("llava", "qwen2_5_vl"):
        _, processor, _ = load_vlm(str(build_tiny_vlm(family, tmp_path / family)))
        keys[family] = inference_key(processor, samples, cfg, "likelihood", family=family)
        generate = inference_key(processor, samples, cfg, "generate", family=family)
        assert (generate.get("prompt") == "bos") == (family == "llava")
    assert keys["llava"]["answer_prefix"] == " " and keys["llava"]["prompt"] == "bos"
    assert keys["qwen2_5_vl"] == {
        "mode": "likelihood",
        "append_eot": False,
        "max_new_tokens": 8,
        "label_tokens": "after_prompt",
    }
    # label-set scoring records other candidates: its key names the mode and the set size, so
    # neither per-label scores nor sets of another size are reused
    cfg3 = SimpleNamespace(append_eot=False, max_new_tokens=8, max_labels=3)
    k3 = inference_key(processor, samples, cfg3, "likelihood", "label_set", family="qwen2_5_vl")
    k2 = inference_key(
        processor,
        samples,
        SimpleNamespace(**{**vars(cfg3), "max_labels": 2}),
        "likelihood",
        "label_set",
        family="qwen2_5_vl",
    )
    assert k3 == {**keys["qwen2_5_vl"], "scoring": "label_set", "max_labels": 3}
    assert k2["max_labels"] == 2
