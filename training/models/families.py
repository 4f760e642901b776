"""One row per supported VLM family: model class, LoRA targets, chat template, image placement.

LoRA targets are a regex over module names that only matches the *language model*'s attention and
MLP projections (``model.language_model.layers.N...`` in transformers ≥ 5 naming): the vision
tower and the projector stay frozen, as in LLaMA-Factory's defaults (``freeze_vision_tower``,
``freeze_multi_modal_projector``). A plain list such as ``["q_proj", ..., "down_proj"]`` would also
wrap vision-tower MLPs (docs/DESIGN.md, Facts).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emomerge.merging.errors import InputError

from . import templates

_PROJ = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LM_ONLY_REGEX = rf".*language_model.*\.{_PROJ}"


@dataclass(frozen=True)
class FamilySpec:
    """How one VLM family is loaded, prompted and adapted."""

    name: str
    #: transformers class that loads the checkpoint (all are AutoModelForImageTextToText models).
    model_class: str
    #: config.model_type values of this family (pixtral checkpoints load as "llava").
    model_types: tuple[str, ...]
    lora_target_regex: str
    #: LLaMA-Factory template name for export.
    llamafactory_template: str
    #: Fallback chat template when the processor has none.
    chat_template: str
    #: Text appended to the target to close the assistant turn (what the model learns to stop on).
    answer_suffix: str
    #: The image token as the processor's prompt writes it (before expansion).
    image_token: str
    #: Where images enter the prompt.
    image_placement: str
    #: Module-name prefixes of the vision tower and projector (must never carry LoRA).
    vision_modules: tuple[str, ...]
    #: Hub-id patterns that identify the family without reading a config.
    hub_pattern: str
    #: The prompt opens with the tokenizer's BOS, which the released chat template leaves to the
    #: tokenizer (llava-hf's LLaVA-1.5 / LLaVA-NeXT processors add ``<s>`` by default; the model
    #: was trained with it). Templates that write it themselves (Mllama, Pixtral) say False.
    prompt_bos: bool = False
    #: What the template writes after ``answer_suffix`` to end the assistant turn (Qwen: the
    #: "\n" after ``<|im_end|>``): trained on, as LLaMA-Factory does, but not scored (the label
    #: and its end-of-turn decide; evaluation stops at ``answer_suffix``).
    answer_tail: str = ""


FAMILIES: dict[str, FamilySpec] = {
    "qwen2_5_vl": FamilySpec(
        "qwen2_5_vl",
        "Qwen2_5_VLForConditionalGeneration",
        ("qwen2_5_vl",),
        LM_ONLY_REGEX,
        "qwen2_vl",
        templates.QWEN2_5_VL,
        "<|im_end|>",
        "<|image_pad|>",
        "<|vision_start|><|image_pad|><|vision_end|> inline in the user turn, expanded to one "
        "pad per merged 2x2 patch group",
        ("model.visual",),
        r"qwen2\.5-vl|qwen2_5_vl",
        answer_tail="\n",
    ),
    "qwen3_vl": FamilySpec(
        "qwen3_vl",
        "Qwen3VLForConditionalGeneration",
        ("qwen3_vl",),
        LM_ONLY_REGEX,
        "qwen3_vl_nothink",
        templates.QWEN3_VL,
        "<|im_end|>",
        "<|image_pad|>",
        "<|vision_start|><|image_pad|><|vision_end|> inline; deepstack features also feed the "
        "first decoder layers",
        ("model.visual",),
        r"qwen3-vl|qwen3_vl",
        answer_tail="\n",
    ),
    "mllama": FamilySpec(
        "mllama",
        "MllamaForConditionalGeneration",
        ("mllama",),
        LM_ONLY_REGEX,
        "mllama",
        templates.MLLAMA,
        "<|eot_id|>",
        "<|image|>",
        "<|image|> token; image tiles enter through cross-attention layers",
        ("model.vision_model", "model.multi_modal_projector"),
        r"llama-3\.2-.*vision|mllama",
    ),
    "llava": FamilySpec(
        "llava",
        "LlavaForConditionalGeneration",
        ("llava",),
        LM_ONLY_REGEX,
        "llava",
        templates.LLAVA,
        "</s>",
        "<image>",
        "'<image>\\n' before the text, expanded to one token per CLIP patch",
        ("model.vision_tower", "model.multi_modal_projector"),
        r"llava-1\.5|llava_1_5|bakllava",
        prompt_bos=True,
    ),
    "llava_next": FamilySpec(
        "llava_next",
        "LlavaNextForConditionalGeneration",
        ("llava_next",),
        LM_ONLY_REGEX,
        "llava_next_mistral",
        templates.LLAVA_NEXT_MISTRAL,
        "</s>",
        "<image>",
        "'<image>\\n' before the text, expanded per any-resolution tile + newline tokens",
        ("model.vision_tower", "model.multi_modal_projector", "model.image_newline"),
        r"llava-v1\.6|llava-next|llava_next",
        prompt_bos=True,
    ),
    "pixtral": FamilySpec(
        "pixtral",
        "LlavaForConditionalGeneration",
        ("llava",),
        LM_ONLY_REGEX,
        "pixtral",
        templates.PIXTRAL,
        "</s>",
        "[IMG]",
        "[IMG] where the content puts it (our samples: before the text), expanded to rows of "
        "[IMG] ending in [IMG_BREAK] / [IMG_END]",
        ("model.vision_tower", "model.multi_modal_projector"),
        r"pixtral",
    ),
}


def family_from_config(config: Any) -> str | None:
    """The family of a transformers config object or a ``config.json`` dict."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    model_type = cfg.get("model_type")
    vision_type = (cfg.get("vision_config") or {}).get("model_type")
    if model_type == "llava" and vision_type == "pixtral":
        return "pixtral"
    for name, spec in FAMILIES.items():
        if model_type in spec.model_types and name != "pixtral":
            return name
    return None


