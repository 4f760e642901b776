"""Evaluate the base and every variant on one split; write leaderboard rows and details.

    host = ModelHost.load("path/to/base")
    result = evaluate(host, "path/to/base", discover(["adapters/", "merges/"]), test_samples,
                      "results/", EvalConfig(dataset="emoart", split="test"))

Every variant is scored on the same samples; metrics get bootstrap intervals from *one* shared
set of group resamples, so the paired test of each variant against the baseline resamples the
same pages for both.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from emomerge import __version__
from emomerge.merging.atomic import atomic_file, file_lock
from emomerge.merging.errors import InputError
from emomerge.merging.provenance import git_commit, software, versions_text
from emomerge.training.models.fingerprint import fingerprint

from . import decide
from .bootstrap import add_holm, bootstrap, mcnemar, paired_bootstrap, replicate_indices
from .bybook import BY_BOOK_IDENTITY, book_map, by_book_rows, title_map, write_by_book
from .cache import PredictionCache, stable_hash
from .distributed import current_shard
from .holdout import book_of, holdout_by_book
from .inplace import check_exact
from .leaderboard import (
    base_columns,
    details_name,
    format_label_set,
    format_per_label,
    read_rows,
    upsert_rows,
)
from .metrics import CORRECTNESS, HEADLINE, Predictions, details, per_label_f1
from .outputs import ParseReport, from_generation, from_likelihood, label_values, presence
from .predict import BatchHook, ModelHost, run_generation, run_likelihood
from .scoring import answer_prefix
from .trivial import trivial_predictions
from .variants import Variant, default_baseline, heldout_books

#: ``threshold_source`` of a row whose thresholds came from a validation split / were given.
VALIDATION_SPLIT = "validation-split"
FIXED = "fixed (--threshold)"

TASK_OF_DATASET = {"emocomics35": "multi", "emoart": "single", "emid": "single", "mangavqa": "vqa"}

#: With ``paired_test="mcnemar"`` the p-value tests per-sample exact correctness
#: (:func:`metrics.correctness`), which is this metric's numerator: the p goes in its column
#: only; the other metrics' ``_p`` columns stay empty (McNemar says nothing about an F1).
MCNEMAR_METRIC = CORRECTNESS  # the metric McNemar's per-sample correctness is of


@dataclass
class EvalConfig:
    """Everything that changes the numbers of an evaluation (it makes up the config hash)."""

    dataset: str
    split: str = "test"
    task: Literal["single", "multi", "vqa"] | None = None  # None: from the dataset name
    mode: Literal["auto", "likelihood", "generate"] = "auto"  # auto: likelihood unless vqa
    # summed log-probs by default: a per-token mean favours labels of more tokens
    length_norm: bool = False
    append_eot: bool = False  # per-label scoring only; label sets always end with it
    # multi-label likelihood: "label_set" scores whole answers (presence probabilities),
    # "first_label" each label as the whole/first answer; single-label always scores each label
    scoring: Literal["auto", "label_set", "first_label"] = "auto"
    max_labels: int = 3  # label_set: largest label set scored (3 covers 99.8% of EmoComics35)
    multilabel: Literal["threshold", "topk"] = "threshold"
    threshold: float | None = None  # fixed threshold: skips the validation search
    val_fraction: float = 0.1  # fallback draw of train books when no stage recorded a hold-out
    holdout_seed: int = 0  # seed of that draw (apart from the bootstrap seed)
    max_new_tokens: int = 32
    batch_size: int = 8
    n_boot: int = 1000
    seed: int = 0
    baseline: str | None = None  # None: the last stage-wise adapter
    paired_test: Literal["bootstrap", "mcnemar"] = "bootstrap"
    judge_url: str | None = None  # MangaVQA only: an OpenAI-compatible endpoint (off by default)
    judge_model: str | None = None
    judge_protocol: str = "binary"  # judge.PROTOCOLS: "binary" or the published "mangavqa-1-10"

    def resolved_task(self) -> str:
        task = self.task or TASK_OF_DATASET.get(self.dataset)
        if task is None:
            raise InputError(
                f"--task: dataset '{self.dataset}' has no default task; pass "
                "--task single|multi|vqa"
            )
        return task

    def check(self) -> None:
        """Refuse inconsistent settings before any model runs."""
        self.resolved_task()
        if self.judge_url and not self.judge_model:
            raise InputError("--judge-url needs --judge-model (the model name the endpoint serves)")
        if self.judge_url:
            from .judge import get_protocol

            get_protocol(self.judge_protocol)
        if self.scoring not in ("auto", "label_set", "first_label"):
            raise InputError(
                f"--scoring: expected auto, label_set or first_label, got '{self.scoring}'"
            )
        if self.max_labels < 1:
            raise InputError(f"--max-labels: must be at least 1, got {self.max_labels}")
        if self.scoring != "auto" and self.resolved_task() != "multi":
            raise InputError(
                f"--scoring {self.scoring}: only multi-label tasks have a choice "
                f"(task '{self.resolved_task()}' scores each label as the answer)"
            )
        # the CLI checks these too; library callers and experiments get the same one line
        ranges = {
            "threshold": (self.threshold, 0.0, 1.0, True),
            "val-fraction": (self.val_fraction, 0.0, 1.0, False),
        }
        for flag, (value, lo, hi, closed) in ranges.items():
            if value is None:
                continue
            inside = lo <= value <= hi if closed else lo < value < hi
            if not (math.isfinite(value) and inside):
                bounds = f"[{lo:g}, {hi:g}]" if closed else f"({lo:g}, {hi:g})"
                raise InputError(f"--{flag}: must be a number in {bounds}, got {value}")
        minimums = {
            "n-boot": (self.n_boot, 10),
            "batch-size": (self.batch_size, 1),
            "max-new-tokens": (self.max_new_tokens, 1),
            "seed": (self.seed, 0),
            "holdout-seed": (self.holdout_seed, 0),
        }
        for flag, (value, lo) in minimums.items():
            if value < lo:
                raise InputError(f"--{flag}: must be at least {lo}, got {value}")

    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "generate" if self.resolved_task() == "vqa" else "likelihood"

    def resolved_scoring(self) -> str:
        """``label`` (each label as the whole answer: single-label), ``first_label`` or
        ``label_set`` (multi-label; the default), empty without label likelihood."""
        if self.resolved_mode() != "likelihood":
            return ""
        if self.resolved_task() != "multi":
            return "label"
        return "label_set" if self.scoring == "auto" else self.scoring


@dataclass
class VariantResult:
    variant: Variant
    preds: Predictions
    parse: ParseReport
    threshold: float | None
    scored: int  # samples run through the model (0: all from the cache)
    threshold_source: str = ""  # where the threshold was chosen (empty: no threshold)
    scoring: str = ""  # EvalConfig.resolved_scoring(): label, first_label or label_set
    # label_set decisions: each label's threshold and whether it is its own or the shared one
    # (``threshold`` then holds the shared one)
    thresholds: decide.LabelThresholds | None = None
    judge: Any = None  # judge.JudgeReport of a judged MangaVQA variant


@dataclass
class EvalResult:
    rows: list[dict[str, Any]]
    results: list[VariantResult] = field(default_factory=list)
    leaderboard: Path | None = None


def git_hash() -> str:
    """The commit of the emomerge checkout (empty outside a git checkout)."""
    return git_commit()


def inference_key(
    processor: Any, samples: list[Any], cfg: Any, mode: str, scoring: str = "label", *, family: str
) -> dict[str, Any]:
    """What decides the cached outputs of a variant besides its weights: hashed into the cache
    key, so outputs computed another way are never reused.

    Label-set scoring adds ``scoring`` and ``max_labels`` (its records hold other candidates);
    per-label scoring (``label``, ``first_label``: the same records, decided differently) keeps
    the key it had, so caches written before label sets existed stay valid. Prompts that open
    with the tokenizer's BOS (LLaVA-1.5, LLaVA-NeXT since 0.x:
    ``training.models.batching.prompt_bos``) add ``prompt``, in both modes; the other families
    keep their key.
    """
    from emomerge.training.models.families import get_family

    infer: dict[str, Any] = {
        "mode": mode,
        "append_eot": cfg.append_eot,
        "max_new_tokens": cfg.max_new_tokens,
    }
    if get_family(family).prompt_bos:  # outputs cached for the BOS-less prompt are not reused
        infer["prompt"] = "bos"
    if mode == "likelihood" and scoring == "label_set":
        infer.update(scoring="label_set", max_labels=cfg.max_labels)
    if mode == "likelihood":
        # label tokens are encoded after the prompt since 0.x (scoring.continuation_ids): scores
        # cached under the old standalone encoding must not be reused
        infer["label_tokens"] = "after_prompt"
        prefix = answer_prefix(processor, samples[0].messages)
        if prefix:  # labels scored after the template's space (LLaVA " Joy"); others unchanged
            infer["answer_prefix"] = prefix
    return infer


def load_key(model: Any, processor: Any) -> dict[str, Any]:
    """How the base was loaded — weight dtype, 4-bit, the image processor's settings (the image
    cap) — which changes every variant's scores: part of the cache key and the config hash, so a
    run loaded another way never reuses (or replaces) another's predictions and rows."""
    ip = getattr(processor, "image_processor", None)
    image = ip.to_dict() if ip is not None and hasattr(ip, "to_dict") else {}
    return {
        "dtype": str(getattr(model, "dtype", "")),
        "4bit": bool(getattr(model, "is_loaded_in_4bit", False)),
        "image": stable_hash({k: v for k, v in image.items() if "processor_class" not in k}),
    }


