"""Record or show the lineage of a stage adapter trained elsewhere (``emomerge lineage``).

Training writes ``emomerge.json`` beside every stage it trains. An adapter trained by another
tool has none, and nothing in its PEFT files says whether it continued another adapter's LoRA
or was trained on top of a folded one: merged as it is, it is an independent update of the
base. ``set_lineage`` writes the same fields training writes (``lineage.mode``, ``lineage.parent``
relative to the adapter, ``lineage.parent_sha256`` of the parent's weights file), marked
``lineage_recorded_by`` so a lineage written by training is never replaced without ``force``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from emomerge import __version__

from .adapters import load_adapter
from .atomic import atomic_file
from .config import validate
from .errors import MergeInputError
from .lineage import (
    LINEAGE_FILE,
    BaseIdentity,
    Lineage,
    StageMetadata,
    read_stage_metadata,
    resolve_parent,
)

#: the ``lineage_recorded_by`` mark of a lineage written by ``emomerge lineage set``
RECORDED_BY = "emomerge lineage set"
MODES = ("continued", "stacked")


def _raw(adapter: Path) -> dict | None:
    """The folder's ``emomerge.json`` (None when absent; one line when unreadable)."""
    from .updates import read_manifest  # the same file (LINEAGE_FILE == MANIFEST)

    return read_manifest(adapter)


def set_lineage(
    adapter: str | Path,
    *,
    mode: str,
    parent: str | Path | None = None,
    force: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Write ``adapter/emomerge.json`` saying it was trained from ``parent`` in ``mode``
    (``parent`` None: a first stage trained on the base). Returns the written document.

    Refused: a folder that is not a LoRA adapter, a missing parent, the adapter as its own
    ancestor, a merge output (its ``emomerge.json`` is the merge manifest), and a lineage
    recorded by training unless ``force`` (then only the lineage fields change).
    """
    adapter = Path(adapter)
    if mode not in MODES:
        raise MergeInputError(f"--mode must be continued or stacked, got {mode!r}")
    lora = load_adapter(adapter, allow_pickle=allow_pickle)  # a real adapter, readable
    raw = _raw(adapter)
    where = adapter / LINEAGE_FILE
    if raw is not None and raw.get("kind", "stage_adapter") != "stage_adapter":
        raise MergeInputError(
            f"{where}: kind '{raw.get('kind')}' (a merge/run output's manifest), not a training "
            "stage; it has no lineage to set"
        )
    if raw is not None and raw.get("lineage_recorded_by") != RECORDED_BY and not force:
        stage = f" (stage {raw.get('stage')})" if raw.get("stage") else ""
        raise MergeInputError(
            f"{where}: lineage recorded by training{stage}; pass --force to replace it"
        )
    lineage = Lineage(mode=mode)
    if parent is not None:
        parent_dir = Path(parent)
        if not parent_dir.is_dir():
            raise MergeInputError(f"{parent}: --parent is not an adapter folder")
        if parent_dir.resolve() == adapter.resolve():
            raise MergeInputError(f"{parent}: --parent is the adapter itself")
        parent_lora = load_adapter(parent_dir, allow_pickle=allow_pickle)
        _check_no_cycle(adapter.resolve(), parent_dir.resolve())
        lineage = Lineage(
            mode=mode,
            parent=os.path.relpath(parent_dir.resolve(), adapter.resolve()),
            parent_sha256=parent_lora.sha256,
        )
    if raw is not None and raw.get("kind", "stage_adapter") == "stage_adapter":
        doc: dict[str, Any] = dict(raw)
        previous = doc.get("lineage")
        doc["lineage"] = lineage.model_dump(mode="json")
        if previous != doc["lineage"] and doc.get("lineage_recorded_by") != RECORDED_BY:
            doc["lineage_replaced"] = previous  # what training had recorded (--force)
    else:
        base = lora.config.get("base_model_name_or_path")
        meta = StageMetadata(
            emomerge_version=__version__,
            stage=adapter.resolve().name,
            lineage=lineage,
            base=BaseIdentity(name_or_path=base) if base else None,
        )
        doc = meta.model_dump(mode="json", exclude_none=True)
        doc["lineage"] = lineage.model_dump(mode="json")
    doc["lineage_recorded_by"] = RECORDED_BY
    doc["lineage_recorded"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    validate(StageMetadata, doc, where)  # what readers will accept (DESIGN.md, Configuration)
    with atomic_file(where) as fh:
        fh.write(json.dumps(doc, indent=2) + "\n")
    return doc


def _check_no_cycle(adapter: Path, parent: Path) -> None:
    seen, current = {parent}, parent
    while True:
        if current == adapter:
            raise MergeInputError(f"{parent}: --parent descends from {adapter}; lineage would loop")
        meta = read_stage_metadata(current)
        nxt = resolve_parent(current, meta)
        if nxt is None or nxt in seen or not nxt.is_dir():
            return
        seen.add(nxt)
        current = nxt


def show_lineage(adapter: str | Path) -> dict:
    """The lineage of ``adapter`` and of each ancestor up to the base: mode, parent, whether
    the parent is on disk and still has the recorded sha256, and who recorded it."""
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise MergeInputError(f"{adapter}: not an adapter folder")
    chain: list[dict] = []
    current: Path | None = adapter
    seen: set[Path] = set()
    while current is not None and current.resolve() not in seen:
        seen.add(current.resolve())
        raw = _raw(current)
        meta = read_stage_metadata(current)
        entry: dict[str, Any] = {"adapter": str(current), "stage": meta.stage if meta else None}
        if raw is not None and raw.get("kind", "stage_adapter") != "stage_adapter":
            entry.update(
                recorded_by=None,
                mode=None,
                parent=None,
                note=f"kind '{raw.get('kind')}': a merge/run output, no lineage",
            )
            chain.append(entry)
            break
        if meta is None:
            entry.update(
                recorded_by=None,
                mode=None,
                parent=None,
                note="no emomerge.json: merged as an independent update of the base",
            )
            chain.append(entry)
            break
        parent = resolve_parent(current, meta)
        entry.update(
            recorded_by=(raw or {}).get("lineage_recorded_by") or "training",
            mode=meta.lineage.mode,
            parent=meta.lineage.parent,
            parent_sha256=meta.lineage.parent_sha256,
        )
        if parent is not None:
            entry["parent_on_disk"] = parent.is_dir()
            if parent.is_dir() and meta.lineage.parent_sha256:
                entry["parent_sha256_ok"] = (
                    load_adapter(parent).sha256 == meta.lineage.parent_sha256
                )
        chain.append(entry)
        current = parent if parent is not None and parent.is_dir() else None
    return {"adapter": str(adapter), "chain": chain}
