"""Stage planning before any model is loaded: data read and checked, resume state, lineage."""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emomerge import __version__
from emomerge.merging.errors import InputError
from emomerge.merging.lineage import (
    LINEAGE_FILE,
    BaseIdentity,
    Lineage,
    StageMetadata,
    read_stage_metadata,
)
from emomerge.merging.provenance import software

from .curriculum import Curriculum, Stage
from .data import Sample, content_id, list_splits, read_dataset, samples_sha256
from .data.holdout import has_book, holdout_books, without_books
from .models.families import get_family

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
    #: What the train/evaluation overlap check compared, or why it compared nothing
    #: (:func:`check_no_overlap`).
    overlap_check: dict[str, Any] | None = field(default=None)

    def dataset_record(self, cur: Curriculum) -> dict[str, Any]:
        """The ``dataset`` block of the stage's ``emomerge.json``."""
        record = {
            "name": self.stage.dataset,
            "path": str(cur.resolve(self.stage.path).resolve()),
            "split": self.stage.split,
            "task": self.stage.task,
            "sha256": self.data_sha256,
            "samples": len(self.samples),
        }
        if self.holdout is not None:
            # Evaluation reads meta.dataset["holdout"]["books"] to pick its threshold on them.
            record["holdout"] = self.holdout
        if self.overlap_check is not None:
            # Whether (and how) the training data was checked against the evaluation split.
            record["overlap_check"] = self.overlap_check
        return record


#: Datasets whose samples name the page their image is (``meta["page_id"]``): their overlap
#: check compares pages, and a stage of them with no evaluation split to compare is warned about.
PAGE_LEVEL = ("mangavqa",)


def _eval_split(stage: Stage, source: Path, explicit: bool, where: str) -> str | None:
    """The evaluation split's name in ``source``; None when there is none to compare."""
    if stage.eval_split != "auto":
        return stage.eval_split
    splits = {s.lower(): s for s in list_splits(stage.dataset, source, stage.task)}
    if "test" in splits:
        return splits["test"]
    if explicit:
        if len(splits) == 1:  # a file holding the evaluation set alone, whatever its name
            return next(iter(splits.values()))
        raise InputError(
            f"{where}: key 'eval_path': {source} has no 'test' split (splits: "
            f"{', '.join(sorted(splits.values()))}); name one with 'eval_split'"
        )
    return None


def _page(sample: Sample) -> str | None:
    """The manga page a sample's image is (the reader's ``meta["page_id"]``), or None."""
    page = sample.meta.get("page_id")
    return str(page) if page is not None else None


def check_no_overlap(
    stage: Stage, path: Path, train: list[Sample], where: str, eval_path: Path | None = None
) -> dict[str, Any]:
    """Refuse a stage whose training split is (or shares inputs with) its evaluation split.

    The evaluation split is read from ``eval_path`` (the stage key, resolved) or else from
    beside the training data. Samples are compared by content (ids built from row positions
    never collide across splits) and, for datasets naming their page (:data:`PAGE_LEVEL`), by
    page: another question about a test page still shows the model that page. Returns the
    record of what was compared (``dataset.overlap_check`` in the stage's ``emomerge.json``).
    A MangaVQA stage with nothing to compare trains, with a warning and an ``unchecked`` record:
    refusing would stop the shipped curricula, whose MangaVQA path holds the training set only.
    """
    source = eval_path if eval_path is not None else path
    if stage.eval_split is None:
        return {"status": "unchecked", "reason": "eval_split is null"}
    eval_split = _eval_split(stage, source, eval_path is not None, where)
    if eval_split is None:
        if stage.dataset in PAGE_LEVEL:
            warnings.warn(
                f"{where}: no evaluation split beside {path} and none named, so its training "
                f"pages were NOT checked against the {stage.dataset} test pages; add "
                "'eval_path: <the test parquet file or folder>' to the stage",
                stacklevel=2,
            )
        return {"status": "unchecked", "reason": f"no 'test' split beside {path} and no eval_path"}
    if eval_path is None and eval_split.lower() == stage.split.lower():
        raise InputError(
            f"{where}: trains on split '{stage.split}', which is its evaluation "
            "split; never train on the evaluation split"
        )
    opts = {**stage.options, "allow_missing_images": True}
    held_out = read_dataset(stage.dataset, source, eval_split, stage.task, **opts)
    shown = f"'{eval_split}'" if eval_path is None else f"'{eval_split}' of {source}"
    record: dict[str, Any] = {
        "status": "checked",
        "eval_path": str(source.resolve()),
        "eval_split": eval_split,
        "eval_samples": len(held_out),
        "level": "content",
    }
    if stage.dataset in PAGE_LEVEL:
        test_pages = {p for p in map(_page, held_out) if p is not None}
        on_test = [s for s in train if _page(s) in test_pages]
        if on_test:
            pages = sorted({_page(s) for s in on_test})
            raise InputError(
                f"{where}: split '{stage.split}' shares {len(pages)} manga pages "
                f"with the evaluation split {shown} ({len(on_test)} training "
                f"samples on them, e.g. page {pages[0]}); a page seen in training "
                "leaks its evaluation answers, drop those rows from the training "
                "data"
            )
        record.update(level="page", eval_pages=len(test_pages))
    shared = {content_id(s) for s in train} & {content_id(s) for s in held_out}
    if shared:
        raise InputError(
            f"{where}: split '{stage.split}' shares {len(shared)} samples with the "
            f"evaluation split {shown} (e.g. {min(shared)})"
        )
    return record


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
            raise InputError(
                f"{where}: no samples in split '{stage.split}' (missing images? "
                "see `emomerge data inspect`)"
            )
        holdout = None
        if stage.holdout is not None:
            samples, holdout = hold_out_books(stage, samples, where)
        eval_path = None
        if stage.eval_path is not None:
            eval_path = cur.resolve(stage.eval_path)
            if not eval_path.exists():
                raise InputError(f"{where}: key 'eval_path': {eval_path} not found")
        overlap = check_no_overlap(stage, path, samples, where, eval_path)
        if stage.max_samples and len(samples) > stage.max_samples:
            keep = sorted(random.Random(cur.seed).sample(range(len(samples)), stage.max_samples))
            samples = [samples[k] for k in keep]
        plans.append(
            StagePlan(
                i,
                stage,
                samples,
                samples_sha256(samples),
                out / "adapters" / stage.name,
                holdout,
                overlap,
            )
        )
    return plans