def split_hash(samples: list[Any]) -> str:
    """Content hash of a split (training's definition when available)."""
    try:
        from emomerge.training.data import samples_sha256

        return samples_sha256(samples)
    except ImportError:  # training module absent: ids, prompts and labels only
        return stable_hash([[s.id, s.messages, s.target, s.labels] for s in samples])


def _refuse_prefix_labels(samples: list[Any], where: str) -> None:
    """Labels scored as whole answers without the end-of-turn: a label that another starts with
    would always outscore it (a continuation's likelihood is at most its prefix's), so the
    longer label could never be predicted. Refused before anything is scored."""
    labels = sorted({lab for s in samples for lab in s.label_set})
    for short in labels:
        longer = next((lab for lab in labels if lab != short and lab.startswith(short)), None)
        if longer is not None:
            raise InputError(
                f"{where}: label '{longer}' starts with label '{short}': scored without the "
                f"end-of-turn, '{longer}' could never be predicted; pass --append-eot "
                "(in an experiment: the evaluation set's append_eot: true)"
            )


def _score(
    host: ModelHost,
    v: Variant,
    samples: list[Any],
    cache: PredictionCache,
    sh: str,
    cfg: EvalConfig,
    mode: str,
    progress: bool,
    on_batch: BatchHook | None,
    where: str | None = None,
) -> int:
    # one progress bar per variant × evaluation set ("score ties on emocomics35/test")
    label = f"score {v.name} on {where or f'{cfg.dataset}/{cfg.split}'}"
    if mode == "likelihood":
        sets = cfg.resolved_scoring() == "label_set"
        return run_likelihood(
            host,
            v,
            samples,
            cache,
            sh,
            append_eot=cfg.append_eot,
            max_labels=cfg.max_labels if sets else None,
            batch_size=cfg.batch_size,
            progress=progress,
            on_batch=on_batch,
            label=label,
        )
    return run_generation(
        host,
        v,
        samples,
        cache,
        sh,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        progress=progress,
        on_batch=on_batch,
        label=label,
    )


