"""Module names across transformers versions: one canonical layout, converted in and out.

The same VLM is named differently by different transformers versions (docs/DESIGN.md, Facts):

- ``new`` (transformers ≥ 4.52 in memory, Qwen3-VL on disk): ``model.language_model.layers.N``,
  ``model.visual``, ``model.vision_tower``, ``model.multi_modal_projector``, ``lm_head``.
- ``qwen-legacy`` (Qwen2/2.5-VL before 4.52, and their ``save_pretrained`` output today):
  ``model.layers.N``, ``visual``, ``lm_head``.
- ``llava-legacy`` (LLaVA, LLaVA-NeXT, Mllama, Pixtral before 4.52 and on disk):
  ``language_model.model.layers.N``, ``language_model.lm_head``, ``vision_tower``/``vision_model``,
  ``multi_modal_projector``.
- ``text``: a plain causal LM (``model.layers.N``); nothing to convert.

Internally every module path is *canonical* (the ``new`` layout for VLMs, unchanged for text
models), so adapters saved by different versions line up. Outputs are written back in a chosen
layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

LAYOUTS = ("new", "qwen-legacy", "llava-legacy", "text")

PEFT_PREFIX = "base_model.model."

# VLM component roots in the new layout and their legacy spellings.
_NEW_ROOTS = (
    "model.language_model.",
    "model.visual.",
    "model.vision_tower.",
    "model.vision_model.",
    "model.multi_modal_projector.",
    "model.image_newline",
)
_LLAVA_LEGACY_ROOTS = {
    "language_model.model.": "model.language_model.",
    "language_model.lm_head.": "lm_head.",
    "vision_tower.": "model.vision_tower.",
    "vision_model.": "model.vision_model.",
    "multi_modal_projector.": "model.multi_modal_projector.",
    "image_newline": "model.image_newline",
}
_QWEN_LEGACY_ROOTS = {"visual.": "model.visual."}

# model_type values (config.json) of the VLM families we know.
VLM_MODEL_TYPES = {
    "qwen2_vl": "qwen-legacy",
    "qwen2_5_vl": "qwen-legacy",
    "qwen3_vl": "new",
    "qwen3_vl_moe": "new",
    "llava": "llava-legacy",
    "llava_next": "llava-legacy",
    "mllama": "llava-legacy",
    "pixtral": "llava-legacy",
    "mistral3": "llava-legacy",
}
_VLM_NAME_HINT = re.compile(r"(-VL\b|-VL-|vl[-_]|vision|llava|pixtral|mllama)", re.IGNORECASE)


def strip_peft_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def detect_layout(paths: Iterable[str]) -> str:
    """Layout of a set of module paths (PEFT prefix stripped); ``plain`` when it cannot tell.

    ``plain`` (only ``model.layers.N`` / ``lm_head``) is a text model or a legacy Qwen-VL adapter
    restricted to its language model: the caller decides with the base model's identity.
    """
    paths = list(paths)
    if any(p.startswith(_NEW_ROOTS) for p in paths):
        return "new"
    if any(p.startswith(tuple(_LLAVA_LEGACY_ROOTS)) for p in paths):
        return "llava-legacy"
    if any(p.startswith(tuple(_QWEN_LEGACY_ROOTS)) for p in paths):
        return "qwen-legacy"
    return "plain"


def name_suggests_vlm(name_or_path: str | None) -> bool:
    return bool(name_or_path) and bool(_VLM_NAME_HINT.search(name_or_path or ""))


def to_canonical(path: str, layout: str) -> str:
    """Canonical (new-layout) module path of ``path`` written in ``layout``."""
    if layout in ("new", "text", "plain"):
        return path
    if layout == "llava-legacy":
        for old, new in _LLAVA_LEGACY_ROOTS.items():
            if path.startswith(old):
                return new + path[len(old) :]
        return path
    if layout == "qwen-legacy":
        for old, new in _QWEN_LEGACY_ROOTS.items():
            if path.startswith(old):
                return new + path[len(old) :]
        if path.startswith("model.") and not path.startswith(_NEW_ROOTS):
            return "model.language_model." + path[len("model.") :]
        return path
    raise ValueError(f"unknown layout {layout!r}")


def from_canonical(path: str, layout: str) -> str:
    """Write a canonical module path in ``layout`` (inverse of :func:`to_canonical`)."""
    if layout in ("new", "text", "plain"):
        return path
    if layout == "llava-legacy":
        for old, new in _LLAVA_LEGACY_ROOTS.items():
            if path.startswith(new):
                return old + path[len(new) :]
        return path
    if layout == "qwen-legacy":
        if path.startswith("model.language_model."):
            return "model." + path[len("model.language_model.") :]
        for old, new in _QWEN_LEGACY_ROOTS.items():
            if path.startswith(new):
                return old + path[len(new) :]
        return path
    raise ValueError(f"unknown layout {layout!r}")


def resolve_plain(layouts: list[str], *, vlm_hint: str | None) -> list[str]:
    """Decide what ``plain`` means for each adapter of one merge.

    ``vlm_hint`` is the legacy flavour of the base model's family when known (from a base
    config's ``model_type``), ``"qwen-legacy"`` when a name only suggests a VLM, else ``None``.
    A ``plain`` adapter beside a VLM-layout one is a legacy Qwen-VL adapter (the only VLM whose
    legacy language model lives at ``model.layers``).
    """
    vlm = vlm_hint is not None or any(lay != "plain" for lay in layouts)
    if not vlm:
        return ["text"] * len(layouts)
    return ["qwen-legacy" if lay == "plain" else lay for lay in layouts]
