"""Image-resolution caps: a 1988 × 3052 comic page stays near 1 MP in every family."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from emomerge.merging.errors import InputError
from emomerge.training.models.families import (
    FAMILIES,
    IMAGE_CAPS,
    PAGE,
    apply_image_cap,
    image_tokens,
    vision_tokens,
)
from emomerge.training.models.loading import load_processor, load_vlm
from emomerge.training.models.tiny import real_processor

from .conftest import ALL_FAMILIES


def _qwen_tokens(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> int:
    """Qwen2-VL's smart_resize written out from its paper/code comments: both sides rounded to
    ``factor``, scaled down by sqrt(area / max_pixels) when over the cap; one token per
    factor × factor block."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return (h // factor) * (w // factor)


def test_family_defaults_are_the_documented_ones():
    assert set(IMAGE_CAPS) == set(FAMILIES)
    assert IMAGE_CAPS["qwen2_5_vl"].default_max_pixels == 1024 * 28 * 28 == 802_816
    assert IMAGE_CAPS["qwen3_vl"].default_max_pixels == 1024 * 32 * 32 == 1_048_576
    assert IMAGE_CAPS["pixtral"].default_max_pixels == 1024 * 1024
    assert {f for f, r in IMAGE_CAPS.items() if r.default_max_pixels is None} == {
        "llava",
        "llava_next",
        "mllama",
    }


# tokens of a page with the real checkpoints' processor settings: (before the cap, after)
REAL_PAGE_TOKENS = {
    "qwen2_5_vl": (7739, 975),  # 109 x 71 blocks of 28 px (the H200 measurement) -> 39 x 25
    "qwen3_vl": (5890, 975),  # 16.8 MP checkpoint limit: 95 x 62 blocks of 32 px -> 39 x 25
    "pixtral": (2752, 2752),  # longest edge 1024: 64 rows x (42 + 1 break)
    "llava_next": (2160, 2160),  # 672 x 672 grid, unpadded to the page's aspect ratio
    "llava": (576, 576),  # 24 x 24 CLIP patches
    "mllama": (1, 1),  # cross-attention: one <|image|> in the text
}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_real_settings_page_tokens_before_and_after_the_default_cap(family):
    processor = real_processor(family)
    before = image_tokens(processor, family, *PAGE)
    record = apply_image_cap(processor, family)
    assert (before, record["page_tokens"]) == REAL_PAGE_TOKENS[family]
    assert record["page_tokens"] == image_tokens(processor, family, *PAGE)
    assert record["pixels_limit"] <= 1_254_400  # never more than Mllama's 4 tiles of 560 px
    if family in ("qwen2_5_vl", "qwen3_vl"):
        factor = 28 if family == "qwen2_5_vl" else 32
        s = record["settings"]
        assert s["patch_size"] * s["merge_size"] == factor
        assert before == _qwen_tokens(
            *PAGE, factor, s["min_pixels"], 16777216 if family == "qwen3_vl" else 12845056
        )
        assert (
            record["page_tokens"]
            == _qwen_tokens(*PAGE, factor, s["min_pixels"], s["max_pixels"])
            <= 1024
        )
        assert record["source"] == "family default"
    else:
        assert record["source"] == "checkpoint"


def test_mllama_tiles_carry_the_page_through_cross_attention():
    processor = real_processor("mllama")
    apply_image_cap(processor, "mllama")
    assert vision_tokens(processor, "mllama", *PAGE) == 4 * (40 * 40 + 1)  # 2 x 2 tiles of 560


@pytest.mark.parametrize(
    "family,max_pixels,want",
    [
        ("qwen2_5_vl", 2_000_000, 2_000_000),
        ("qwen2_5_vl", 401_408, 401_408),
        ("pixtral", 512 * 512, 512),  # longest edge: sqrt, rounded down to the 16 px patch
        ("pixtral", 500 * 500, 496),
    ],
)
def test_explicit_caps_on_real_settings(family, max_pixels, want):
    processor = real_processor(family)
    record = apply_image_cap(processor, family, max_pixels)
    assert record["source"] == "explicit" and record["max_pixels"] == max_pixels
    key = "max_pixels" if family == "qwen2_5_vl" else "longest_edge"
    assert record["settings"][key] == want
    if family == "qwen2_5_vl":
        assert record["page_tokens"] == _qwen_tokens(*PAGE, 28, 3136, max_pixels)