def evaluate(
    host: ModelHost,
    base_id: str | Path,
    variants: list[Variant],
    samples: list[Any],
    out: str | Path,
    cfg: EvalConfig,
    *,
    val_samples: list[Any] | None = None,
    val_pool: list[Any] | None = None,
    train_labels: list[list[str]] | None = None,
    include_base: bool = True,
    progress: bool = True,
    on_batch: BatchHook | None = None,
    skipped_images: int = 0,
    allow_base_mismatch: bool = False,
) -> EvalResult:
    """Score the base and ``variants`` on ``samples``; upsert rows into ``out/leaderboard.csv``.

    Multi-label likelihood scores label sets by default (``cfg.scoring``, :mod:`.scoring`) and
    decides each label on its presence probability with per-label thresholds (the result's
    ``thresholds``); first-label scoring keeps one threshold. Multi-label thresholds are chosen
    on ``val_samples`` (a validation split, the same for every
    variant) or, without it, on ``val_pool`` (the train split): each variant on the books its
    training stages recorded as held out (:func:`variants.heldout_books`), else on a seeded draw
    of books (``cfg.val_fraction``, ``cfg.holdout_seed``). Each row's ``threshold_source`` says
    which.
    Raw outputs are cached under ``out/predictions``; details (per-class scores, confusion
    matrices, parse failures) go to ``out/details``; per-book metrics to ``out/by_book.csv``.

    Variants with exact weights (re-factorised sparse merges, full-output folders) are checked
    against the loaded base before anything is scored, then written into it while scored
    (:mod:`.inplace`). Classification leaderboards also get the trivial baselines' rows (majority
    label(s) and all labels, counted on ``train_labels``, else on ``val_pool``'s labels, else on
    the evaluated split itself — the row's ``scoring`` says which). Every row carries a Holm
    adjusted p over the variants compared against the same baseline.
    """
    if not samples:
        raise InputError(f"{cfg.dataset}/{cfg.split}: no samples to evaluate")
    cfg.check()
    task, mode = cfg.resolved_task(), cfg.resolved_mode()
    if mode == "likelihood" and cfg.resolved_scoring() != "label_set" and not cfg.append_eot:
        _refuse_prefix_labels(samples, f"{cfg.dataset}/{cfg.split}")
    out = Path(out)
    # the base's identity in cache keys and rows: its content fingerprint, else (a hub id, a
    # folder without safetensors weights) the hash of its name (DESIGN.md, Layers)
    base_fp = fingerprint(base_id) or hashlib.sha256(str(base_id).encode()).hexdigest()
    all_variants = (
        [Variant("base", "base", lineage="base", representation="base")] if include_base else []
    ) + variants
    for v in all_variants:  # before any scoring: a bad folder costs nothing
        if v.exact:
            check_exact(host.model, v, host.base_path, None if allow_base_mismatch else base_fp)
        if v.note:
            print(f"warning: {v.note}", file=sys.stderr)
    names = [v.name for v in all_variants]
    baseline = cfg.baseline or default_baseline(all_variants)
    if baseline not in names:
        raise InputError(f"--baseline: '{baseline}' is not among the variants {names}")
    sh = split_hash(samples)
    needs_val = (
        task == "multi"
        and mode == "likelihood"
        and cfg.multilabel == "threshold"
        and cfg.threshold is None
    )
    if needs_val and not val_samples and not val_pool:
        raise InputError(
            "multi-label threshold: no validation samples (hold out train books, "
            "or pass --threshold / --multilabel topk)"
        )
    vh = split_hash(val_samples or val_pool) if needs_val else ""
    scoring = cfg.resolved_scoring()
    infer = inference_key(host.processor, samples, cfg, mode, scoring, family=host.family)
    infer["load"] = load_key(host.model, host.processor)
    # batch size changes speed, not numbers: a re-run with another batch size replaces its rows
    settings = {k: v for k, v in asdict(cfg).items() if k != "batch_size"}
    config_hash = stable_hash(
        {
            **settings,
            "baseline": baseline,
            "split_hash": sh,
            "val_hash": vh,
            "task": task,
            "mode": mode,
            "load": infer["load"],
        }
    )

    # under accelerate launch each process scores whole pages of its share, into its own cache
    # part; after a barrier all read every part (:mod:`.distributed`)
    shard = current_shard()
    progress = progress and shard.is_main  # one set of bars, the main process's share
    results = []
    for v in all_variants:
        vhash = stable_hash([base_fp, v.content_hash, infer])
        cache = PredictionCache(out / "predictions", v.name, vhash, part=shard.part)
        scored = _score(host, v, shard.take(samples), cache, sh, cfg, mode, progress, on_batch)
        threshold, rep, per_label = cfg.threshold, ParseReport(), None
        source = (
            FIXED
            if (
                threshold is not None
                and task == "multi"
                and mode == "likelihood"
                and cfg.multilabel == "threshold"
            )
            else ""
        )
        val = h = None
        if mode == "likelihood" and needs_val:
            val, source = validation_for(v, cfg, val_samples, val_pool)
            h = split_hash(val)
            scored += _score(
                host,
                v,
                shard.take(val),
                cache,
                h,
                cfg,
                mode,
                progress,
                None,
                where=f"{cfg.dataset} threshold set",
            )
        if shard.world > 1:
            shard.barrier()
            cache = PredictionCache(out / "predictions", v.name, vhash, part=shard.part)
        if mode == "likelihood":
            if needs_val:
                threshold, per_label = _thresholds(cache, h, val, cfg, scoring)
            elif source == FIXED and scoring == "label_set":
                per_label = decide.LabelThresholds.fixed(threshold, samples[0].label_set)
            preds = from_likelihood(
                task,
                samples,
                cache,
                sh,
                length_norm=cfg.length_norm,
                multilabel=cfg.multilabel,
                threshold=threshold,
                thresholds=per_label.values(samples[0].label_set) if per_label else None,
            )
        else:
            preds, rep = from_generation(task, samples, cache, sh)
            judged = None
            if task == "vqa" and cfg.judge_url:
                preds, judged = _judged(preds, samples, cfg)
        results.append(
            VariantResult(
                v,
                preds,
                rep,
                threshold,
                scored,
                source,
                scoring,
                per_label,
                judged if mode != "likelihood" else None,
            )
        )

    if train_labels is None and val_pool:
        train_labels = [list(s.labels) for s in val_pool]
    trivial = trivial_predictions(task, samples, train_labels)
    for name, p in trivial:
        results.append(
            VariantResult(
                Variant(name, "trivial", lineage="trivial", representation="trivial"),
                p,
                ParseReport(),
                None,
                0,
                scoring=trivial.scoring.get(name, trivial.source),
            )
        )

    rows = _rows(
        results, baseline, cfg, task, mode, host.family, str(base_id), config_hash, sh, base_fp
    )
    books = book_map(samples)
    for row in rows:
        row["n_books"] = len(set(books.values())) if books else None
        row["skipped_images"] = skipped_images  # unreadable image files left out of the split
    add_holm(rows)
    path = out / "leaderboard.csv"
    if not shard.is_main:  # the main process writes what every process computed alike
        return EvalResult(rows, results, path)
    _write_details(out / "details", results, rows, cfg)
    # Holm over the whole family: rows of earlier runs with the same config stay in the CSV
    # (a re-run of some variants), so the adjustment is recomputed over all of them — under one
    # lock from the first write to the last, so a concurrent evaluation's rows are neither lost
    # nor left out of the family (upsert_rows takes the same lock again: re-entrant)
    with file_lock(path):
        path = upsert_rows(path, rows)
        board = read_rows(path)
        add_holm(board)
        upsert_rows(path, board)
    if books:
        # every identity column the leaderboard row has (base_id keys the upsert: without it a
        # second base's rows replaced the first's)
        common = {k: rows[0][k] for k in BY_BOOK_IDENTITY if k in rows[0]}
        metrics = [m for m in HEADLINE[task] if m != "judge_score"]
        write_by_book(
            out / "by_book.csv",
            by_book_rows(
                [(r.variant.name, r.preds) for r in results],
                books,
                None,
                metrics,
                titles=title_map(samples),
                **common,
            ),
        )
    return EvalResult(rows, results, path)


