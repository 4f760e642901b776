"""CLI commands of the training module (train, data inspect, export-llamafactory)."""

import typer


def register(app: typer.Typer) -> None:
    """Add the training commands to the emomerge app (filled in by the training work)."""
