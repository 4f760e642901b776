"""Samples → model inputs: the family's processor for images, loss on the answer tokens only.

Each sample becomes ``prompt + answer_prefix + target + answer_suffix``; the prompt is the
processor's chat template with the generation prompt, and the prefix is the whitespace the
template puts between that prompt and an assistant answer (LLaVA's ``ASSISTANT: Joy``). The processor runs twice per batch — on the full texts and
on the prompts alone — so every family's image batching (Qwen's flattened patches, Mllama's tiles
and cross-attention mask, LLaVA-NeXT's any-resolution crops, Pixtral's variable sizes) stays the
processor's job, and the prompt lengths (after image-token expansion) come out of the same code.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emomerge.merging.errors import InputError
from PIL import Image

from .data.sample import Sample
from .families import get_family

IGNORE_INDEX = -100


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


def check_images(samples: list[Sample], *, max_bad_share: float = MAX_BAD_IMAGE_SHARE,
                 where: str = "") -> tuple[list[Sample], int]:
    """Decode every image of a split once; return the samples whose images all decode and the
    number of unreadable image files skipped (``skipped_images``).

    Each distinct file is checked once (EmoComics35's utterances share their page). A few
    unreadable files are skipped with one warning; more than ``max_bad_share`` (in [0, 1]) of
    the split's image files, or every one, is an :class:`InputError` naming ``where``.
    """
    if not 0 <= max_bad_share <= 1:
        raise InputError(f"{where or 'check_images'}: max_bad_image_share must be in [0, 1], "
                         f"got {max_bad_share}")
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
                    first_bad = (str(img) if isinstance(img, (str, Path))
                                 else f"in-memory image of sample {sample.id}", problems[key])
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
        raise InputError(f"{head}{bad} of {len(problems)} image files unreadable ({share:.1%}, "
                         f"more than max_bad_image_share {max_bad_share:g}); {example}")
    warnings.warn(f"{head}skipped {bad} unreadable image files ({len(samples) - len(kept)} "
                  f"samples); {example}", stacklevel=2)
    return kept, bad


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
