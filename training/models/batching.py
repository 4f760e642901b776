"""Samples → model inputs: the family's processor for images, loss on the answer tokens only.

Each sample becomes ``prompt + answer_prefix + target + answer_suffix + answer_tail``; the prompt
is the processor's chat template with the generation prompt, opened with the tokenizer's BOS where
the released processor adds one (LLaVA-1.5, LLaVA-NeXT: :func:`chat_prompt`); the prefix is the
whitespace the template puts between that prompt and an assistant answer (LLaVA's
``ASSISTANT: Joy``); suffix and tail close the turn as the template does (Qwen's
``<|im_end|>`` + ``\n``). The processor runs twice per batch — on the full texts and on the
prompts alone — so every family's image batching (Qwen's flattened patches, Mllama's tiles and
cross-attention mask, LLaVA-NeXT's any-resolution crops, Pixtral's variable sizes) stays the
processor's job, and the prompt lengths (after image-token expansion) come out of the same code.
Evaluation renders and encodes prompts with the same functions (:func:`chat_prompt`,
:func:`process_texts`), so a label is scored after the exact tokens it was trained after.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from emomerge.merging.errors import InputError

from ..data.sample import Sample
from .families import get_family

IGNORE_INDEX = -100
#: Processor outputs with one entry per token ([batch, seq, ...]; ``evaluation.scoring`` cuts the
#: same keys).
PER_TOKEN_KEYS = (
    "input_ids",
    "attention_mask",
    "mm_token_type_ids",
    "token_type_ids",
    "cross_attention_mask",
)


#: Share of a split's image files that may be unreadable (skipped with a warning) before
#: training or evaluation stops: more than this says the data is broken, not a few files.
MAX_BAD_IMAGE_SHARE = 0.05


def load_images(sample: Sample) -> list[Image.Image]:
    """The sample's images as RGB PIL images."""
    return rgb_images(sample.images)


def rgb_images(images: list) -> list[Image.Image]:
    """RGB PIL images from paths or PIL images (training and evaluation load images alike).

    An unreadable file is one line naming it (:func:`check_images` keeps such files out of a
    split up front; this is the guard for images that changed since, or were never checked).
    """
    out = []
    for img in images:
        try:
            if isinstance(img, (str, Path)):
                with Image.open(img) as fh:
                    out.append(fh.convert("RGB"))
            else:
                out.append(img.convert("RGB"))
        except Exception as exc:  # PIL raises many types on corrupt data (_decode_problem)
            name = img if isinstance(img, (str, Path)) else "an in-memory image"
            raise InputError(f"{name}: not a readable image ({_reason(exc)})") from exc
    return out


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _opener(img: Any) -> Callable[[], Image.Image] | None:
    """How to open a fresh copy of an image for checking; None when it is already decoded."""
    if isinstance(img, (str, Path)):
        return lambda: Image.open(img)
    fp = getattr(img, "fp", None)
    if isinstance(fp, io.BytesIO):  # lazily opened bytes (EMID's parquet cells)
        data = fp.getvalue()
        return lambda: Image.open(io.BytesIO(data))
    return None  # decoded in memory (placeholders): nothing left to fail


def _decode_problem(opener: Callable[[], Image.Image]) -> str | None:
    """Why an image cannot be decoded, or None when it can.

    ``verify()`` checks the container (PNG chunk CRCs) but not a truncated JPEG stream, so the
    image is also decoded, in JPEG draft mode (1/8 scale: every byte is still read, at a
    fraction of the cost). PIL's plugins raise many exception types on corrupt data (OSError,
    SyntaxError, struct.error, ValueError, DecompressionBombError...), hence ``Exception``.
    """
    try:
        with opener() as im:
            im.verify()
        with opener() as im:
            im.draft("RGB", (64, 64))
            im.load()
    except Exception as exc:  # noqa: BLE001 - no narrower common base (see above)
        return _reason(exc)
    return None


