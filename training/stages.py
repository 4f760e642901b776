"""Stage planning before any model is loaded: data read and checked, resume state, lineage."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
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
from .data import Sample, list_splits, read_dataset, samples_sha256

ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class StagePlan:
    """A stage with its training samples read and fingerprinted."""

    index: int
    stage: Stage
    samples: list[Sample]
    data_sha256: str
    out_dir: Path

    def dataset_record(self, cur: Curriculum) -> dict[str, Any]:
        """The ``dataset`` block of the stage's ``emomerge.json``."""
        return {"name": self.stage.dataset, "path": str(cur.resolve(self.stage.path).resolve()),
                "split": self.stage.split, "task": self.stage.task,
                "sha256": self.data_sha256, "samples": len(self.samples)}


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
    shared = {s.id for s in train} & {s.id for s in held_out}
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
        check_no_overlap(stage, path, samples, where)
        if stage.max_samples and len(samples) > stage.max_samples:
            keep = sorted(random.Random(cur.seed).sample(range(len(samples)), stage.max_samples))
            samples = [samples[k] for k in keep]
        plans.append(StagePlan(i, stage, samples, samples_sha256(samples),
                               out / "adapters" / stage.name))
    return plans


def is_complete(adapter_dir: Path) -> bool:
    """A stage folder is complete when it holds weights and lineage (it is renamed into place)."""
    return (adapter_dir / ADAPTER_FILE).is_file() and (adapter_dir / LINEAGE_FILE).is_file()


def check_resumable(plan: StagePlan, cur: Curriculum, base_name: str) -> None:
    """A finished stage found on disk must come from the same curriculum, data and seed."""
    meta = read_stage_metadata(plan.out_dir)
    if meta is None:
        raise InputError(f"{plan.out_dir}: adapter folder without {LINEAGE_FILE}")
    found = {"dataset sha256": (meta.dataset or {}).get("sha256"), "seed": meta.seed,
             "lineage mode": meta.lineage.mode,
             "base": meta.base.name_or_path if meta.base else None}
    want = {"dataset sha256": plan.data_sha256, "seed": cur.seed, "lineage mode": cur.lineage,
            "base": base_name}
    for key, value in want.items():
        if found[key] != value:
            raise InputError(f"{plan.out_dir}: finished stage has a different {key} "
                             f"({found[key]!r} vs {value!r}); use a new --out folder")


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
    )