def hold_out_books(
    stage: Stage, samples: list[Sample], where: str
) -> tuple[list[Sample], dict[str, Any]]:
    """Drop the held-out books' samples; return the rest and the ``holdout`` record.

    The books are drawn from the whole split (before ``max_samples``), as evaluation draws them.
    """
    assert stage.holdout is not None
    bookless = next((s for s in samples if not has_book(s)), None)
    if bookless is not None:
        raise InputError(
            f"{where}: key 'holdout': dataset '{stage.dataset}' has no books to hold "
            f"out (sample {bookless.id} names none; books exist in EmoComics35 and "
            "MangaVQA)"
        )
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


def stage_settings(
    plan: StagePlan, cur: Curriculum, family: str, base_sha: str | None
) -> dict[str, Any]:
    """Everything besides the data that determines a stage's weights (its resume fingerprint).

    The data is fingerprinted apart (``dataset.sha256``); the device is left out, as it does not
    change the update; the stage's position is in, as stage k is seeded with seed + k.
    """
    stage = plan.stage.model_dump(exclude={"name", "path", "eval_split", "eval_path", "options"})
    # neither the device, the unreadable-image tolerance nor activation checkpointing changes
    # the update (skipped images change the data, which its sha256 covers). An explicit
    # max_pixels is in (the dump omits it when unset, so stages that predate it keep their
    # fingerprint); the resolved cap is compared apart (``check_resumable``).
    train = {
        k: v
        for k, v in cur.train.model_dump().items()
        if k not in ("device", "max_bad_image_share", "gradient_checkpointing")
    }
    train["lr"] = plan.stage.lr or cur.train.lr
    settings = {
        "stage_index": plan.index,
        "stage": stage,
        "lora": cur.lora.model_dump(),
        "train": train,
        "lineage": cur.lineage,
        "seed": cur.seed,
        "family": family,
        "base_hash": base_sha,
    }
    settings.update(text_format(family))
    return settings


#: families whose templates put whitespace before an assistant answer (LLaVA "ASSISTANT: Joy").
ANSWER_AFTER_PREFIX = ("llava", "llava_next")


def text_format(family: str) -> dict[str, str]:
    """How a family's training text changed since stages were first trained (versioned into
    :func:`stage_settings`, so a stage trained on the old text is not resumed as if it were the
    same; the families whose text never changed add nothing and keep their fingerprint)."""
    spec = get_family(family)
    out: dict[str, str] = {}
    if family in ANSWER_AFTER_PREFIX:
        # answers are encoded after the template's space (batching.answer_prefix), not
        # "ASSISTANT:Joy"
        out["answer"] = "after_template_prefix"
    if spec.prompt_bos:
        # the prompt opens with the tokenizer's BOS, as the released processor encodes it
        out["prompt"] = "bos"
    if spec.answer_tail:
        # the supervised answer ends with what the template writes after the end-of-turn token
        # (Qwen "<|im_end|>\n"), as LLaMA-Factory trains it
        out["answer_tail"] = spec.answer_tail
    return out


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


