"""Stage planning before any model is loaded: data read and checked, resume state, lineage."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emomerge.merging.errors import InputError
from emomerge.merging.lineage import (
    LINEAGE_FILE,
    BaseIdentity,
    Lineage,
    StageMetadata,
    read_stage_metadata,
)

from emomerge import __version__

from .curriculum import Curriculum, Stage
from .data import Sample, content_id, list_splits, read_dataset, samples_sha256
from .data.holdout import has_book, holdout_books, without_books

ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class StagePlan:
    """A stage with its training samples read and fingerprinted."""

    index: int
    stage: Stage
    samples: list[Sample]
    data_sha256: str
    out_dir: Path
    #: ``{"books": [...], "fraction": f, "seed": s}`` when the stage holds books out.
    holdout: dict[str, Any] | None = field(default=None)

    def dataset_record(self, cur: Curriculum) -> dict[str, Any]:
        """The ``dataset`` block of the stage's ``emomerge.json``."""
        record = {"name": self.stage.dataset, "path": str(cur.resolve(self.stage.path).resolve()),
                  "split": self.stage.split, "task": self.stage.task,
                  "sha256": self.data_sha256, "samples": len(self.samples)}
        if self.holdout is not None:
            # Evaluation reads meta.dataset["holdout"]["books"] to pick its threshold on them.
            record["holdout"] = self.holdout
        return record


def _eval_split(stage: Stage, path: Path) -> str | None:
    if stage.eval_split != "auto":
        return stage.eval_split
    splits = {s.lower(): s for s in list_splits(stage.dataset, path, stage.task)}
    return splits.get("test")


def check_no_overlap(stage: Stage, path: Path, train: list[Sample], where: str) -> None:
    """Refuse a stage whose training split is (or shares samples with) its evaluation split."""
    eval_split = _eval_split(stage, path)
    if eval_split is None:
        return
    if eval_split.lower() == stage.split.lower():
        raise InputError(f"{where}: trains on split '{stage.split}', which is its evaluation "
                         "split; never train on the evaluation split")
    opts = {**stage.options, "allow_missing_images": True}
    held_out = read_dataset(stage.dataset, path, eval_split, stage.task, **opts)
    # Content identities, not ids: ids built from row positions never collide across splits.
    shared = {content_id(s) for s in train} & {content_id(s) for s in held_out}
    if shared:
        raise InputError(f"{where}: split '{stage.split}' shares {len(shared)} samples with the "
                         f"evaluation split '{eval_split}' (e.g. {min(shared)})")


def plan_stages(cur: Curriculum, out: Path) -> list[StagePlan]:
    """Read every stage's data and run every check before training starts."""
    plans = []
    for i, stage in enumerate(cur.stages):
        where = f"{cur.source}: stages.{i} ({stage.name})"
        path = cur.resolve(stage.path)
        if not path.exists():
            raise InputError(f"{where}: dataset path {path} not found")
        samples = read_dataset(stage.dataset, path, stage.split, stage.task, **stage.options)
        if not samples:
            raise InputError(f"{where}: no samples in split '{stage.split}' (missing images? "
                             "see `emomerge data inspect`)")
        holdout = None
        if stage.holdout is not None:
            samples, holdout = hold_out_books(stage, samples, where)
        check_no_overlap(stage, path, samples, where)
        if stage.max_samples and len(samples) > stage.max_samples:
            keep = sorted(random.Random(cur.seed).sample(range(len(samples)), stage.max_samples))
            samples = [samples[k] for k in keep]
        plans.append(StagePlan(i, stage, samples, samples_sha256(samples),
                               out / "adapters" / stage.name, holdout))
    return plans


def hold_out_books(stage: Stage, samples: list[Sample],
                   where: str) -> tuple[list[Sample], dict[str, Any]]:
    """Drop the held-out books' samples; return the rest and the ``holdout`` record.

    The books are drawn from the whole split (before ``max_samples``), as evaluation draws them.
    """
    assert stage.holdout is not None
    bookless = next((s for s in samples if not has_book(s)), None)
    if bookless is not None:
        raise InputError(f"{where}: key 'holdout': dataset '{stage.dataset}' has no books to hold "
                         f"out (sample {bookless.id} names none; books exist in EmoComics35 and "
                         "MangaVQA)")
    h = stage.holdout
    try:
        books = holdout_books(samples, h.fraction, h.seed)
    except InputError as exc:
        raise InputError(f"{where}: key 'holdout': {exc}") from exc
    kept = without_books(samples, books)
    return kept, {"books": books, "fraction": h.fraction, "seed": h.seed}


def is_complete(adapter_dir: Path) -> bool:
    """A stage folder is complete when it holds weights and lineage (it is renamed into place)."""
    return (adapter_dir / ADAPTER_FILE).is_file() and (adapter_dir / LINEAGE_FILE).is_file()


def stage_settings(plan: StagePlan, cur: Curriculum, family: str,
                   base_sha: str | None) -> dict[str, Any]:
    """Everything besides the data that determines a stage's weights (its resume fingerprint).

    The data is fingerprinted apart (``dataset.sha256``); the device is left out, as it does not
    change the update; the stage's position is in, as stage k is seeded with seed + k.
    """
    stage = plan.stage.model_dump(exclude={"name", "path", "eval_split", "options"})
    train = {k: v for k, v in cur.train.model_dump().items() if k != "device"}
    train["lr"] = plan.stage.lr or cur.train.lr
    settings = {"stage_index": plan.index, "stage": stage, "lora": cur.lora.model_dump(),
                "train": train, "lineage": cur.lineage, "seed": cur.seed, "family": family,
                "base_hash": base_sha}
    if family in ANSWER_AFTER_PREFIX:
        # answers are encoded after the template's space (batching.answer_prefix): a stage
        # trained before that ("ASSISTANT:Joy") must not be resumed as if it were the same
        settings["answer"] = "after_template_prefix"
    return settings


