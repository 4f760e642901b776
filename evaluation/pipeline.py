"""From paths to leaderboard rows: what ``emomerge evaluate`` (and the experiment runner) call.

Reads the split with the training module's readers, loads the base once, finds the variants,
optionally adds the leave-one-stage-out merges, reads the data the multi-label threshold is
chosen on (a validation split, or the train split whose held-out books each variant's stages
recorded), and runs :func:`runner.evaluate`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emomerge.merging.adapters import base_identity
from emomerge.merging.errors import InputError
from emomerge.training.models.fingerprint import fingerprint

from .ablation import ablation_names, leave_one_stage_out
from .inplace import STREAMED
from .predict import ModelHost
from .runner import EvalConfig, EvalResult, evaluate
from .variants import Variant, default_baseline, discover


def load_checked(
    dataset: str, data: str | Path, split: str, reader_task: str | None = None, **reader_opts: Any
) -> tuple[list[Any], int]:
    """The split without samples whose images do not decode, and how many image files were
    skipped (``skipped_images`` in the rows); more than 5 % unreadable is one line."""
    from emomerge.training.data import read_checked

    return read_checked(dataset, data, split, reader_task, **reader_opts)


def load_split(
    dataset: str, data: str | Path, split: str, reader_task: str | None = None, **reader_opts: Any
) -> list[Any]:
    """One split as samples, through ``emomerge.training.data.read_dataset``."""
    from emomerge.training.data import read_dataset

    return read_dataset(dataset, data, split, reader_task, **reader_opts)


def validation_data(
    dataset: str,
    data: str | Path,
    reader_task: str | None,
    train_split: str = "train",
    **reader_opts: Any,
) -> tuple[list[Any] | None, list[Any] | None]:
    """Where multi-label thresholds are chosen: ``(validation split, None)`` when the dataset has
    one, else ``(None, train split)``, from which :func:`runner.evaluate` takes each variant's
    held-out books (EmoComics35 has no validation split)."""
    from emomerge.training.data import list_splits

    names = {s.lower(): s for s in list_splits(dataset, data, reader_task)}
    for cand in ("val", "validation", "dev"):
        if cand in names:  # a dataset with its own validation split uses it
            return load_checked(dataset, data, names[cand], reader_task, **reader_opts)[0], None
    if train_split.lower() not in names:
        raise InputError(f"{data}: no '{train_split}' split to hold validation books out of")
    return None, load_checked(
        dataset, data, names[train_split.lower()], reader_task, **reader_opts
    )[0]


def train_labels(
    dataset: str,
    data: str | Path,
    reader_task: str | None,
    pool: list[Any] | None = None,
    **reader_opts: Any,
) -> list[list[str]] | None:
    """The gold labels of the dataset's train split, which the trivial majority baseline counts
    (``pool``, when the train split is already read); None when there is no train split or it
    cannot be read (the baseline then counts the evaluated split, and its row says so)."""
    if pool:
        return [list(s.labels) for s in pool]
    from emomerge.training.data import list_splits

    try:
        names = {s.lower(): s for s in list_splits(dataset, data, reader_task)}
        if "train" not in names:
            return None
        return [
            list(s.labels)
            for s in load_split(dataset, data, names["train"], reader_task, **reader_opts)
        ]
    except InputError:
        return None


def recorded_cap(variants: list[Variant]) -> int | None:
    """The explicit image cap (``train.max_pixels``) the variants' stages were trained at, so
    evaluation sees the pixels training saw; None when none recorded one (family default)."""
    from emomerge.merging.lineage import read_stage_metadata

    caps = {}
    for v in variants:
        for folder in v.chain or ([v.path] if v.path else []):
            meta = (
                read_stage_metadata(folder) if (Path(folder) / "emomerge.json").is_file() else None
            )
            image = ((meta.model_extra or {}).get("image") or {}) if meta is not None else {}
            if image.get("source") == "explicit" and image.get("max_pixels"):
                caps[folder] = int(image["max_pixels"])
    if len(set(caps.values())) > 1:
        shown = ", ".join(f"{Path(f).name}: {c}" for f, c in list(caps.items())[:4])
        raise InputError(
            f"the variants were trained at different image caps ({shown}); evaluate them separately"
        )
    return next(iter(caps.values()), None)


def needs_validation(cfg: EvalConfig) -> bool:
    """Whether ``cfg`` chooses a multi-label threshold on validation data."""
    return (
        cfg.resolved_task() == "multi"
        and cfg.resolved_mode() == "likelihood"
        and cfg.multilabel == "threshold"
        and cfg.threshold is None
    )


# ---------------------------------------------------------------- variants against the base
#
# Checked before the base is loaded and before anything is scored or written: every adapter
# folder a variant reads is a readable, complete safetensors file with finite tensors whose
# shapes fit the base, and was recorded as trained on the base given. The rules are merging's
# (the same readers and checks, ``base_identity`` for names): evaluating a variant on another
# base than its own is the same mistake as merging it into one.


@dataclass
class LoadedBase:
    """What identifies the ``--base`` given: its name, its folder and content hashes."""

    name: str
    path: Path | None  # resolved local folder, None for a hub id
    model_type: str | None = None
    #: the checkpoint fingerprint (what training records as ``base.hash``) and the sha256 of
    #: config.json (what earlier versions recorded for a base without safetensors weights)
    hashes: set[str] = field(default_factory=set)
    fingerprint: str | None = None

    def __str__(self) -> str:
        return self.name + (f" (hash {self.fingerprint[:12]})" if self.fingerprint else "")

    @classmethod
    def of(cls, base: str | Path) -> LoadedBase:
        path = Path(base)
        if not (path / "config.json").is_file():
            return cls(str(base), None)
        import json

        config = (path / "config.json").read_bytes()
        try:
            model_type = json.loads(config).get("model_type")
        except (ValueError, AttributeError):
            model_type = None
        content = fingerprint(path)  # None: no safetensors weights to fingerprint
        # the config's hash (what training records for such a base) only where no content
        # identifies it: two checkpoints of one architecture share a config
        hashes = {content} if content else {hashlib.sha256(config).hexdigest()}
        return cls(str(base), path.resolve(), model_type, hashes, content)


def _last_part(name: str) -> str:
    return name.rstrip("/\\").replace("\\", "/").split("/")[-1].lower()


def other_precision(a: str | None, b: str | None) -> bool:
    """Two names of one model in other precisions or packagings (merging's ``base_identity``:
    ``unsloth/Qwen2.5-VL-7B-Instruct-bnb-4bit`` and ``Qwen/Qwen2.5-VL-7B-Instruct``): QLoRA
    trains on the 4-bit copy and is evaluated on the full-precision weights."""
    return (
        bool(a and b)
        and base_identity(a) == base_identity(b)
        and _last_part(str(a)) != _last_part(str(b))
    )


def same_base(name: str | None, recorded_hash: str | None, loaded: LoadedBase) -> bool | None:
    """Whether a recorded base (name or path, content hash) is the loaded one; None when the
    record cannot tell (the caller then compares model types, as merging does)."""
    if recorded_hash and loaded.hashes:
        return recorded_hash in loaded.hashes or other_precision(name, loaded.name)
    if not name:
        return None
    recorded = Path(name)
    if loaded.path is not None and (recorded / "config.json").is_file():
        # the recorded base is still on disk: compare contents, not folder names
        return (
            recorded.resolve() == loaded.path
            or bool(LoadedBase.of(recorded).hashes & loaded.hashes)
            or other_precision(name, loaded.name)
        )
    if base_identity(name) == base_identity(loaded.name):
        return True
    # a local base folder is often renamed (merging's rule): only two hub ids are compared
    return False if loaded.path is None else None


def adapter_folders(v: Variant) -> list[Path]:
    """The adapter folders scoring ``v`` reads: its chain; a merge scored exactly reads its
    inputs (and its own adapter is checked too: a broken one is a broken merge)."""
    folders = list(v.chain)
    if v.exact == STREAMED and v.path is not None:
        from emomerge.merging.updates import read_manifest

        folders.append(v.path)
        folders += [
            Path(a["path"])
            for a in (read_manifest(v.path) or {}).get("adapters", [])
            if isinstance(a, dict) and a.get("path")
        ]
    return list(dict.fromkeys(folders))


def _recorded(adapter: Any, folder: Path) -> list[tuple[str | None, str | None, str]]:
    """(name or path, hash, source) of each base record of one adapter folder."""
    from emomerge.merging.updates import read_manifest

    out = []
    meta = adapter.metadata
    if meta is not None and meta.base is not None:
        out.append((meta.base.name_or_path, meta.base.hash, "emomerge.json base"))
    else:
        manifest = read_manifest(folder) or {}
        base = manifest.get("base") if manifest.get("kind") == "merge" else None
        if isinstance(base, dict) and (base.get("path") or base.get("fingerprint")):
            out.append((base.get("path"), base.get("fingerprint"), "merge manifest base"))
        name = adapter.config.get("base_model_name_or_path")
        if name:
            out.append((name, None, "adapter_config.json base_model_name_or_path"))
    return out


def _base_problem(adapter: Any, folder: Path, loaded: LoadedBase) -> str:
    from emomerge.merging.basecheck import claimed_model_type

    for name, recorded_hash, source in _recorded(adapter, folder):
        verdict = same_base(name, recorded_hash, loaded)
        if verdict is None and loaded.model_type is not None:
            claimed, why = claimed_model_type(adapter)
            if claimed is not None and claimed != loaded.model_type:
                return f"recorded as trained on a {claimed} model ({why})"
        if verdict is False:
            what = f"'{name}'" if name else "a base"
            if recorded_hash:
                what += f" (hash {recorded_hash[:12]})"
            return f"recorded as trained on {what} ({source})"
    return ""


def check_variants(
    variants: list[Variant], base: str | Path, *, allow_base_mismatch: bool = False
) -> None:
    """Refuse, before any scoring, a variant whose adapters are unreadable, truncated, hold NaN
    or Inf, do not fit the base's shapes or were recorded on another base
    (``allow_base_mismatch``: skip only the last). One :class:`InputError` line each."""
    from emomerge.merging.checkpoint import Checkpoint
    from emomerge.merging.engine import check_against_base  # merging's own shape check
    from emomerge.merging.taskvectors import build_task_vectors

    loaded = LoadedBase.of(base)
    ckpt = None
    if loaded.path is not None:
        try:
            ckpt = Checkpoint(loaded.path)
        except InputError:
            ckpt = None  # .bin-only base: PEFT still reports shapes, merging's reader cannot
    seen: set[Path] = set()
    for v in variants:
        for folder in adapter_folders(v):
            if folder in seen:
                continue
            seen.add(folder)
            # load, lineage chain, layouts, shapes across the chain, finiteness: merging's reader
            tv = build_task_vectors(
                [folder],
                reference="base",
                allow_base_mismatch=True,
                base_flavour=ckpt.vlm_flavour if ckpt else None,
                allow_lineage_mismatch=True,
            )
            if ckpt is not None:
                try:
                    check_against_base(tv, ckpt, [])
                except InputError as exc:  # merging's line names the base: name the variant
                    raise InputError(f"{folder}: does not fit the base: {exc}") from exc
            if allow_base_mismatch:
                continue
            problem = _base_problem(tv.inputs[0], folder, loaded)
            if problem:
                where = f"{v.path}" + (f" (its adapter {folder})" if folder != v.path else "")
                raise InputError(
                    f"{where}: {problem} but the loaded base is {loaded} (pass "
                    "--allow-different-bases if they are the same weights)"
                )


def evaluate_paths(
    base: str | Path,
    variant_dirs: list[str | Path],
    data: str | Path,
    out: str | Path,
    cfg: EvalConfig,
    *,
    reader_task: str | None = None,
    reader_opts: dict[str, Any] | None = None,
    include_base: bool = True,
    leave_one_stage_out_: bool = False,
    family: str | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    host: ModelHost | None = None,
    exact: bool = True,
    allow_base_mismatch: bool = False,
) -> EvalResult:
    """Evaluate the base and every variant under ``variant_dirs`` on one split of ``data``.

    ``exact``: re-factorised sparse merges are scored exactly (recomputed from their inputs and
    written into the loaded base); False scores their adapters as written (rows say lowrank).
    Every variant is checked first (:func:`check_variants`; ``allow_base_mismatch`` lets a
    variant recorded on another base through).
    """
    cfg.check()
    opts = dict(reader_opts or {})
    samples, skipped = load_checked(cfg.dataset, data, cfg.split, reader_task, **opts)
    variants: list[Variant] = discover(list(variant_dirs), exact=exact) if variant_dirs else []
    merged = [v for v in variants if v.kind == "merged"] if leave_one_stage_out_ else []
    if leave_one_stage_out_ and not merged:
        raise InputError("--leave-one-stage-out: no merged variant among --variants")
    check_variants(variants, base, allow_base_mismatch=allow_base_mismatch)
    # check the baseline before building any ablation merge (minutes at real size)
    names = (
        (["base"] if include_base else [])
        + [v.name for v in variants]
        + [n for v in merged for n in ablation_names(v)]
    )
    baseline = cfg.baseline or default_baseline(
        ([Variant("base", "base")] if include_base else []) + variants
    )
    if baseline not in names:
        raise InputError(f"--baseline: '{baseline}' is not among the variants {names}")
    if merged:
        # under accelerate launch the main process builds the ablation merges, the others
        # then find them built (one writer per output folder)
        from .distributed import current_shard

        shard = current_shard()
        if not shard.is_main:
            shard.barrier()
        built = [
            a for v in merged for a in leave_one_stage_out(v, Path(out) / "ablations", exact=exact)
        ]
        if shard.is_main:
            shard.barrier()
        variants += built
    val = pool = None
    if needs_validation(cfg):
        val, pool = validation_data(cfg.dataset, data, reader_task, **opts)
    labels = (
        train_labels(cfg.dataset, data, reader_task, pool, **opts)
        if cfg.resolved_task() != "vqa"
        else None
    )
    if host is None and (Path(base) / "config.json").is_file():
        from .inplace import check_against_base_folder

        check_against_base_folder(
            [v for v in variants if v.exact],
            base,  # before loading it
            allow_base_mismatch=allow_base_mismatch,
        )
    host = host or ModelHost.load(
        base, family=family, dtype=dtype, device=device, max_pixels=recorded_cap(variants)
    )
    return evaluate(
        host,
        base,
        variants,
        samples,
        out,
        cfg,
        val_samples=val,
        val_pool=pool,
        train_labels=labels,
        include_base=include_base,
        progress=progress,
        skipped_images=skipped,
        allow_base_mismatch=allow_base_mismatch,
    )