def _thresholds(
    cache: PredictionCache, h: str, val: list[Any], cfg: EvalConfig, scoring: str
) -> tuple[float, decide.LabelThresholds | None]:
    """The multi-label threshold(s) chosen on the validation samples ``val`` (cached under ``h``).

    Label sets: per-label thresholds on presence probabilities for macro-F1, each label's own or
    the shared one, compared out of fold by book (:func:`decide.choose_label_thresholds`).
    First-label scoring keeps its one threshold on the softmax over labels for example-F1.
    """
    if scoring == "label_set":
        labels = list(val[0].label_set)
        probs = [presence(cache.get(h, s.id), len(labels), cfg.length_norm) for s in val]
        lt = decide.choose_label_thresholds(
            probs, [s.labels for s in val], labels, groups=[book_of(s) for s in val]
        )
        return lt.global_threshold, lt
    return decide.choose_threshold(
        [label_values(cache.get(h, s.id), cfg.length_norm) for s in val],
        [s.labels for s in val],
        val[0].label_set,
    ), None


def validation_for(
    v: Variant, cfg: EvalConfig, val_samples: list[Any] | None, val_pool: list[Any] | None
) -> tuple[list[Any], str]:
    """The samples ``v``'s threshold is chosen on, and the row's ``threshold_source``."""
    if val_samples:
        return val_samples, VALIDATION_SPLIT
    assert val_pool is not None
    books, source = heldout_books(v, cfg.dataset)
    if books is None:
        return holdout_by_book(val_pool, cfg.val_fraction, cfg.holdout_seed), source
    keep = set(books)
    val = [s for s in val_pool if book_of(s) in keep]
    if not val:
        raise InputError(
            f"{v.name}: its stages held out books {books[:3]} of '{cfg.dataset}', "
            "but the train split given has none of them (another data folder?)"
        )
    return val, source