#: families whose templates put whitespace before an assistant answer (LLaVA "ASSISTANT: Joy").
ANSWER_AFTER_PREFIX = ("llava", "llava_next")


def settings_sha256(settings: dict[str, Any]) -> str:
    """sha256 of the settings' canonical JSON (sorted keys: the same settings, the same hash)."""
    text = json.dumps(settings, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _settings_diff(found: Any, want: dict[str, Any]) -> str:
    """``lora.r 8 -> 4, stage.steps 3 -> 5`` (the keys whose values changed)."""
    a, b = _flat(found if isinstance(found, dict) else {}), _flat(want)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    return ", ".join(f"{k} {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys)


def check_resumable(plan: StagePlan, cur: Curriculum, base_name: str, *, family: str,
                    base_sha: str | None, parent: StagePlan | None) -> None:
    """A finished stage on disk must be what this run would train, from what it would start on.

    Compared: the data, the seed, the lineage mode, the base (path and content hash), the stage,
    LoRA and train settings (``settings_sha256``), and the parent's adapter file (a retrained
    parent invalidates the stages built on it). A mismatch is refused rather than retrained:
    we never delete adapters the user may want; they pick a new ``--out`` folder, or delete
    this stage folder and the ones after it to retrain from here.
    """
    meta = read_stage_metadata(plan.out_dir)
    if meta is None:
        raise InputError(f"{plan.out_dir}: adapter folder without {LINEAGE_FILE}")
    fix = (f"use a new --out folder, or delete {plan.out_dir.name} and the stages after it to "
           "retrain from there")
    found = {"dataset sha256": (meta.dataset or {}).get("sha256"), "seed": meta.seed,
             "lineage mode": meta.lineage.mode,
             "base": meta.base.name_or_path if meta.base else None}
    want = {"dataset sha256": plan.data_sha256, "seed": cur.seed, "lineage mode": cur.lineage,
            "base": base_name}
    for key, value in want.items():
        if found[key] != value:
            raise InputError(f"{plan.out_dir}: finished stage has a different {key} "
                             f"({found[key]!r} vs {value!r}); {fix}")
    extra = meta.model_extra or {}
    settings = stage_settings(plan, cur, family, base_sha)
    if "settings_sha256" not in extra:
        raise InputError(f"{plan.out_dir}: finished stage records no settings_sha256 (written by "
                         f"an older emomerge), so it cannot be checked against this curriculum; "
                         f"{fix}")
    if extra["settings_sha256"] != settings_sha256(settings):
        diff = _settings_diff(extra.get("settings"), settings) or "settings_sha256"
        raise InputError(f"{plan.out_dir}: finished stage was trained with different settings "
                         f"({diff}); {fix}")
    want_parent = f"../{parent.stage.name}" if parent is not None else None
    if meta.lineage.parent != want_parent:
        raise InputError(f"{plan.out_dir}: finished stage has a different parent "
                         f"({meta.lineage.parent!r} vs {want_parent!r}); {fix}")
    if parent is not None:
        parent_file = parent.out_dir / ADAPTER_FILE
        if meta.lineage.parent_sha256 != sha256_file(parent_file):
            raise InputError(f"{plan.out_dir}: finished stage was built on another "
                             f"{parent.stage.name} adapter (lineage.parent_sha256 differs from "
                             f"the sha256 of {parent_file}); {fix}")


def base_hash(name_or_path: str) -> str | None:
    """The merging core's fingerprint of a local base (config + tensor index); None for hub ids."""
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        return None
    try:
        from emomerge.merging.checkpoint import Checkpoint

        return Checkpoint(path).fingerprint()
    except (ImportError, AttributeError, InputError):
        return hashlib.sha256((path / "config.json").read_bytes()).hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def stage_metadata(plan: StagePlan, cur: Curriculum, prev: StagePlan | None, base_name: str,
                   family: str, base_sha: str | None, steps: int, losses: list[float],
                   world_size: int = 1) -> StageMetadata:
    """The ``emomerge.json`` of a finished stage (lineage relative to the adapter folder)."""
    settings = stage_settings(plan, cur, family, base_sha)
    lineage = Lineage(mode=cur.lineage)
    if prev is not None:
        lineage = Lineage(mode=cur.lineage, parent=f"../{prev.stage.name}",
                          parent_sha256=sha256_file(prev.out_dir / ADAPTER_FILE))
    return StageMetadata(
        emomerge_version=__version__, stage=plan.stage.name, stage_index=plan.index,
        lineage=lineage, base=BaseIdentity(name_or_path=base_name, hash=base_sha, family=family),
        dataset=plan.dataset_record(cur), seed=cur.seed, steps=steps,
        final_loss=losses[-1] if losses else None, loss_history=losses, world_size=world_size,
        lora=cur.lora.model_dump(), train={**cur.train.model_dump(),
                                          "lr": plan.stage.lr or cur.train.lr},
        settings=settings, settings_sha256=settings_sha256(settings),
    )