@pytest.mark.parametrize(
    "family,max_pixels,match",
    [
        ("llava", 300 * 300, "llava cannot see fewer than 112896 px"),
        ("mllama", 560 * 560, "mllama cannot see fewer than 1254400 px"),
        ("llava_next", 300 * 300, "below LLaVA-NeXT's smallest grid"),
        ("pixtral", 15 * 15, "below one 16x16 patch"),
    ],
)
def test_caps_an_architecture_cannot_honour_are_one_line(family, max_pixels, match):
    with pytest.raises(InputError, match=match) as exc:
        apply_image_cap(real_processor(family), family, max_pixels, where="cur.yaml: key 'x'")
    assert str(exc.value).startswith("cur.yaml: key 'x': ") and "\n" not in str(exc.value)


def test_llava_next_cap_keeps_the_smaller_grids_in_processor_and_model():
    processor = real_processor("llava_next")

    from types import SimpleNamespace

    cfg = SimpleNamespace(
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    )
    record = apply_image_cap(processor, "llava_next", 400_000, cfg)
    kept = [[336, 672], [672, 336], [1008, 336], [336, 1008]]
    assert record["settings"]["image_grid_pinpoints"] == kept == cfg.image_grid_pinpoints
    assert record["page_tokens"] < REAL_PAGE_TOKENS["llava_next"][0]


# -- tiny models: the processor's real output, and the model accepts it ----------------------

#: explicit caps below each tiny checkpoint's own limit (None: the architecture fixes the size)
TINY_CAPS = {
    "qwen2_5_vl": 56 * 84,
    "qwen3_vl": 64 * 96,
    "pixtral": 48 * 48,
    "llava_next": 2048,
    "llava": None,
    "mllama": None,
}


def _count_image_tokens(processor, family, batch) -> int:
    token = FAMILIES[family].image_token
    ids = batch["input_ids"][0].tolist()
    n = ids.count(processor.tokenizer.convert_tokens_to_ids(token))
    if family == "pixtral":  # rows end in [IMG_BREAK], the last in [IMG_END]
        n += sum(
            ids.count(processor.tokenizer.convert_tokens_to_ids(t))
            for t in ("[IMG_BREAK]", "[IMG_END]")
        )
    return n


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_a_page_gives_at_most_the_caps_tokens_on_tiny_models(family, tiny_model):
    page = Image.new("RGB", (PAGE[1], PAGE[0]), (200, 120, 40))  # PIL takes (width, height)
    model, processor, _ = load_vlm(tiny_model(family), max_pixels=TINY_CAPS[family])
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which emotion?"}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = processor(
        text=[prompt],
        images=[[page]] if family == "mllama" else [page],
        return_tensors="pt",
        add_special_tokens=False,
    )
    counted = _count_image_tokens(processor, family, batch)
    assert counted == image_tokens(processor, family, *PAGE)
    cap = TINY_CAPS[family]
    uncapped = load_processor(tiny_model(family), family)  # the tiny checkpoint's own limit
    if cap is not None:
        assert counted < image_tokens(uncapped, family, *PAGE)
    if family in ("qwen2_5_vl", "qwen3_vl"):
        block = 28 if family == "qwen2_5_vl" else 32
        assert counted <= cap // block**2
        assert batch["image_grid_thw"][0].prod().item() // 4 == counted
    if family == "pixtral":
        assert max(batch["pixel_values"][0].shape[-2:]) <= 48
    with torch.no_grad():  # the model agrees with the processor (LLaVA-NeXT: same grids)
        out = model(**batch)
    assert out.logits.shape[1] == batch["input_ids"].shape[1]
