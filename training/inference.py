"""Loading a stage adapter the way it was trained: following its lineage for stacked chains.

A ``stacked`` stage adapter is a ΔW relative to the base with every earlier stage folded in, so
applying it to the bare base gives a model nobody trained. Evaluation loads stage adapters here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emomerge.merging.errors import InputError
from emomerge.merging.lineage import read_stage_metadata, resolve_parent

from .models.loading import load_vlm


def lineage_chain(adapter_dir: str | Path) -> list[Path]:
    """The adapter folders to apply, oldest first: the stacked ancestors, then ``adapter_dir``."""
    chain = [Path(adapter_dir).resolve()]
    meta = read_stage_metadata(chain[0])
    while meta is not None and meta.lineage.mode == "stacked":
        parent = resolve_parent(chain[0], meta)
        if parent is None:
            break
        if parent in chain:
            raise InputError(f"{adapter_dir}: lineage loops back to {parent}")
        if not parent.is_dir():
            raise InputError(f"{chain[0]}: stacked parent {parent} not found")
        chain.insert(0, parent)
        meta = read_stage_metadata(parent)
    return chain


def load_stage_model(
    adapter_dir: str | Path,
    base: str | Path | None = None,
    family: str | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    merge: bool = False,
) -> tuple[Any, Any, str]:
    """``(model, processor, family)`` for a stage adapter, with stacked ancestors folded in.

    ``base`` defaults to the base recorded in the adapter's ``emomerge.json``. With ``merge`` the
    adapter itself is folded too (a plain transformers model, faster to run).
    """
    from peft import PeftModel

    meta = read_stage_metadata(adapter_dir)
    if base is None:
        if meta is None or meta.base is None:
            raise InputError(f"{adapter_dir}: no emomerge.json base; pass base=")
        base = meta.base.name_or_path
    family = family or (meta.base.family if meta and meta.base else None)
    model, processor, family = load_vlm(base, family, dtype, device)
    *ancestors, last = lineage_chain(adapter_dir)
    for folder in ancestors:
        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    model = PeftModel.from_pretrained(model, str(last))
    if merge:
        model = model.merge_and_unload()
    model.eval()
    return model, processor, family