def detect_family(name_or_path_or_config: str | Path | Any) -> str:
    """Family name from a local folder's ``config.json``, a config object, or a hub id."""
    obj = name_or_path_or_config
    if not isinstance(obj, (str, Path)):
        fam = family_from_config(obj)
        if fam is None:
            raise InputError(f"unsupported model_type '{getattr(obj, 'model_type', obj)}'")
        return fam
    path = Path(obj)
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        fam = family_from_config(cfg)
        if fam is None:
            raise InputError(
                f"{path}/config.json: unsupported model_type '{cfg.get('model_type')}'"
                f" (supported families: {sorted(FAMILIES)})"
            )
        return fam
    from .loading import looks_local  # loading imports this module

    if not path.exists() and looks_local(obj):
        raise InputError(f"model folder {path} not found (a hub id is exactly owner/name)")
    for name, spec in FAMILIES.items():
        if re.search(spec.hub_pattern, str(obj), flags=re.IGNORECASE):
            return name
    raise InputError(f"{obj}: cannot tell the model family; pass family= one of {sorted(FAMILIES)}")


def get_family(name: str) -> FamilySpec:
    """The :class:`FamilySpec` of ``name`` or an :class:`InputError` listing the choices."""
    if name not in FAMILIES:
        raise InputError(f"unknown family '{name}' (expected one of {sorted(FAMILIES)})")
    return FAMILIES[name]


# ------------------------------------------------------------------ image-resolution caps
#
# A comic page scan (EmoComics35: 1988 × 3052 px) is 6.1 MP. Without a cap, Qwen2.5-VL's
# processor keeps it at full size: 7,739 image tokens, 94.7 GB of training activations on a 7B
# (measured on an H200, batch 1). Every family gets a default cap near 1 MP, applied to the
# processor when it is loaded (:func:`apply_image_cap`), so training and evaluation see the same
# pixels. ``max_pixels`` means the same thing for every family: an upper bound on the area the
# vision encoder sees per image; each family turns it into its own processor setting.

#: (height, width) of an EmoComics35 page scan: the size the caps are sized against.
PAGE = (3052, 1988)


@dataclass(frozen=True)
class ImageCapRule:
    """How ``max_pixels`` reaches a family's processor, and the family's default."""

    #: "pixels" (Qwen: ``size.longest_edge`` is a pixel count), "longest_edge" (Pixtral: an edge
    #: in px), "pinpoints" (LLaVA-NeXT: any-res grid sizes), "fixed" (LLaVA-1.5 / Mllama: the
    #: architecture fixes the input size).
    kind: str
    #: Cap applied when the curriculum sets none (None: the architecture already bounds it).
    default_max_pixels: int | None
    note: str


