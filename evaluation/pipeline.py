"""From paths to leaderboard rows: what ``emomerge evaluate`` (and the experiment runner) call.

Reads the split with the training module's readers, loads the base once, finds the variants,
optionally adds the leave-one-stage-out merges, carves the multi-label validation part out of
train by book, and runs :func:`runner.evaluate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emomerge.merging.errors import InputError

from .ablation import leave_one_stage_out
from .holdout import holdout_by_book
from .predict import ModelHost
from .runner import EvalConfig, EvalResult, evaluate
from .variants import Variant, discover


def load_split(dataset: str, data: str | Path, split: str, reader_task: str | None = None,
               **reader_opts: Any) -> list[Any]:
    """One split as samples, through ``emomerge.training.data.read_dataset``."""
    from emomerge.training.data import read_dataset

    return read_dataset(dataset, data, split, reader_task, **reader_opts)


def validation_part(dataset: str, data: str | Path, cfg: EvalConfig, reader_task: str | None,
                    train_split: str = "train", **reader_opts: Any) -> list[Any]:
    """The multi-label validation samples: train books held out (EmoComics35 has no val split)."""
    from emomerge.training.data import list_splits

    names = {s.lower(): s for s in list_splits(dataset, data, reader_task)}
    for cand in ("val", "validation", "dev"):
        if cand in names:  # a dataset with its own validation split uses it
            return load_split(dataset, data, names[cand], reader_task, **reader_opts)
    if train_split.lower() not in names:
        raise InputError(f"{data}: no '{train_split}' split to hold validation books out of")
    train = load_split(dataset, data, names[train_split.lower()], reader_task, **reader_opts)
    return holdout_by_book(train, cfg.val_fraction, cfg.seed)


def evaluate_paths(base: str | Path, variant_dirs: list[str | Path], data: str | Path,
                   out: str | Path, cfg: EvalConfig, *, reader_task: str | None = None,
                   reader_opts: dict[str, Any] | None = None, include_base: bool = True,
                   leave_one_stage_out_: bool = False, family: str | None = None,
                   dtype: str | None = None, device: str = "cpu", progress: bool = True,
                   host: ModelHost | None = None) -> EvalResult:
    """Evaluate the base and every variant under ``variant_dirs`` on one split of ``data``."""
    opts = dict(reader_opts or {})
    samples = load_split(cfg.dataset, data, cfg.split, reader_task, **opts)
    variants: list[Variant] = discover(list(variant_dirs)) if variant_dirs else []
    if leave_one_stage_out_:
        merged = [v for v in variants if v.kind == "merged"]
        if not merged:
            raise InputError("--leave-one-stage-out: no merged variant among --variants")
        for v in merged:
            variants += leave_one_stage_out(v, Path(out) / "ablations")
    val = None
    if (cfg.resolved_task() == "multi" and cfg.resolved_mode() == "likelihood"
            and cfg.multilabel == "threshold" and cfg.threshold is None):
        val = validation_part(cfg.dataset, data, cfg, reader_task, **opts)
    host = host or ModelHost.load(base, family=family, dtype=dtype, device=device)
    return evaluate(host, base, variants, samples, out, cfg, val_samples=val,
                    include_base=include_base, progress=progress)
