"""CLI commands of the evaluation module: ``evaluate`` and ``leaderboard show|compare|plot``.

    emomerge evaluate --base MODEL --variants adapters/ merges/ --dataset emoart --data DIR \\
        --split test --out results/
    emomerge leaderboard show results/leaderboard.csv --by macro_f1 --format markdown
    emomerge leaderboard compare A.csv B.csv
    emomerge leaderboard plot results/leaderboard.csv --out fig.png

Each command parses, calls one library function of ``emomerge.evaluation`` and prints.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from emomerge._cli_common import Quiet, check_dataset, resolve_device, show_progress, user_errors
from emomerge.merging.errors import InputError

leaderboard_app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Show, compare and plot leaderboard CSVs."
)


def check_numbers(limits: dict[str, tuple[int, int, int | None]]) -> None:
    """Every integer option within its bounds (``{flag: (value, low, high or None)}``)."""
    for flag, (value, low, high) in limits.items():
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"in [{low}, {high}]"
            raise InputError(f"{flag}: must be {bound}, got {value}")


#: Files and folders only a results folder holds (what ``evaluate`` writes and re-reads).
RESULTS_ENTRIES = ("leaderboard.csv", "by_book.csv", "predictions", "details", "ablations")
#: Files that make a folder a model, an adapter or an emomerge output of another kind.
OTHER_KINDS = {
    "adapter_config.json": "an adapter folder",
    "config.json": "a model folder",
    "emomerge.json": "an emomerge output (stage, merge or run)",
    # a run rewrites its leaderboard.csv from its own rows on every resume: rows added here
    # would be lost then
    "experiment.json": "an `emomerge run` folder (its leaderboard is the run's own rows)",
}


def check_results_folder(out: Path, inputs: list) -> None:
    """Refuse an ``--out`` that ``evaluate`` must not write into, before anything runs: a file,
    one of the inputs (or a folder inside one), a model / adapter / merge / run folder, or a folder
    whose leaderboard or by-book CSV is not one (it would only fail after the scoring).
    A missing folder, an empty one or an earlier results folder (a re-run resumes) are fine."""
    from emomerge.evaluation.bybook import FILENAME, read_by_book
    from emomerge.evaluation.leaderboard import read_rows

    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file, not a results folder")
    existing = next((p for p in out.absolute().parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise InputError(f"--out {out}: {existing} is a file, not a folder")
    target = out.resolve()
    for given in inputs:
        src = Path(given).resolve()
        if src.exists() and (target == src or src in target.parents):
            raise InputError(f"--out {out}: is inside the input {given}; results go elsewhere")
    if not out.is_dir():
        return
    for name, kind in OTHER_KINDS.items():
        if (out / name).exists():
            raise InputError(f"--out {out}: is {kind} ({name}), not a results folder")
    for name in RESULTS_ENTRIES[:2]:
        if (out / name).exists() and not (out / name).is_file():
            raise InputError(f"--out {out}: {name} is a folder, not a CSV")
    read_rows(out / "leaderboard.csv")  # one line naming it if it is not a leaderboard
    if (out / FILENAME).is_file():
        read_by_book(out / FILENAME)


@user_errors
def evaluate_cmd(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option("--data", help="The dataset's files (folder or file).")],
    base: str = typer.Option(..., "--base", help="Base model folder or hub id."),
    variants: Annotated[
        list[Path],
        typer.Option(
            "--variants",
            help="Adapter folders, --output full merge folders, or folders of them "
            "(several may follow one --variants).",
        ),
    ] = [],  # noqa: B006 (typer reads, never mutates, it)
    dataset: str = typer.Option(..., "--dataset", help="emocomics35, emoart, emid or mangavqa."),
    split: str = typer.Option("test", "--split", help="The split scored (train, val, test, ...)."),
    out: Annotated[
        Path,
        typer.Option("--out", help="Results folder (leaderboard.csv, predictions/, details/)."),
    ] = Path("results"),
    reader_task: str = typer.Option(None, "--task", help="Reader task (e.g. utterance, page)."),
    task_type: str = typer.Option(
        None, "--task-type", help="single, multi or vqa (default: from the dataset)."
    ),
    mode: str = typer.Option("auto", "--mode", help="auto, likelihood or generate."),
    baseline: str = typer.Option(
        None,
        "--baseline",
        help="Variant the paired test compares against (default: the last stage adapter).",
    ),
    paired_test: str = typer.Option("bootstrap", "--paired-test", help="bootstrap or mcnemar."),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples (at least 10)."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed (>= 0)."),
    multilabel: str = typer.Option(
        "threshold",
        "--multilabel",
        help="threshold (chosen on train books held out) or topk (k = gold count).",
    ),
    threshold: float = typer.Option(
        None, "--threshold", help="Fixed multi-label threshold, in [0, 1]."
    ),
    val_fraction: float = typer.Option(
        0.1,
        "--val-fraction",
        help="Share of train books drawn for the threshold when no stage recorded a hold-out.",
    ),
    holdout_seed: int = typer.Option(0, "--holdout-seed", help="Seed of that draw."),
    scoring: str = typer.Option(
        "auto",
        "--scoring",
        help="Multi-label likelihood: label_set "
        "(every label set scored as a whole answer; each label decided "
        "on its presence probability; the default) or first_label.",
    ),
    max_labels: int = typer.Option(
        3, "--max-labels", help="label_set: the largest label set scored."
    ),
    length_norm: bool = typer.Option(
        False, "--length-norm/--no-length-norm", help="Mean log-prob per token instead of the sum."
    ),
    append_eot: bool = typer.Option(
        False,
        "--append-eot/--no-append-eot",
        help="Score the end-of-turn token after each label too.",
    ),
    lowrank_merges: bool = typer.Option(
        False,
        "--lowrank-merges",
        help="Score re-factorised "
        "sparse merges as their rank-limited adapters instead "
        "of exactly (rows say lowrank with the error).",
    ),
    max_new_tokens: int = typer.Option(
        32, "--max-new-tokens", help="Generation: the longest answer (at least 1)."
    ),
    batch_size: int = typer.Option(
        8, "--batch-size", help="Examples per forward pass (speed only: the rows do not change)."
    ),
    include_base: bool = typer.Option(
        True, "--include-base/--no-base", help="Score the base model alone as a row too."
    ),
    leave_one_stage_out: bool = typer.Option(
        False,
        "--leave-one-stage-out",
        help="Also score each merge rebuilt without each of its stages.",
    ),
    judge_url: str = typer.Option(
        None, "--judge-url", help="OpenAI-compatible endpoint (MangaVQA judge; off by default)."
    ),
    judge_model: str = typer.Option(
        None, "--judge-model", help="The judge's model name at --judge-url."
    ),
    judge_protocol: str = typer.Option(
        "binary",
        "--judge-protocol",
        help="binary, or mangavqa-1-10 (the published MangaVQA 1-10 prompt).",
    ),
    image_root: Annotated[
        Path | None,
        typer.Option("--image-root", help="Where the images live (e.g. Manga109 for MangaVQA)."),
    ] = None,
    allow_missing_images: bool = typer.Option(
        False, "--allow-missing-images", help="Score items whose image file is missing without it."
    ),
    family: str = typer.Option(
        None, "--family", help="Model family (default: from the base's config)."
    ),
    dtype: str = typer.Option(
        None,
        "--dtype",
        help="float32, bfloat16 or float16 (default: the precision training picks for the device).",
    ),
    device: str = typer.Option(
        "auto",
        "--device",
        help="auto (cuda when a GPU is visible, else cpu), cpu, cuda, cuda:N or mps.",
    ),
    allow_base_mismatch: bool = typer.Option(
        False,
        "--allow-different-bases",
        "--allow-base-mismatch",
        help="Score variants "
        "recorded as trained on another base than --base "
        "(--allow-base-mismatch: the older spelling).",
    ),
    progress: bool = typer.Option(
        True,
        "--progress/--no-progress",
        help="Show the progress display (when stderr is a terminal).",
    ),
    quiet: bool = Quiet,
) -> None:
    """Score the base, every stage adapter and every merge; append rows to the leaderboard.

    Bad input (a number out of range, a variant trained on another base, with non-finite or
    truncated tensors, an --out that is a file or a model folder) stops before any scoring."""
    from emomerge.evaluation.leaderboard import show
    from emomerge.evaluation.pipeline import evaluate_paths
    from emomerge.evaluation.runner import EvalConfig

    check_dataset(dataset)  # before --task, which depends on it
    device = resolve_device(device)
    extra = [a for a in ctx.args]
    if any(a.startswith("-") for a in extra):
        raise InputError(f"unknown option {next(a for a in extra if a.startswith('-'))}")
    choices = {
        "--mode": (mode, ("auto", "likelihood", "generate")),
        "--paired-test": (paired_test, ("bootstrap", "mcnemar")),
        "--multilabel": (multilabel, ("threshold", "topk")),
        "--scoring": (scoring, ("auto", "label_set", "first_label")),
        "--task-type": (task_type, (None, "single", "multi", "vqa")),
    }
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise InputError(f"{flag}: expected one of {[a for a in allowed if a]}, got '{value}'")
    check_numbers(
        {
            "--n-boot": (n_boot, 10, None),
            "--seed": (seed, 0, None),
            "--holdout-seed": (holdout_seed, 0, None),
            "--max-labels": (max_labels, 1, None),
            "--max-new-tokens": (max_new_tokens, 1, None),
            "--batch-size": (batch_size, 1, None),
        }
    )
    if threshold is not None and not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise InputError(f"--threshold: must be a number in [0, 1], got {threshold}")
    if not (math.isfinite(val_fraction) and 0.0 < val_fraction < 1.0):
        raise InputError(f"--val-fraction: must be a number in (0, 1), got {val_fraction}")
    check_results_folder(
        out, [Path(base), data, *variants, *map(Path, extra), *([image_root] if image_root else [])]
    )
    cfg = EvalConfig(
        dataset=dataset,
        split=split,
        task=task_type,
        mode=mode,
        length_norm=length_norm,
        append_eot=append_eot,
        multilabel=multilabel,
        threshold=threshold,
        val_fraction=val_fraction,
        holdout_seed=holdout_seed,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        n_boot=n_boot,
        seed=seed,
        baseline=baseline,
        paired_test=paired_test,
        judge_url=judge_url,
        judge_model=judge_model,
        judge_protocol=judge_protocol,
        scoring=scoring,
        max_labels=max_labels,
    )
    opts = {"allow_missing_images": allow_missing_images}
    if image_root is not None:
        opts["image_root"] = image_root
    result = evaluate_paths(
        base,
        [*variants, *map(Path, extra)],
        data,
        out,
        cfg,
        reader_task=reader_task,
        reader_opts=opts,
        include_base=include_base,
        leave_one_stage_out_=leave_one_stage_out,
        family=family,
        dtype=dtype,
        device=device,
        exact=not lowrank_merges,
        allow_base_mismatch=allow_base_mismatch,
        progress=show_progress(progress, quiet),
    )
    from emomerge.evaluation.distributed import current_shard

    if not current_shard().is_main:  # under accelerate launch: the main process reports
        return
    typer.echo(f"{len(result.rows)} rows → {result.leaderboard}")
    typer.echo(show(result.leaderboard, fmt="markdown").rstrip())


@user_errors
def show_cmd(
    path: Annotated[Path, typer.Argument(help="A leaderboard CSV.")],
    by: str = typer.Option(None, "--by", help="Sort by this column, best first."),
    fmt: str = typer.Option("markdown", "--format", help="markdown, csv or json."),
    by_book: bool = typer.Option(
        False,
        "--by-book",
        help="Variants × books of one metric, from the by_book.csv beside the leaderboard.",
    ),
    metric: str = typer.Option(
        None, "--metric", help="With --by-book: the metric shown (default macro_f1)."
    ),
) -> None:
    """Print a leaderboard (metrics with their 95% intervals, raw and Holm-adjusted p-values;
    * marks a Holm-adjusted p < 0.05)."""
    from emomerge.evaluation.leaderboard import read_rows, show

    if by_book:
        from emomerge.evaluation.bybook import FILENAME, show_by_book

        if by is not None:
            raise InputError("--by: not available with --by-book (rows are variants)")
        read_rows(path)  # need not exist, but a file there must be a leaderboard
        typer.echo(show_by_book(path.parent / FILENAME, metric=metric, fmt=fmt), nl=False)
        return
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if metric is not None:
        raise InputError("--metric: only with --by-book")
    typer.echo(show(path, by=by, fmt=fmt), nl=False)


@user_errors
def compare_cmd(
    a: Annotated[Path, typer.Argument(help="Leaderboard A.")],
    b: Annotated[Path, typer.Argument(help="Leaderboard B.")],
    fmt: str = typer.Option("markdown", "--format", help="markdown, csv or json."),
) -> None:
    """Two leaderboards side by side per variant and dataset, with Δ = B − A and its unpaired
    95% interval; rows pair on architecture, base (content fingerprint, else name), variant,
    dataset and split. A count line on stderr says how many rows matched and which did not."""
    from emomerge.evaluation.leaderboard import compare_rows, format_table

    for p in (a, b):
        if not p.is_file():
            raise InputError(f"{p}: no such file")
    c = compare_rows(a, b)
    typer.echo(format_table(c.header, c.body, fmt), nl=False)
    sys.stderr.write(c.note(f"A ({a})", f"B ({b})") + "\n")


#: What ``leaderboard plot --out`` may write (matplotlib picks the format by the suffix).
PLOT_SUFFIXES = {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml"}


def check_plot_target(out: Path, inputs: list[Path]) -> None:
    """Refuse a plot ``--out`` before reading anything: a suffix matplotlib would not write, a
    folder, one of the leaderboards, or an existing file that is not a plot of that format
    (an earlier plot is replaced); the confusion-matrix folder beside it must not be a file."""
    if out.suffix.lower() not in PLOT_SUFFIXES:
        raise InputError(f"--out {out}: expected a .png, .pdf or .svg file name")
    if out.is_dir():
        raise InputError(f"--out {out}: is a folder, not a plot file")
    if any(out.resolve() == p.resolve() for p in inputs):
        raise InputError(f"--out {out}: is one of the leaderboards read")
    if out.exists():
        with out.open("rb") as fh:
            head = fh.read(8)
        if not head.startswith(PLOT_SUFFIXES[out.suffix.lower()]):
            raise InputError(
                f"--out {out}: exists and is not a {out.suffix.lower()[1:]} plot "
                "(only an earlier plot is replaced)"
            )
    cm_dir = out.with_name(out.stem + "_confusion")
    if cm_dir.exists() and not cm_dir.is_dir():
        raise InputError(f"--out {out}: {cm_dir} (where confusion matrices go) is a file")
    existing = next(p for p in out.absolute().parents if p.exists())
    if not existing.is_dir():
        raise InputError(f"--out {out}: {existing} is a file, not a folder")


@user_errors
def plot_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Leaderboard CSV(s).")],
    out: Annotated[Path, typer.Option("--out", help="Plot to write (.png, .pdf or .svg).")],
    metric: str = typer.Option(
        None,
        "--metric",
        help="Metric column plotted (default: each "
        "evaluation set's headline, macro-F1 or char-F1).",
    ),
    dataset: str = typer.Option(None, "--dataset", help="Only this dataset's rows."),
    kinds: Annotated[
        list[str],
        typer.Option(
            "--kinds",
            help="Only rows of these kinds, comma-separated (base, trivial, "
            "single-stage, stage, merged, chain-ablation, merge-ablation); said in the "
            "title. Default: every row.",
        ),
    ] = [],  # noqa: B006 (typer reads, never mutates, it)
    confusion: bool = typer.Option(
        True, "--confusion/--no-confusion", help="Also write confusion-matrix PNGs per variant."
    ),
) -> None:
    """Every row's headline metric with its 95% interval, one panel per dataset (variants on the
    same rows), the baseline dashed, * for a Holm-adjusted p < 0.05, n / seeds / replicates in
    the caption: the figure `emomerge run` writes. Confusion matrices per variant."""
    from emomerge.experiment.plots import plot_confusions, plot_leaderboard

    for p in paths:
        if not p.is_file():
            raise InputError(f"{p}: no such file")
    check_plot_target(out, paths)
    wanted = [k.strip() for item in kinds for k in item.split(",") if k.strip()]
    fig = plot_leaderboard(paths, out, metric=metric, dataset=dataset, kinds=wanted or None)
    typer.echo(f"wrote {fig}")
    if confusion:
        cm_dir = out.with_name(out.stem + "_confusion")
        written = [
            w
            for p in paths
            if (p.parent / "details").is_dir()
            for w in plot_confusions(p.parent / "details", cm_dir)
        ]
        if written:
            typer.echo(f"wrote {len(written)} confusion matrices to {cm_dir}")


def register(app: typer.Typer) -> None:
    """Add the evaluation commands to the emomerge app."""
    app.command("evaluate", context_settings={"allow_extra_args": True})(evaluate_cmd)
    leaderboard_app.command("show")(show_cmd)
    leaderboard_app.command("compare")(compare_cmd)
    leaderboard_app.command("plot")(plot_cmd)
    app.add_typer(leaderboard_app, name="leaderboard")