IMAGE_CAPS: dict[str, ImageCapRule] = {
    # patch 14 × spatial merge 2 = one token per 28×28 px: 1024 tokens at most (0.80 MP)
    "qwen2_5_vl": ImageCapRule(
        "pixels",
        1024 * 28 * 28,
        "Qwen2VLImageProcessor size.longest_edge = max_pixels; one token "
        "per 28x28 px (patch 14 x merge 2)",
    ),
    # patch 16 × spatial merge 2 = one token per 32×32 px: 1024 tokens at most (1.05 MP); the
    # checkpoint's own limit is 16.8 MP (5,890 tokens for a page)
    "qwen3_vl": ImageCapRule(
        "pixels",
        1024 * 32 * 32,
        "Qwen2VLImageProcessor size.longest_edge = max_pixels; one token per "
        "32x32 px (patch 16 x merge 2)",
    ),
    # Pixtral-12B's own longest_edge is 1024: a page becomes 667 x 1024 px (0.68 MP)
    "pixtral": ImageCapRule(
        "longest_edge",
        1024 * 1024,
        "PixtralImageProcessor size.longest_edge = floor(sqrt(max_pixels)) "
        "rounded down to the patch; one token per 16x16 px + one per row",
    ),
    # the model's pinpoints stop at 672 x 672 (0.45 MP, at most 2,928 tokens): already bounded
    "llava_next": ImageCapRule(
        "pinpoints",
        None,
        "any-res grid: only image_grid_pinpoints of area <= max_pixels "
        "are kept, in the processor and the model config alike",
    ),
    "llava": ImageCapRule("fixed", None, "CLIP 336 x 336 crop: always 576 tokens"),
    # 4 tiles of 560 x 560 (1.25 MP) reach the LM through cross-attention (1 token in the
    # sequence); fewer tiles would index aspect-ratio embeddings the model was not built with
    "mllama": ImageCapRule(
        "fixed",
        None,
        "at most max_image_tiles (4) tiles of 560 x 560 px, through "
        "cross-attention (1 image token in the text sequence)",
    ),
}


def _pixels_limit(processor: Any, family: str) -> int:
    """The largest image area the family's processor, as configured now, lets through."""
    ip = processor.image_processor
    kind = IMAGE_CAPS[family].kind
    if kind == "pixels":
        return int(ip.size["longest_edge"])
    if kind == "longest_edge":
        return int(ip.size["longest_edge"]) ** 2
    if kind == "pinpoints":
        return max(h * w for h, w in ip.image_grid_pinpoints)
    if family == "mllama":
        return int(ip.max_image_tiles) * int(ip.size["height"]) * int(ip.size["width"])
    return int(ip.crop_size["height"]) * int(ip.crop_size["width"])


def _set_size(ip: Any, **values: int) -> None:
    size = {k: v for k, v in dict(ip.size).items() if v is not None}
    size.update(values)
    ip.size = size


