"""One row per supported VLM family: model class, LoRA targets, chat template, image placement.

LoRA targets are a regex over module names that only matches the *language model*'s attention and
MLP projections (``model.language_model.layers.N...`` in transformers ≥ 5 naming): the vision
tower and the projector stay frozen, as in LLaMA-Factory's defaults (``freeze_vision_tower``,
``freeze_multi_modal_projector``). A plain list such as ``["q_proj", ..., "down_proj"]`` would also
wrap vision-tower MLPs (FACTS.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


FAMILIES: dict[str, FamilySpec] = {
    "qwen2_5_vl": FamilySpec(
        "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", ("qwen2_5_vl",), LM_ONLY_REGEX,
        "qwen2_vl", templates.QWEN2_5_VL, "<|im_end|>", "<|image_pad|>",
        "<|vision_start|><|image_pad|><|vision_end|> inline in the user turn, expanded to one "
        "pad per merged 2x2 patch group", ("model.visual",), r"qwen2\.5-vl|qwen2_5_vl",
    ),
    "qwen3_vl": FamilySpec(
        "qwen3_vl", "Qwen3VLForConditionalGeneration", ("qwen3_vl",), LM_ONLY_REGEX,
        "qwen3_vl_nothink", templates.QWEN3_VL, "<|im_end|>", "<|image_pad|>",
        "<|vision_start|><|image_pad|><|vision_end|> inline; deepstack features also feed the "
        "first decoder layers", ("model.visual",), r"qwen3-vl|qwen3_vl",
    ),
    "mllama": FamilySpec(
        "mllama", "MllamaForConditionalGeneration", ("mllama",), LM_ONLY_REGEX,
        "mllama", templates.MLLAMA, "<|eot_id|>", "<|image|>",
        "<|image|> token; image tiles enter through cross-attention layers",
        ("model.vision_model", "model.multi_modal_projector"), r"llama-3\.2-.*vision|mllama",
    ),
    "llava": FamilySpec(
        "llava", "LlavaForConditionalGeneration", ("llava",), LM_ONLY_REGEX,
        "llava", templates.LLAVA, "</s>", "<image>",
        "'<image>\\n' before the text, expanded to one token per CLIP patch",
        ("model.vision_tower", "model.multi_modal_projector"), r"llava-1\.5|llava_1_5|bakllava",
    ),
    "llava_next": FamilySpec(
        "llava_next", "LlavaNextForConditionalGeneration", ("llava_next",), LM_ONLY_REGEX,
        "llava_next_mistral", templates.LLAVA_NEXT_MISTRAL, "</s>", "<image>",
        "'<image>\\n' before the text, expanded per any-resolution tile + newline tokens",
        ("model.vision_tower", "model.multi_modal_projector", "model.image_newline"),
        r"llava-v1\.6|llava-next|llava_next",
    ),
    "pixtral": FamilySpec(
        "pixtral", "LlavaForConditionalGeneration", ("llava",), LM_ONLY_REGEX,
        "pixtral", templates.PIXTRAL, "</s>", "[IMG]",
        "[IMG] after the text, expanded to rows of [IMG] ending in [IMG_BREAK] / [IMG_END]",
        ("model.vision_tower", "model.multi_modal_projector"), r"pixtral",
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
            raise InputError(f"{path}/config.json: unsupported model_type '{cfg.get('model_type')}'"
                             f" (supported families: {sorted(FAMILIES)})")
        return fam
    from .models import looks_local  # models imports this module

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
