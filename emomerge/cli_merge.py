"""CLI commands of the merging core (one command per method, merge, methods, inspect, export-mergekit)."""

import typer


def register(app: typer.Typer) -> None:
    """Add the merging commands to the emomerge app."""
