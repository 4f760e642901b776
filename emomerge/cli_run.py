"""CLI commands of the experiment runner: ``run`` (an experiment YAML) and ``demo``.

    emomerge run experiments/qwen2_5_vl_7b.yaml --out runs/qwen2_5_vl_7b
    emomerge demo [--quick] [--out emomerge-demo]

Thin shells over :func:`emomerge.experiment.run.run_experiment` and
:func:`emomerge.experiment.demo.run_demo`: parse, call, print the table.
``python -m emomerge.cli_run`` runs the same commands without the assembled app.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from emomerge._cli_common import Quiet, show_progress, user_errors


def _print(result) -> None:
    typer.echo("")
    typer.echo(result.table.rstrip())
    typer.echo("")
    typer.echo(f"leaderboard: {result.leaderboard}")
    typer.echo(f"table:       {result.markdown}")
    typer.echo(f"plot:        {result.plot}")


@user_errors
def run_cmd(
    experiment: Path = typer.Argument(..., help="Experiment YAML (see experiments/)."),
    out: Path = typer.Option(None, "--out", help="Run folder (default: runs/<name>)."),
    progress: bool = typer.Option(
        True,
        "--progress/--no-progress",
        help="Show the progress display (when stderr is a terminal).",
    ),
    quiet: bool = Quiet,
    plan: bool = typer.Option(
        False,
        "--plan",
        help="Print what would be trained, merged and "
        "scored, and the projected scoring cost; run nothing.",
    ),
    seconds_per_example: float = typer.Option(
        1.18,
        "--seconds-per-example",
        help="With --plan: seconds of one scored example "
        "(default: a Qwen2.5-VL-7B page prompt on an H200).",
    ),
) -> None:
    """Train what is missing, merge, evaluate every variant; print the leaderboard.

    Re-running continues where a run stopped: stages, merges and predictions are reused by
    content hash, and an edited recipe recomputes only its merge and its scores.
    """
    from emomerge.experiment.config import load_experiment
    from emomerge.experiment.run import run_experiment

    if plan:
        from emomerge.experiment.plan import plan_experiment

        with tempfile.TemporaryDirectory(prefix="emomerge-recipes-") as tmp:
            exp = load_experiment(experiment, inline_dir=tmp)
            typer.echo(plan_experiment(exp, seconds_per_example).table(), nl=False)
        return

    if out is None:
        with tempfile.TemporaryDirectory(
            prefix="emomerge-recipes-"
        ) as tmp:  # only the name is needed
            out = Path("runs") / load_experiment(experiment, inline_dir=tmp).spec.name
    _print(
        run_experiment(experiment, out, progress=show_progress(progress, quiet), echo=typer.echo)
    )


@user_errors
def demo_cmd(
    quick: bool = typer.Option(
        False, "--quick", help="The CI-sized demo (19-44 s measured on 2 shared CPU cores)."
    ),
    out: Path = typer.Option(Path("emomerge-demo"), "--out", help="Demo folder."),
    progress: bool = typer.Option(
        True,
        "--progress/--no-progress",
        help="Show the progress display (when stderr is a terminal).",
    ),
    quiet: bool = Quiet,
) -> None:
    """The whole study on a tiny VLM and synthetic data: offline, CPU only, a few minutes."""
    from emomerge.experiment.demo import run_demo

    _print(run_demo(out, quick=quick, progress=show_progress(progress, quiet), echo=typer.echo))


def register(app: typer.Typer) -> None:
    """Add ``run`` and ``demo`` to the emomerge app."""
    app.command("run")(run_cmd)
    app.command("demo")(demo_cmd)


def main() -> None:
    app = typer.Typer(no_args_is_help=True, add_completion=False)
    register(app)
    app(prog_name="emomerge")


if __name__ == "__main__":
    main()