def check_resumable(
    plan: StagePlan,
    cur: Curriculum,
    base_name: str,
    *,
    family: str,
    base_sha: str | None,
    parent: StagePlan | None,
    image: dict[str, Any] | None = None,
) -> None:
    """A finished stage on disk must be what this run would train, from what it would start on.

    Compared: the data, the seed, the lineage mode, the base (path and content hash), the stage,
    LoRA and train settings (``settings_sha256``), the resolved image cap when the stage
    records one (``image.settings``: a family default that changed since is other training;
    stages from before the cap existed record none and are not compared), and the parent's
    adapter file (a retrained parent invalidates the stages built on it). A mismatch is refused rather than retrained:
    we never delete adapters the user may want; they pick a new ``--out`` folder, or delete
    this stage folder and the ones after it to retrain from here.
    """
    meta = read_stage_metadata(plan.out_dir)
    if meta is None:
        raise InputError(f"{plan.out_dir}: adapter folder without {LINEAGE_FILE}")
    fix = (
        f"use a new --out folder, or delete {plan.out_dir.name} and the stages after it to "
        "retrain from there"
    )
    found = {
        "dataset sha256": (meta.dataset or {}).get("sha256"),
        "seed": meta.seed,
        "lineage mode": meta.lineage.mode,
        "base": meta.base.name_or_path if meta.base else None,
    }
    want = {
        "dataset sha256": plan.data_sha256,
        "seed": cur.seed,
        "lineage mode": cur.lineage,
        "base": base_name,
    }
    for key, value in want.items():
        if found[key] != value:
            raise InputError(
                f"{plan.out_dir}: finished stage has a different {key} "
                f"({found[key]!r} vs {value!r}); {fix}"
            )
    extra = meta.model_extra or {}
    settings = stage_settings(plan, cur, family, base_sha)
    if "settings_sha256" not in extra:
        raise InputError(
            f"{plan.out_dir}: finished stage records no settings_sha256 (written by "
            f"an older emomerge), so it cannot be checked against this curriculum; "
            f"{fix}"
        )
    if extra["settings_sha256"] != settings_sha256(settings):
        diff = _settings_diff(extra.get("settings"), settings) or "settings_sha256"
        raise InputError(
            f"{plan.out_dir}: finished stage was trained with different settings ({diff}); {fix}"
        )
    recorded = (extra.get("image") or {}).get("settings")
    if image is not None and recorded is not None and recorded != image["settings"]:
        raise InputError(
            f"{plan.out_dir}: finished stage was trained at another image "
            f"resolution (image.settings {recorded} vs {image['settings']} now); "
            f"{fix}"
        )
    want_parent = f"../{parent.stage.name}" if parent is not None else None
    if meta.lineage.parent != want_parent:
        raise InputError(
            f"{plan.out_dir}: finished stage has a different parent "
            f"({meta.lineage.parent!r} vs {want_parent!r}); {fix}"
        )
    if parent is not None:
        parent_file = parent.out_dir / ADAPTER_FILE
        if meta.lineage.parent_sha256 != sha256_file(parent_file):
            raise InputError(
                f"{plan.out_dir}: finished stage was built on another "
                f"{parent.stage.name} adapter (lineage.parent_sha256 differs from "
                f"the sha256 of {parent_file}); {fix}"
            )


def sha256_file(path: Path) -> str:
    """sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def stage_metadata(
    plan: StagePlan,
    cur: Curriculum,
    prev: StagePlan | None,
    base_name: str,
    family: str,
    base_sha: str | None,
    steps: int,
    losses: list[float],
    world_size: int = 1,
    image: dict[str, Any] | None = None,
    gradient_checkpointing: bool | None = None,
) -> StageMetadata:
    """The ``emomerge.json`` of a finished stage (lineage relative to the adapter folder).

    ``image``: the resolved image cap (``families.apply_image_cap``); ``gradient_checkpointing``:
    whether it was on (``train.gradient_checkpointing`` resolved for the device).
    """
    settings = stage_settings(plan, cur, family, base_sha)
    lineage = Lineage(mode=cur.lineage)
    if prev is not None:
        lineage = Lineage(
            mode=cur.lineage,
            parent=f"../{prev.stage.name}",
            parent_sha256=sha256_file(prev.out_dir / ADAPTER_FILE),
        )
    train = {**cur.train.model_dump(), "lr": plan.stage.lr or cur.train.lr}
    if gradient_checkpointing is not None:
        train["gradient_checkpointing"] = gradient_checkpointing
    extra: dict[str, Any] = {"image": image} if image is not None else {}
    return StageMetadata(
        emomerge_version=__version__,
        stage=plan.stage.name,
        stage_index=plan.index,
        lineage=lineage,
        base=BaseIdentity(name_or_path=base_name, hash=base_sha, family=family),
        dataset=plan.dataset_record(cur),
        seed=cur.seed,
        steps=steps,
        final_loss=losses[-1] if losses else None,
        loss_history=losses,
        world_size=world_size,
        lora=cur.lora.model_dump(),
        train=train,
        **extra,
        settings=settings,
        settings_sha256=settings_sha256(settings),
        software=software(),  # versions and git_dirty (DESIGN.md, Outputs)
    )