def check_images(
    samples: list[Sample], *, max_bad_share: float = MAX_BAD_IMAGE_SHARE, where: str = ""
) -> tuple[list[Sample], int]:
    """Decode every image of a split once; return the samples whose images all decode and the
    number of unreadable image files skipped (``skipped_images``).

    Each distinct file is checked once (EmoComics35's utterances share their page). A few
    unreadable files are skipped with one warning; more than ``max_bad_share`` (in [0, 1]) of
    the split's image files, or every one, is an :class:`InputError` naming ``where``.
    """
    if not 0 <= max_bad_share <= 1:
        raise InputError(
            f"{where or 'check_images'}: max_bad_image_share must be in [0, 1], got {max_bad_share}"
        )
    problems: dict[Any, str | None] = {}
    first_bad: tuple[str, str] | None = None
    kept = []
    for sample in samples:
        ok = True
        for img in sample.images:
            key = str(img) if isinstance(img, (str, Path)) else id(img)
            if key not in problems:
                opener = _opener(img)
                problems[key] = _decode_problem(opener) if opener is not None else None
                if problems[key] is not None and first_bad is None:
                    first_bad = (
                        str(img)
                        if isinstance(img, (str, Path))
                        else f"in-memory image of sample {sample.id}",
                        problems[key],
                    )
            ok = ok and problems[key] is None
        if ok:
            kept.append(sample)
    bad = sum(p is not None for p in problems.values())
    if not bad:
        return kept, 0
    assert first_bad is not None
    head = f"{where}: " if where else ""
    share = bad / len(problems)
    example = f"e.g. {first_bad[0]} ({first_bad[1]})"
    if not kept or share > max_bad_share:
        raise InputError(
            f"{head}{bad} of {len(problems)} image files unreadable ({share:.1%}, "
            f"more than max_bad_image_share {max_bad_share:g}); {example}"
        )
    warnings.warn(
        f"{head}skipped {bad} unreadable image files ({len(samples) - len(kept)} "
        f"samples); {example}",
        stacklevel=2,
    )
    return kept, bad


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def prompt_bos(processor: Any, family: str) -> str:
    """The BOS text the family's prompt opens with that its chat template does not write: the
    tokenizer's ``bos_token`` for LLaVA-1.5 and LLaVA-NeXT (``FamilySpec.prompt_bos``: llava-hf's
    templates leave it to the tokenizer, which adds it by default), else ""."""
    if not get_family(family).prompt_bos:
        return ""
    return getattr(_tokenizer(processor), "bos_token", None) or ""


def chat_prompt(processor: Any, messages: list[dict], family: str) -> str:
    """The chat-template prompt up to where the assistant's answer starts, opened with the
    tokenizer's BOS where the template leaves it to the tokenizer (:func:`prompt_bos`).

    The one rendering training, label scoring and generation share; LLaMA-Factory's templates
    render the same string (tests/training/test_llamafactory_parity.py).
    """
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = prompt_bos(processor, family)
    return bos + text if bos and not text.startswith(bos) else text


def render_prompt(processor: Any, sample: Sample, family: str) -> str:
    """The prompt of ``sample`` (:func:`chat_prompt`)."""
    return chat_prompt(processor, sample.messages, family)


def answer_text(processor: Any, family: str, sample: Sample) -> str:
    """What follows the prompt in training, all of it supervised: the template's whitespace
    (:func:`answer_prefix`), the target, the end-of-turn text (``answer_suffix``) and what the
    template writes after it (``answer_tail``: Qwen's "\n", as LLaMA-Factory trains it)."""
    spec = get_family(family)
    return (
        answer_prefix(processor, sample.messages)
        + sample.target
        + spec.answer_suffix
        + spec.answer_tail
    )


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
        full = processor.apply_chat_template(
            [*messages, answer], add_generation_prompt=False, tokenize=False
        )
    except (jinja2.TemplateError, TypeError, ValueError, KeyError):
        return ""
    if (
        not isinstance(full, str)
        or not full.startswith(prompt)
        or _SENTINEL not in full[len(prompt) :]
    ):
        return ""
    prefix = full[len(prompt) :].split(_SENTINEL, 1)[0]
    return prefix if not prefix.strip() else ""


