"""Lineage metadata: the ``emomerge.json`` written beside every stage adapter.

The training module writes it, the merging core reads it to turn stage adapters into task
vectors relative to the chosen reference (docs/DESIGN.md, Words: "Lineage" and "Task vector").

- ``continued``: the same LoRA kept training, so the adapter's ΔW is cumulative from the base.
- ``stacked``: the parent adapter was folded into the base and a fresh LoRA trained on top, so the
  adapter's ΔW is relative to that folded model (base + the parent chain).

An adapter without ``emomerge.json`` (or with ``parent: null``) is an independent update of the
base. Merged outputs carry a *manifest* in the same file name with ``kind: "merge"``; it holds no
lineage and is never treated as a chain link.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .config import Strict, load_json, validate

LINEAGE_FILE = "emomerge.json"


class BaseIdentity(BaseModel):
    """Which base model an adapter was trained on."""

    model_config = ConfigDict(extra="allow")

    name_or_path: str
    #: A content hash of the base (sha256 over its config and weight index), when known.
    hash: str | None = None
    family: str | None = None


class Lineage(Strict):
    mode: Literal["continued", "stacked"] | None = None
    #: The parent stage adapter's folder, relative to this adapter's folder (or absolute).
    parent: str | None = None
    #: sha256 of the parent's adapter weights file, to detect a parent swapped behind our back.
    parent_sha256: str | None = None


class StageMetadata(BaseModel):
    """The ``emomerge.json`` of a stage adapter (``kind: "stage_adapter"``)."""

    model_config = ConfigDict(extra="allow")

    kind: Literal["stage_adapter"] = "stage_adapter"
    emomerge_version: str | None = None
    stage: str | None = None
    stage_index: int | None = None
    lineage: Lineage = Field(default_factory=Lineage)
    base: BaseIdentity | None = None
    dataset: dict[str, Any] | None = None
    seed: int | None = None
    steps: int | None = None
    final_loss: float | None = None


def read_stage_metadata(adapter_dir: str | Path) -> StageMetadata | None:
    """Read ``emomerge.json`` of a stage adapter; ``None`` when absent or a merge manifest.

    Read and refused as every settings file is (DESIGN.md, Configuration): the file is written
    by training or ``emomerge lineage set``, but may be edited or copied by hand."""
    path = Path(adapter_dir) / LINEAGE_FILE
    if not path.is_file():
        return None
    raw = load_json(path, what="lineage file")
    if raw.get("kind", "stage_adapter") != "stage_adapter":
        return None
    return validate(StageMetadata, raw, path)


def write_stage_metadata(adapter_dir: str | Path, meta: StageMetadata) -> Path:
    """Write ``emomerge.json`` into ``adapter_dir`` (the training side calls this)."""
    path = Path(adapter_dir) / LINEAGE_FILE
    path.write_text(json.dumps(meta.model_dump(mode="json"), indent=2, sort_keys=False) + "\n")
    return path


def resolve_parent(adapter_dir: str | Path, meta: StageMetadata | None) -> Path | None:
    """The parent adapter folder named by the lineage, resolved against ``adapter_dir``."""
    if meta is None or not meta.lineage.parent:
        return None
    parent = Path(meta.lineage.parent)
    if not parent.is_absolute():
        parent = Path(adapter_dir) / parent
    return parent.resolve()
