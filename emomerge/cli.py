"""The emomerge command line: assembly of the typer app only.

Each area registers its commands from its own module (``cli_merge``, ``cli_train``,
``cli_eval``); every command is a thin shell over one library function.
"""

import typer

from emomerge import __version__, cli_eval, cli_merge, cli_run, cli_train
from emomerge._cli_common import OneLineErrors, quiet_third_party


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


def root(
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="Keep other libraries' warnings, log lines and progress bars (silenced by default).",
    ),
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the emomerge version and exit.",
    ),
) -> None:
    """emomerge: train, merge and evaluate LoRA adapters of vision-language models."""
    if not verbose:
        quiet_third_party()


def version() -> None:
    """Print the emomerge version."""
    typer.echo(__version__)


def build_app() -> typer.Typer:
    """The app, its commands read from the registries now: a merge method registered before
    this call (``merging/registry.py``) is a command of the app it returns."""
    app = typer.Typer(
        cls=OneLineErrors,
        no_args_is_help=True,
        add_completion=False,
        help="emomerge: train, merge and evaluate LoRA adapters of vision-language models.",
    )
    app.callback()(root)
    app.command()(version)
    cli_merge.register(app)
    cli_train.register(app)
    cli_eval.register(app)
    cli_run.register(app)
    app.add_typer(cli_merge.lineage_app, name="lineage")
    return app


app = build_app()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``--adapters a b c`` style options are expanded for click."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    app(args=cli_merge.expand_variadic(args), prog_name="emomerge")


if __name__ == "__main__":
    main()
