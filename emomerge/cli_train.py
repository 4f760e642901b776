"""CLI commands of the training module (train, data inspect, export-llamafactory)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from emomerge._cli_common import Quiet, check_dataset, show_progress, user_errors

data_app = typer.Typer(no_args_is_help=True, help="Inspect or generate datasets.")


@user_errors
def _train(curriculum: Path, out: Path, progress: bool, max_bad_image_share: float | None) -> None:
    import math

    from emomerge.merging.errors import InputError
    from emomerge.training.trainer import train_curriculum

    if max_bad_image_share is not None and not math.isfinite(max_bad_image_share):
        raise InputError(
            f"--max-bad-image-share: must be a number in [0, 1], got {max_bad_image_share}"
        )
    for folder in train_curriculum(
        curriculum, out, progress=progress, max_bad_image_share=max_bad_image_share
    ):
        typer.echo(str(folder))


def train(
    curriculum: Path = typer.Argument(..., help="Curriculum YAML."),
    out: Path = typer.Option(..., "--out", help="Run folder (adapters/<stage>/ inside)."),
    progress: bool = typer.Option(
        True,
        "--progress/--no-progress",
        help="Show the progress display (when stderr is a terminal).",
    ),
    max_bad_image_share: float = typer.Option(
        None,
        "--max-bad-image-share",
        min=0.0,
        max=1.0,
        help="Share of a stage's image files that may be unreadable (skipped with a warning, "
        "counted in emomerge.json as dataset.skipped_images) before training stops "
        "[default: 0.05].",
    ),
    quiet: bool = Quiet,
) -> None:
    """Train every stage of a curriculum (finished stages in --out are kept, not redone).

    A finished stage with other data, settings or parent adapter is refused, naming what differs.
    The same curriculum and seed give byte-identical adapters on CPU, also across a resume.
    """
    _train(curriculum, out, show_progress(progress, quiet), max_bad_image_share)


def _print_inspect(report: dict) -> None:
    typer.echo(f"{report['dataset']} at {report['path']}")
    for split, r in report["splits"].items():
        extra = "".join(f", {k} {r[k]}" for k in ("pages", "utterances") if k in r)
        typer.echo(f"[{split}] samples {r['samples']}{extra}, missing images {r['missing_images']}")
        typer.echo("  labels: " + ", ".join(f"{k} {v}" for k, v in r["label_counts"].items()))
        typer.echo(
            "  labels per item: "
            + ", ".join(f"{k}: {v}" for k, v in r["multi_label_counts"].items())
        )
        repairs = ", ".join(f"{k} {v}" for k, v in r["repairs"].items()) or "none"
        typer.echo(f"  parse repairs: {repairs}")


@data_app.command("inspect")
@user_errors
def inspect(
    name: str = typer.Argument(..., help="emocomics35, emoart, emid or mangavqa."),
    path: Path = typer.Argument(..., help="The dataset's file or folder, as published."),
    task: str = typer.Option(None, "--task", help="Task (default: the dataset's first)."),
    image_root: Path = typer.Option(None, "--image-root", help="Where the images live."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Per split: samples, label counts, multi-label counts, missing images, parse repairs."""
    from emomerge.training.data import inspect_dataset

    check_dataset(name, "")
    opts = {"image_root": image_root} if image_root else {}
    report = inspect_dataset(name, path, task, **opts)
    if as_json:
        typer.echo(json.dumps(report, ensure_ascii=False))
    else:
        _print_inspect(report)


@data_app.command("synthetic")
@user_errors
def synthetic(
    name: str = typer.Argument(..., help="emocomics35, emoart, emid or mangavqa."),
    out: Path = typer.Argument(..., help="Folder to write the dataset into."),
    n: int = typer.Option(24, "--n", help="Number of items (pages, records, rows)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the generator (same seed, same files)."),
) -> None:
    """Write a small synthetic dataset in the dataset's published format."""
    from emomerge.training.data.synthetic import write_synthetic

    typer.echo(str(write_synthetic(name, out, n=n, seed=seed)))


@user_errors
def _export(curriculum: Path, out: Path, precision: str | None) -> None:
    from emomerge.training.export_llamafactory import export_llamafactory

    typer.echo(str(export_llamafactory(curriculum, out, precision=precision)))


def export_llamafactory(
    curriculum: Path = typer.Argument(..., help="Curriculum YAML."),
    out: Path = typer.Option(..., "--out", help="Export folder (must not exist or be empty)."),
    precision: str = typer.Option(
        None,
        "--precision",
        help="bf16, fp16 or fp32 for the machine that trains (default: train.dtype, else this machine: bf16 on a CUDA GPU that has it, fp16 on one without, fp32 on CPU).",
    ),
) -> None:
    """Write sharegpt JSONL, dataset_info.json, one LLaMA-Factory YAML per stage and run.sh."""
    _export(curriculum, out, precision)


@user_errors
def _tiny(family: str, out: Path, seed: int) -> None:
    from emomerge.training.models.tiny import build_tiny_vlm

    typer.echo(str(build_tiny_vlm(family, out, seed=seed)))


def tiny_model(
    family: str = typer.Argument(
        ..., help="qwen2_5_vl, qwen3_vl, mllama, llava, llava_next, pixtral."
    ),
    out: Path = typer.Argument(..., help="Folder to write the model into."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
) -> None:
    """Build a tiny random VLM of a family offline (for demos and tests)."""
    _tiny(family, out, seed)


def register(app: typer.Typer) -> None:
    """Add the training commands to the emomerge app."""
    app.command("train")(train)
    app.command("export-llamafactory")(export_llamafactory)
    app.command("tiny-model")(tiny_model)
    app.add_typer(data_app, name="data")