def _judged(preds: Predictions, samples: list[Any], cfg: EvalConfig) -> tuple[Predictions, Any]:
    from .judge import judge_report

    assert cfg.judge_model and cfg.judge_url  # EvalConfig.check ran before any generation
    report = judge_report(
        cfg.judge_url, cfg.judge_model, samples, list(preds.pred), protocol=cfg.judge_protocol
    )
    return Predictions(**{**preds.__dict__, "judge": report.values}), report


def _scoring_text(r: VariantResult, mode: str) -> str:
    """The row's ``scoring`` cell: how its predictions were made."""
    if r.variant.kind == "trivial":
        return r.scoring
    if mode != "likelihood":
        text = "generation"
        if r.judge is not None:
            from .judge import provenance

            prov = provenance(r.judge.protocol, r.judge.model)
            text += (
                f"; judge {r.judge.protocol} ({r.judge.model}, prompt sha256 "
                f"{str(prov.get('prompt_sha256', ''))[:12]}, {r.judge.unscored} unscored)"
            )
        return text
    return r.scoring


def _threshold_text(r: VariantResult) -> str:
    """The row's ``threshold`` cell: per-label thresholds (and whether each is its own or the
    shared one), or the one threshold."""
    if r.thresholds is not None:
        # "*" marks a label decided with the shared threshold rather than its own
        return ";".join(
            f"{lab}={t:.4g}" + ("*" if r.thresholds.choice.get(lab) == "global" else "")
            for lab, t in r.thresholds.thresholds.items()
        )
    return "" if r.threshold is None else f"{r.threshold:.4g}"


