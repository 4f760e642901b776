"""From paths to leaderboard rows: what ``emomerge evaluate`` (and the experiment runner) call.

Reads the split with the training module's readers, loads the base once, finds the variants,
optionally adds the leave-one-stage-out merges, reads the data the multi-label threshold is
chosen on (a validation split, or the train split whose held-out books each variant's stages
recorded), and runs :func:`runner.evaluate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emomerge.merging.errors import InputError

from .ablation import ablation_names, leave_one_stage_out
from .predict import ModelHost
from .runner import EvalConfig, EvalResult, evaluate
from .variants import Variant, default_baseline, discover


def load_checked(dataset: str, data: str | Path, split: str, reader_task: str | None = None,
                 **reader_opts: Any) -> tuple[list[Any], int]:
    """The split without samples whose images do not decode, and how many image files were
    skipped (``skipped_images`` in the rows); more than 5 % unreadable is one line."""
    from emomerge.training.data import read_checked

    return read_checked(dataset, data, split, reader_task, **reader_opts)


def load_split(dataset: str, data: str | Path, split: str, reader_task: str | None = None,
               **reader_opts: Any) -> list[Any]:
    """One split as samples, through ``emomerge.training.data.read_dataset``."""
    from emomerge.training.data import read_dataset

    return read_dataset(dataset, data, split, reader_task, **reader_opts)


def validation_data(dataset: str, data: str | Path, reader_task: str | None,
                    train_split: str = "train",
                    **reader_opts: Any) -> tuple[list[Any] | None, list[Any] | None]:
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
    return None, load_checked(dataset, data, names[train_split.lower()], reader_task,
                              **reader_opts)[0]


def train_labels(dataset: str, data: str | Path, reader_task: str | None,
                 pool: list[Any] | None = None, **reader_opts: Any) -> list[list[str]] | None:
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
        return [list(s.labels) for s in load_split(dataset, data, names["train"], reader_task,
                                                   **reader_opts)]
    except InputError:
        return None


def needs_validation(cfg: EvalConfig) -> bool:
    """Whether ``cfg`` chooses a multi-label threshold on validation data."""
    return (cfg.resolved_task() == "multi" and cfg.resolved_mode() == "likelihood"
            and cfg.multilabel == "threshold" and cfg.threshold is None)


def evaluate_paths(base: str | Path, variant_dirs: list[str | Path], data: str | Path,
                   out: str | Path, cfg: EvalConfig, *, reader_task: str | None = None,
                   reader_opts: dict[str, Any] | None = None, include_base: bool = True,
                   leave_one_stage_out_: bool = False, family: str | None = None,
                   dtype: str | None = None, device: str = "cpu", progress: bool = True,
                   host: ModelHost | None = None, exact: bool = True) -> EvalResult:
    """Evaluate the base and every variant under ``variant_dirs`` on one split of ``data``.

    ``exact``: re-factorised sparse merges are scored exactly (recomputed from their inputs and
    written into the loaded base); False scores their adapters as written (rows say lowrank).
    """
    cfg.check()
    opts = dict(reader_opts or {})
    samples, skipped = load_checked(cfg.dataset, data, cfg.split, reader_task, **opts)
    variants: list[Variant] = discover(list(variant_dirs), exact=exact) if variant_dirs else []
    merged = [v for v in variants if v.kind == "merged"] if leave_one_stage_out_ else []
    if leave_one_stage_out_ and not merged:
        raise InputError("--leave-one-stage-out: no merged variant among --variants")
    # check the baseline before building any ablation merge (minutes at real size)
    names = (["base"] if include_base else []) + [v.name for v in variants] \
        + [n for v in merged for n in ablation_names(v)]
    baseline = cfg.baseline or default_baseline(
        ([Variant("base", "base")] if include_base else []) + variants)
    if baseline not in names:
        raise InputError(f"--baseline: '{baseline}' is not among the variants {names}")
    for v in merged:
        variants += leave_one_stage_out(v, Path(out) / "ablations", exact=exact)
    val = pool = None
    if needs_validation(cfg):
        val, pool = validation_data(cfg.dataset, data, reader_task, **opts)
    labels = train_labels(cfg.dataset, data, reader_task, pool, **opts) \
        if cfg.resolved_task() != "vqa" else None
    if host is None and (Path(base) / "config.json").is_file():
        from .inplace import check_against_base_folder

        check_against_base_folder([v for v in variants if v.exact], base)  # before loading it
    host = host or ModelHost.load(base, family=family, dtype=dtype, device=device)
    return evaluate(host, base, variants, samples, out, cfg, val_samples=val, val_pool=pool,
                    train_labels=labels, include_base=include_base, progress=progress,
                    skipped_images=skipped)
