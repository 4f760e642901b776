"""What is evaluated: the base, stage adapters and merged adapters, read from their folders.

A variant folder is a PEFT LoRA folder. Its ``emomerge.json`` says what it is:
- ``kind: "stage_adapter"`` (training): a stage; lineage ``stacked`` means its update sits on top
  of the folded parent chain, so the parents are activated together with it (LoRA updates add,
  so activating A and B at once equals folding A and then applying B);
- ``kind: "merge"`` (merging): a merged variant; method, params and input adapters fill the
  leaderboard's method columns;
- no file: a stage of unknown lineage. The row says ``lineage=unknown`` rather than guessing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from emomerge.merging.config import load_json
from emomerge.merging.errors import InputError
from emomerge.merging.lineage import LINEAGE_FILE, read_stage_metadata, resolve_parent
from emomerge.merging.updates import is_full_folder, is_refactorised, read_manifest

from .inplace import FULL, STREAMED

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


@dataclass
class Variant:
    """One evaluated model: the base alone or the base with adapter folders activated."""

    name: str
    kind: str  # "base" | "stage" | "merged"
    path: Path | None = None
    #: Adapter folders active together, root of a stacked chain first (empty for the base).
    chain: list[Path] = field(default_factory=list)
    stage_index: int | None = None
    lineage: str = ""
    method: str = ""
    method_params: str = ""
    stages_merged: str = ""
    #: sha256 over the chain's adapter files (the base identity is added by the runner).
    content_hash: str = ""
    #: How the variant's weights are represented when scored: "exact" (the base, PEFT adapters
    #: of exact low-rank updates, or a merge's exact weights written in place) or "lowrank" (a
    #: re-factorised adapter: ``represented_rank`` and the manifest's relative errors).
    representation: str = "exact"
    represented_rank: int | None = None
    lowrank_error_mean: float | None = None
    lowrank_error_max: float | None = None
    #: Where exact weights written in place come from (``inplace.STREAMED`` / ``inplace.FULL``);
    #: None: the chain's adapters (or nothing, for the base) are used as they are.
    exact: str | None = None
    #: Why a requested exact evaluation fell back to the low-rank adapter ("" when it did not).
    note: str = ""


def is_adapter_dir(path: Path) -> bool:
    """A PEFT adapter folder (has adapter_config.json)."""
    return (path / "adapter_config.json").is_file()


def is_variant_dir(path: Path) -> bool:
    """A folder that can be evaluated: a PEFT adapter or a full (``--output full``) checkpoint."""
    return is_adapter_dir(path) or is_full_folder(path)


def _merge_fields(raw: dict, manifest: Path) -> dict:
    for key in ("method", "params", "adapters"):
        if key not in raw:
            raise InputError(f"{manifest}: key '{key}' missing from the merge manifest")
    inputs = [
        a.get("stage") or Path(str(a.get("path", "?"))).name
        if isinstance(a, dict)
        else Path(str(a)).name
        for a in raw["adapters"]
    ]
    return {
        "method": str(raw["method"]),
        "method_params": json.dumps(raw["params"], sort_keys=True),
        "stages_merged": ";".join(str(i) for i in inputs),
    }


def _config_sha256(entry: object) -> str | None:
    """sha256 of an input's adapter_config.json as it is now (its LoRA scale lives there, so an
    edit changes the recomputed merge even when the weights file is unchanged)."""
    if not isinstance(entry, dict) or "path" not in entry:
        return None
    path = Path(str(entry["path"])) / "adapter_config.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _manifest_hash(raw: dict, how: str) -> str:
    # what decides the recomputed merged weights: inputs and lineage ancestors by the sha256 of
    # their weights and configs, method, parameters as given (re-resolved by today's code),
    # seed, dtypes, what was allowed, and the merge code's semantics version — not when or how
    # fast the merge ran
    from emomerge.merging.updates import MERGE_SEMANTICS

    keep = {
        k: raw.get(k)
        for k in (
            "method",
            "params",
            "params_given",
            "seed",
            "reference",
            "dtype",
            "out_dtype",
            "rank",
            "allow_lineage_mismatch",
            "lineage_assumed",
            "lineage_missing",
        )
    }
    for key in ("adapters", "ancestors"):
        keep[key] = [
            [a.get("sha256"), _config_sha256(a)] if isinstance(a, dict) else str(a)
            for a in raw.get(key) or []
        ]
    keep["how"], keep["semantics"] = how, MERGE_SEMANTICS
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def _exact_inputs_problem(raw: dict) -> str:
    """Why the merge cannot be recomputed from its inputs ("" when it can)."""
    from emomerge.merging.adapters import sha256_file

    for a in raw.get("adapters", []):
        if not isinstance(a, dict) or "path" not in a or "sha256" not in a:
            return "its manifest does not record its inputs"
        weights = Path(a["path"]) / "adapter_model.safetensors"
        if not weights.is_file():
            return f"input adapter {a['path']} is gone"
        if sha256_file(weights) != a["sha256"]:
            return f"input adapter {a['path']} changed since the merge"
        if a.get("config_sha256") and _config_sha256(a) != a["config_sha256"]:
            return f"input adapter {a['path']}'s adapter_config.json changed since the merge"
    return ""


def _full_variant(path: Path, name: str) -> Variant:
    """A ``--output full`` folder (or any full checkpoint of the base's architecture)."""
    from emomerge.merging.checkpoint import Checkpoint

    raw = read_manifest(path)
    v = Variant(
        name,
        "merged" if raw and raw.get("kind") == "merge" else "full",
        path,
        [],
        lineage="merge" if raw else "full",
        exact=FULL,
    )
    if raw and raw.get("kind") == "merge":
        fields = _merge_fields(raw, path / LINEAGE_FILE)
        v.method, v.method_params, v.stages_merged = (
            fields["method"],
            fields["method_params"],
            fields["stages_merged"],
        )
    # content-bound and cheap: config, headers and samples of every weight file
    v.content_hash = hashlib.sha256(("full:" + Checkpoint(path).fingerprint()).encode()).hexdigest()
    return v


def files_sha256(folders: list[Path]) -> str:
    """sha256 over the adapter files of ``folders``, in order (names and bytes)."""
    h = hashlib.sha256()
    for folder in folders:
        for name in ADAPTER_FILES:
            f = folder / name
            if f.is_file():
                h.update(name.encode())
                with f.open("rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    return load_json(path)  # DESIGN.md, Configuration


def _stage_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[Path]:
    meta = read_stage_metadata(path)
    if meta is None or meta.lineage.mode != "stacked":
        return [path]
    parent = resolve_parent(path, meta)
    if parent is None:
        return [path]
    if parent in seen or not is_adapter_dir(parent):
        raise InputError(
            f"{path / LINEAGE_FILE}: key 'lineage.parent': {parent} is not a usable "
            "adapter folder (stacked lineage needs its parent to evaluate)"
        )
    return _stage_chain(parent, seen + (path,)) + [path]


def variant_from_dir(path: str | Path, name: str | None = None, *, exact: bool = True) -> Variant:
    """Describe one adapter folder or full-output folder as a :class:`Variant`.

    A merge written as an adapter whose factors approximate it (a re-factorised sparse merge) is
    evaluated exactly by default: recomputed from its input adapters and written into the loaded
    base (:mod:`.inplace`). ``exact=False``, or inputs that are gone or changed, score the adapter
    as it is; the row then says ``lowrank`` with its rank and errors (``note`` says why).
    """
    path = Path(path).resolve()
    name = name or path.name
    if not is_adapter_dir(path):
        if is_full_folder(path):
            return _full_variant(path, name)
        raise InputError(
            f"{path}: neither an adapter folder (no adapter_config.json) nor a "
            "full model folder (config.json + safetensors)"
        )
    manifest = path / LINEAGE_FILE
    raw = _read_json(manifest) if manifest.is_file() else None
    if raw is None:
        v = Variant(name, "stage", path, [path], lineage="unknown")
    elif raw.get("kind") == "merge":
        v = Variant(name, "merged", path, [path], lineage="merge", **_merge_fields(raw, manifest))
        if is_refactorised(raw):
            problem = _exact_inputs_problem(raw) if exact else ""
            if exact and not problem:
                v.exact, v.chain = STREAMED, []
                v.content_hash = _manifest_hash(raw, "exact")
                return v
            errors = raw.get("errors") or {}
            v.representation = "lowrank"
            v.represented_rank = raw.get("output_rank_max")
            v.lowrank_error_mean = errors.get("mean")
            v.lowrank_error_max = errors.get("max")
            if problem:
                v.note = (
                    f"{path}: scored as its rank-{v.represented_rank} adapter "
                    f"(mean error {float(errors.get('mean') or 0):.1%}), not exactly: "
                    f"{problem}"
                )
    else:
        meta = read_stage_metadata(path)
        assert meta is not None  # kind is stage_adapter (or absent) here
        v = Variant(
            name,
            "stage",
            path,
            _stage_chain(path),
            stage_index=meta.stage_index,
            lineage=meta.lineage.mode or "independent",
        )
    v.content_hash = files_sha256(v.chain)
    return v


def discover(dirs: list[str | Path], *, exact: bool = True) -> list[Variant]:
    """Variants from folders: an adapter or full-output folder itself, or a folder of them.

    Within a folder of adapters, stages come in curriculum order (``stage_index``, then name).
    Names are the folder names; a clash gets the parent folder prefixed (``merges/ties``).
    """
    found: list[Path] = []
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise InputError(f"{d}: no such file or directory")
        if is_variant_dir(d):
            found.append(d)
            continue
        subs = sorted(p for p in d.iterdir() if p.is_dir() and is_variant_dir(p))
        if not subs:
            raise InputError(f"{d}: neither an adapter or full-output folder nor a folder of them")
        found += subs
    variants = [variant_from_dir(p, exact=exact) for p in found]
    names = [v.name for v in variants]
    for v, p in zip(variants, found):
        if names.count(v.name) > 1:
            v.name = f"{Path(p).resolve().parent.name}/{v.name}"
    stages = sorted(
        (v for v in variants if v.kind == "stage"),
        key=lambda v: (v.stage_index is None, v.stage_index or 0),
    )
    # stable sort keeps the given order among stages without an index
    return stages + [v for v in variants if v.kind != "stage"]


def default_baseline(variants: list[Variant]) -> str:
    """The last stage-wise adapter (curriculum order), else the base."""
    stages = [v for v in variants if v.kind == "stage"]
    return stages[-1].name if stages else "base"


# ---------------------------------------------------------------- held-out books (thresholds)

#: ``threshold_source`` values of a leaderboard row (multi-label threshold decisions).
HELDOUT = "heldout-books"
HELDOUT_PARTIAL = "heldout-books (not every stage held them out)"
NOT_HELD_OUT = "train-books (not held out)"
UNSEEN = "train-books (variant never trained on this dataset)"


def _lineage_folders(path: Path, seen: tuple[Path, ...] = ()) -> list[Path]:
    # every stage folder whose training shaped this adapter: itself and its parents, whatever
    # the lineage mode (a continued stage kept training its parent's weights)
    meta = read_stage_metadata(path)
    parent = resolve_parent(path, meta)
    if parent is None or parent in seen or not is_adapter_dir(parent):
        return [path]
    return _lineage_folders(parent, seen + (path,)) + [path]


def _stage_folders(v: Variant) -> list[Path] | None:
    """The stage folders behind ``v`` (a merge: its inputs' chains); None when unknowable."""
    if v.kind == "base" or v.path is None:
        return []
    if (
        v.kind == "merged"
        or (v.path / LINEAGE_FILE).is_file()
        and _read_json(v.path / LINEAGE_FILE).get("kind") == "merge"
    ):
        raw = _read_json(v.path / LINEAGE_FILE)
        inputs = [
            Path(str(a.get("path") if isinstance(a, dict) else a)) for a in raw.get("adapters", [])
        ]
        if not inputs or not all(is_adapter_dir(p) for p in inputs):
            return None
        return [f for p in inputs for f in _lineage_folders(p.resolve())]
    return [f for link in v.chain or [v.path] for f in _lineage_folders(link)]


def heldout_books(v: Variant, dataset: str) -> tuple[list[str] | None, str]:
    """The books of ``dataset`` that no training stage of ``v`` saw, and where they come from.

    Training records them per stage (curriculum option ``holdout``) in ``emomerge.json`` as
    ``dataset: {name, ..., holdout: {books, fraction, seed}}``. The books no stage saw are the
    *intersection* of the records of every stage behind ``v`` that trained on ``dataset`` (for a
    merge, over its inputs' chains: each input trained on the books the other held out). When
    that is empty, or a stage kept no record, the union is the best there is — books some stage
    held out, never a book every stage trained on — and the note says so (``HELDOUT_PARTIAL``).
    ``(None, note)`` when there is no record to use: the caller falls back to a seeded draw of
    train books and writes ``note`` into the row's ``threshold_source``.
    """
    folders = _stage_folders(v)
    if folders is None:
        return None, NOT_HELD_OUT
    books: set[str] = set()
    records: list[set[str]] = []
    complete, relevant = True, 0
    for folder in dict.fromkeys(folders):
        meta = read_stage_metadata(folder)
        if meta is None or not meta.dataset or not meta.dataset.get("name"):
            complete = False  # unknown training data: it may have seen any book
            continue
        if str(meta.dataset["name"]).lower() != dataset.lower():
            continue
        relevant += 1
        record = (meta.dataset.get("holdout") or {}).get("books")
        if record:
            records.append({str(b) for b in record})
            books.update(records[-1])
        else:
            complete = False
    unseen = set.intersection(*records) if records else set()
    if complete and unseen:
        return sorted(unseen), HELDOUT
    if books:
        return sorted(books), HELDOUT_PARTIAL
    if complete and relevant == 0:
        return None, UNSEEN
    return None, NOT_HELD_OUT