def apply_image_cap(
    processor: Any,
    family: str,
    max_pixels: int | None = None,
    model_config: Any = None,
    where: str = "max_pixels",
) -> dict[str, Any]:
    """Cap the image resolution of a loaded processor in place; return what was resolved.

    ``max_pixels`` None applies the family default (:data:`IMAGE_CAPS`), but never above the
    checkpoint's own limit (a tiny test model keeps its small one). An explicit value is set as
    given. LLaVA-NeXT's pinpoints are also written into ``model_config`` (the model computes its
    feature layout from them). A cap the architecture cannot honour (below LLaVA-1.5's crop, or
    Mllama's tiles) is an :class:`InputError` naming ``where``.
    """
    rule = IMAGE_CAPS[family]
    ip = processor.image_processor
    before = _pixels_limit(processor, family)
    explicit = max_pixels is not None
    if explicit and max_pixels < 1:
        raise InputError(f"{where}: must be a positive pixel count, got {max_pixels}")
    lowers = rule.default_max_pixels is not None and rule.default_max_pixels < before
    cap = max_pixels if explicit else (rule.default_max_pixels if lowers else None)
    if cap is not None and rule.kind == "pixels":
        _set_size(
            ip, longest_edge=int(cap), shortest_edge=min(int(ip.size["shortest_edge"]), int(cap))
        )
    elif cap is not None and rule.kind == "longest_edge":
        patch = _patch(ip)
        edge = int(math.isqrt(int(cap)) // patch * patch)
        if edge < patch:
            raise InputError(f"{where}: {cap} px is below one {patch}x{patch} patch")
        _set_size(ip, longest_edge=edge)
    elif cap is not None and rule.kind == "pinpoints":
        kept = [list(p) for p in ip.image_grid_pinpoints if p[0] * p[1] <= cap]
        if not kept:
            smallest = min(p[0] * p[1] for p in ip.image_grid_pinpoints)
            raise InputError(
                f"{where}: {cap} px is below LLaVA-NeXT's smallest grid ({smallest} px)"
            )
        ip.image_grid_pinpoints = kept
        if model_config is not None:
            model_config.image_grid_pinpoints = kept
    elif cap is not None and cap < before:  # "fixed": the architecture sets the size
        raise InputError(
            f"{where}: {family} cannot see fewer than {before} px per image "
            f"({rule.note}); raise it or drop it for this family"
        )
    return {
        "family": family,
        "max_pixels": max_pixels,
        "source": "explicit" if explicit else "family default" if lowers else "checkpoint",
        "pixels_limit": _pixels_limit(processor, family),
        "settings": _settings(ip, family),
        "page_tokens": image_tokens(processor, family, *PAGE),
    }


def _patch(ip: Any) -> int:
    p = ip.patch_size
    return int(p["height"] if isinstance(p, dict) else p)


def _settings(ip: Any, family: str) -> dict[str, Any]:
    """The processor settings the cap resolved to (recorded in the stage's emomerge.json)."""
    kind = IMAGE_CAPS[family].kind
    if kind == "pixels":
        return {
            "min_pixels": int(ip.size["shortest_edge"]),
            "max_pixels": int(ip.size["longest_edge"]),
            "patch_size": _patch(ip),
            "merge_size": int(ip.merge_size),
        }
    if kind == "longest_edge":
        return {"longest_edge": int(ip.size["longest_edge"]), "patch_size": _patch(ip)}
    if kind == "pinpoints":
        return {"image_grid_pinpoints": [list(p) for p in ip.image_grid_pinpoints]}
    if family == "mllama":
        return {"max_image_tiles": int(ip.max_image_tiles), "tile": int(ip.size["height"])}
    return {"crop_size": [int(ip.crop_size["height"]), int(ip.crop_size["width"])]}


def image_tokens(processor: Any, family: str, height: int, width: int) -> int:
    """Image tokens one ``height × width`` image adds to the text sequence (no weights needed).

    The processors' own arithmetic; Mllama's image enters through cross-attention, so its text
    sequence holds one ``<|image|>`` token (:func:`vision_tokens` counts the tiles' tokens).
    """
    ip = processor.image_processor
    kind = IMAGE_CAPS[family].kind
    if kind == "pixels":
        return ip.get_number_of_image_patches(height, width, {}) // int(ip.merge_size) ** 2
    if kind == "longest_edge":
        from transformers.models.pixtral.image_processing_pixtral import (
            get_resize_output_image_size,
        )

        step = int(processor.patch_size) * int(getattr(processor, "spatial_merge_size", 1))
        edge = int(ip.size["longest_edge"])
        h, w = get_resize_output_image_size(
            np.zeros((height, width, 3)), size=(edge, edge), patch_size=(step, step)
        )
        return (h // step) * (w // step + 1)  # a [IMG_BREAK] / [IMG_END] closes every row
    if family == "mllama":
        return 1
    drop_cls = 1 if processor.vision_feature_select_strategy == "default" else 0
    if kind == "pinpoints":
        crop = ip.crop_size["height"], ip.crop_size["width"]
        return processor._get_number_of_features(height, width, *crop) - drop_cls
    side = int(ip.crop_size["height"]) // int(processor.patch_size)
    return side * side + int(processor.num_additional_image_tokens) - drop_cls


def vision_tokens(processor: Any, family: str, height: int, width: int) -> int:
    """Tokens the vision encoder outputs for one image (Mllama: tiles × (patches + CLS))."""
    if family != "mllama":
        return image_tokens(processor, family, height, width)
    from transformers.models.mllama.image_processing_mllama import get_optimal_tiled_canvas

    ip = processor.image_processor
    tile = int(ip.size["height"])
    h, w = get_optimal_tiled_canvas(height, width, int(ip.max_image_tiles), tile)
    patches = (tile // 14) ** 2  # Mllama's vision patch is 14 px
    return int(h // tile) * int(w // tile) * (patches + 1)