def _rows(
    results: list[VariantResult],
    baseline: str,
    cfg: EvalConfig,
    task: str,
    mode: str,
    family: str,
    base_id: str,
    config_hash: str,
    sh: str,
    base_fp: str,
) -> list[dict]:
    metrics = [
        m for m in HEADLINE[task] if m != "judge_score" or results[0].preds.judge is not None
    ]
    reps = replicate_indices(results[0].preds.groups, cfg.n_boot, cfg.seed)
    ref = next(r for r in results if r.variant.name == baseline)
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    sw = software()  # the row's provenance: versions and git_dirty (DESIGN.md, Outputs)
    # base_id is this machine's path (display only); base_name + base_fingerprint pair rows
    # of runs made elsewhere (leaderboard.compare)
    common = {
        "architecture": family,
        "base_id": base_id,
        **base_columns(base_id, base_fp),
        "dataset": cfg.dataset,
        "split": cfg.split,
        "task": task,
        "mode": mode,
        "baseline": baseline,
        "seed": cfg.seed,
        "n_boot": cfg.n_boot,
        "emomerge_version": __version__,
        "git_hash": git_hash(),
        "date": date,
        "config_hash": config_hash[:16],
        "split_hash": sh[:16],
        "versions": versions_text(sw),
        "git_dirty": sw["git_dirty"],
    }
    rows = []
    for r in results:
        v = r.variant
        est = bootstrap(r.preds, metrics, replicates=reps)
        row: dict[str, Any] = {
            **common,
            "variant": v.name,
            "kind": v.kind,
            "stage_index": v.stage_index,
            "lineage": v.lineage,
            "method": v.method,
            "method_params": v.method_params,
            "stages_merged": v.stages_merged,
            "n": len(r.preds),
            "n_groups": len(set(r.preds.groups)),
            "parse_failures": r.parse.failures,
            "threshold_source": r.threshold_source,
            "variant_hash": stable_hash([base_fp, v.content_hash])[:16],
            "representation": v.representation,
            "represented_rank": v.represented_rank,
            "lowrank_error_mean": v.lowrank_error_mean,
            "lowrank_error_max": v.lowrank_error_max,
            "scoring": _scoring_text(r, mode),
            "threshold": _threshold_text(r),
        }
        if task != "vqa":
            row["label_set"] = format_label_set(r.preds.label_set)
            row["per_label_f1"] = format_per_label(per_label_f1(r.preds))
        for m, e in est.items():
            row[m], row[f"{m}_lo"], row[f"{m}_hi"] = e.value, e.lo, e.hi
            if v.name != baseline:
                if cfg.paired_test == "mcnemar":
                    if m == MCNEMAR_METRIC[task]:
                        row[f"{m}_p"] = mcnemar(r.preds, ref.preds)
                else:
                    row[f"{m}_p"] = paired_bootstrap(r.preds, ref.preds, m, replicates=reps)[1]
        rows.append(row)
    return rows


def _write_details(
    folder: Path, results: list[VariantResult], rows: list[dict], cfg: EvalConfig
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for r, row in zip(results, rows):
        info = {
            "variant": r.variant.name,
            "dataset": cfg.dataset,
            "split": cfg.split,
            "scoring": r.scoring,
            "threshold": r.threshold,
            "thresholds": r.thresholds.thresholds if r.thresholds else None,
            "threshold_choice": r.thresholds.choice if r.thresholds else None,
            "judge": r.judge.to_dict() if r.judge is not None else None,
            "row": row,
            "parse": r.parse.to_dict(),
            "details": details(r.preds),
        }
        # one file per leaderboard row (its config hash in the name: DESIGN.md, Outputs)
        with atomic_file(folder / details_name(row)) as fh:
            fh.write(json.dumps(info, indent=1, ensure_ascii=False, default=str) + "\n")
