"""Samples → model inputs: the family's processor for images, loss on the answer tokens only.

Each sample becomes ``prompt + answer_prefix + target + answer_suffix``; the prompt is the
processor's chat template with the generation prompt, and the prefix is the whitespace the
template puts between that prompt and an assistant answer (LLaVA's ``ASSISTANT: Joy``). The processor runs twice per batch — on the full texts and
on the prompts alone — so every family's image batching (Qwen's flattened patches, Mllama's tiles
and cross-attention mask, LLaVA-NeXT's any-resolution crops, Pixtral's variable sizes) stays the
processor's job, and the prompt lengths (after image-token expansion) come out of the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emomerge.merging.errors import InputError
from PIL import Image

from .data.sample import Sample
from .families import get_family

IGNORE_INDEX = -100


def load_images(sample: Sample) -> list[Image.Image]:
    """The sample's images as RGB PIL images."""
    return rgb_images(sample.images)


def rgb_images(images: list) -> list[Image.Image]:
    """RGB PIL images from paths or PIL images (training and evaluation load images alike)."""
    out = []
    for img in images:
        if isinstance(img, (str, Path)):
            with Image.open(img) as fh:
                out.append(fh.convert("RGB"))
        else:
            out.append(img.convert("RGB"))
    return out


def render_prompt(processor: Any, sample: Sample) -> str:
    """The chat-template prompt up to where the assistant's answer starts."""
    return processor.apply_chat_template(sample.messages, add_generation_prompt=True,
                                         tokenize=False)


_SENTINEL = "\u2063answer\u2063"  # invisible separators: text no template writes itself


def answer_prefix(processor: Any, messages: list[dict]) -> str:
    """What the chat template writes between the generation prompt and an assistant answer.

    Most templates open the assistant turn completely in the generation prompt (Qwen:
    ``<|im_start|>assistant\n``): "". LLaVA-1.5 ends it with ``ASSISTANT:`` but renders an
    assistant turn as ``ASSISTANT: <answer>``, LLaVA-NeXT-Mistral as ``[/INST] <answer>``: " ".
    Read off the template itself (the checkpoint's own where it has one) by rendering a
    sentinel answer; only whitespace counts, anything else (a template that renders the turn
    differently from its generation prompt) gives "".
    """
    import jinja2

    answer = {"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]}
    try:
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = processor.apply_chat_template([*messages, answer], add_generation_prompt=False,
                                             tokenize=False)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError):
        return ""
    if not isinstance(full, str) or not full.startswith(prompt) or _SENTINEL not in full[len(prompt):]:
        return ""
    prefix = full[len(prompt):].split(_SENTINEL, 1)[0]
    return prefix if not prefix.strip() else ""


def _process(processor: Any, family: str, texts: list[str], images: list[list[Image.Image]]):
    # Mllama wants one image list per sample; the others take a flat list in prompt order.
    imgs: Any = images if family == "mllama" else [im for per in images for im in per]
    return processor(text=texts, images=imgs or None, return_tensors="pt", padding=True,
                     add_special_tokens=False)


def encode_batch(processor: Any, family: str, samples: list[Sample]) -> dict[str, Any]:
    """Model inputs with ``labels`` = the answer tokens (prompt and padding set to -100)."""
    spec = get_family(family)
    tokenizer = processor.tokenizer
    # Right padding keeps each prompt at the start of its row, so prompt lengths index labels.
    tokenizer.padding_side = "right"
    prompts = [render_prompt(processor, s) for s in samples]
    images = [load_images(s) for s in samples]
    full = _process(processor, family, [p + answer_prefix(processor, s.messages) + s.target
                                        + spec.answer_suffix for p, s in zip(prompts, samples)],
                    images)
    prompt_only = _process(processor, family, prompts, images)
    prompt_lens = prompt_only["attention_mask"].sum(dim=1)
    labels = full["input_ids"].clone()
    for i, n in enumerate(prompt_lens.tolist()):
        if not labels[i, :n].equal(prompt_only["input_ids"][i, :n]):
            # The tokenizer merged across the prompt/answer boundary: masking would be wrong.
            raise InputError(f"sample {samples[i].id}: prompt and answer tokens merge at the "
                             "boundary; the answer cannot be isolated for the loss")
        labels[i, :n] = IGNORE_INDEX
    labels[full["attention_mask"] == 0] = IGNORE_INDEX
    batch = dict(full)
    batch["labels"] = labels
    return batch