def process_texts(
    processor: Any, family: str, texts: list[str], images: list[list[Image.Image]]
) -> dict[str, Any]:
    """Processor inputs of texts that start with a :func:`chat_prompt` (the template already holds
    the special tokens), padded on the tokenizer's ``padding_side``.

    A text opened with :func:`prompt_bos` is encoded as the BOS id followed by the rest tokenized
    on its own: what the released processor does (its tokenizer adds the BOS) and what
    LLaMA-Factory does (a BOS slot, then the turn). Tokenized in one string, the text after the
    BOS could come out otherwise: transformers 5 builds Llama/Mistral tokenizers with a Metaspace
    pre-tokenizer that, with ``legacy: false`` (prepend_scheme "first"), gives no "▁" to text that
    follows a special token ("<s>USER" → "U", "SER" where the model saw "▁USER").
    """
    bos = prompt_bos(processor, family)
    opened = [bool(bos) and t.startswith(bos) for t in texts]
    if any(opened):
        texts = [t[len(bos) :] if o else t for t, o in zip(texts, opened)]
    # Mllama wants one image list per sample; the others take a flat list in prompt order.
    imgs: Any = images if family == "mllama" else [im for per in images for im in per]
    out = dict(
        processor(
            text=texts,
            images=imgs if any(images) else None,
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
    )
    if any(opened):
        tok = _tokenizer(processor)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        out = _open_rows(
            out, tok.convert_tokens_to_ids(bos), opened, pad, left=tok.padding_side == "left"
        )
    return out


def _open_rows(
    inputs: dict[str, Any], token_id: int, rows: list[bool], pad_id: int, *, left: bool
) -> dict[str, Any]:
    """``inputs`` with ``token_id`` put before the first real token of each row in ``rows``
    (padding kept on its side; other per-token tensors get 0 there, a text position)."""
    import torch

    mask = inputs["attention_mask"]
    b, n = mask.shape
    out = dict(inputs)
    for key in PER_TOKEN_KEYS:
        v = inputs.get(key)
        if not torch.is_tensor(v) or tuple(v.shape[:2]) != (b, n):
            continue
        first = {"input_ids": token_id, "attention_mask": 1}.get(key, 0)
        new = v.new_full((b, n + 1, *v.shape[2:]), pad_id if key == "input_ids" else 0)
        for r in range(b):
            real = v[r][mask[r].bool()]
            if rows[r]:
                real = torch.cat([v.new_full((1, *v.shape[2:]), first), real])
            k = real.shape[0]
            if left:
                new[r, n + 1 - k :] = real
            else:
                new[r, :k] = real
        out[key] = new
    return out


def encode_batch(processor: Any, family: str, samples: list[Sample]) -> dict[str, Any]:
    """Model inputs with ``labels`` = the answer tokens (prompt and padding set to -100)."""
    tokenizer = processor.tokenizer
    # Right padding keeps each prompt at the start of its row, so prompt lengths index labels.
    tokenizer.padding_side = "right"
    prompts = [render_prompt(processor, s, family) for s in samples]
    images = [load_images(s) for s in samples]
    full = process_texts(
        processor,
        family,
        [p + answer_text(processor, family, s) for p, s in zip(prompts, samples)],
        images,
    )
    prompt_only = process_texts(processor, family, prompts, images)
    prompt_lens = prompt_only["attention_mask"].sum(dim=1)
    labels = full["input_ids"].clone()
    for i, n in enumerate(prompt_lens.tolist()):
        if not labels[i, :n].equal(prompt_only["input_ids"][i, :n]):
            # The tokenizer merged across the prompt/answer boundary: masking would be wrong.
            raise InputError(
                f"sample {samples[i].id}: prompt and answer tokens merge at the "
                "boundary; the answer cannot be isolated for the loss"
            )
        labels[i, :n] = IGNORE_INDEX
    labels[full["attention_mask"] == 0] = IGNORE_INDEX
    batch = dict(full)
    batch["labels"] = labels
    return batch
