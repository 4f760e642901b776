"""Is the ``--base`` folder the model the adapters were trained on?

Shapes alone do not tell: tiny (and some real) Qwen2.5-VL and LLaVA language models have the
same widths, so a Qwen2.5-VL adapter folds into a LLaVA base without a complaint and the output
is a broken model. The evidence we compare, strongest first, per adapter (inputs and ancestors):

1. the base hash training recorded (``emomerge.json`` ``base.hash``, the base's
   ``Checkpoint.fingerprint``): equal means the same base, nothing more to check;
2. the model family: ``base.family`` from ``emomerge.json``, else the ``config.json`` of the
   recorded base when that is a local folder, else the family a hub id names
   (``Qwen/Qwen2.5-VL-7B-Instruct`` → ``qwen2_5_vl``) — against the base's ``model_type``;
3. the adapter's own key layout: LLaVA-style ``language_model.model.*`` keys cannot belong to a
   Qwen-VL base and the other way round.

No evidence (a bare ``base_model_name_or_path`` we cannot place) is no objection. The families
are mirrored from ``training.models.families`` (merging never imports the training side).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .checkpoint import Checkpoint
from .errors import MergeInputError
from .names import VLM_MODEL_TYPES

#: family → the config ``model_type`` its checkpoints carry (pixtral loads as llava)
_FAMILY_MODEL_TYPE = {"pixtral": "llava"}
#: hub-id patterns that name a family (training.models.families' ``hub_pattern``), most
#: specific first
_HUB_PATTERNS = (
    ("qwen2_5_vl", r"qwen2\.5-vl|qwen2_5_vl"),
    ("qwen3_vl", r"qwen3-vl|qwen3_vl"),
    ("qwen2_vl", r"qwen2-vl|qwen2_vl"),
    ("mllama", r"llama-3\.2-.*vision|mllama"),
    ("llava_next", r"llava-v1\.6|llava-next|llava_next"),
    ("llava", r"llava-1\.5|llava_1_5|bakllava|llava"),
    ("pixtral", r"pixtral"),
)


def _model_type(family: str | None) -> str | None:
    return None if family is None else _FAMILY_MODEL_TYPE.get(family, family)


def claimed_model_type(adapter) -> tuple[str | None, str]:
    """The base ``model_type`` an adapter says it was trained on, and where that comes from."""
    meta = adapter.metadata
    if meta is not None and meta.base is not None and meta.base.family:
        return _model_type(meta.base.family), f"emomerge.json base.family '{meta.base.family}'"
    name = adapter.base_name
    if not name:
        return None, ""
    cfg = Path(name) / "config.json"
    if cfg.is_file():
        try:
            model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            model_type = None
        if model_type:
            return model_type, f"base '{name}' (model_type {model_type})"
    for family, pattern in _HUB_PATTERNS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return _model_type(family), f"base '{name}'"
    return None, ""


def _layout_conflict(adapter, base_flavour: str | None) -> bool:
    """LLaVA-legacy keys on a Qwen-VL base or Qwen-legacy vision keys on a LLaVA-style base."""
    stored = adapter.stored_layout
    if base_flavour is None or stored in ("plain", "new", "text"):
        return False
    return stored != base_flavour


def check_base_identity(pool, ckpt: Checkpoint) -> None:
    """Refuse a base checkpoint the adapters were not trained on (see the module docstring)."""
    base_type = ckpt.model_type
    fingerprint = None
    for adapter in pool:
        meta = adapter.metadata
        if meta is not None and meta.base is not None and meta.base.hash:
            if fingerprint is None:
                fingerprint = ckpt.fingerprint()
            if meta.base.hash == fingerprint:
                continue
        claimed, source = claimed_model_type(adapter)
        if claimed is not None and base_type is not None and claimed != base_type:
            raise MergeInputError(
                f"{adapter.path}: trained on a {claimed} model ({source}) but the base {ckpt.path} "
                f"is a {base_type} model (pass --allow-different-bases if they are the same weights)"
            )
        if _layout_conflict(adapter, VLM_MODEL_TYPES.get(base_type or "")):
            raise MergeInputError(
                f"{adapter.path}: its keys are in the {adapter.stored_layout} layout but the base "
                f"{ckpt.path} is a {base_type} model (pass --allow-different-bases if they are the same weights)"
            )
