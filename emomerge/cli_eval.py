"""CLI commands of the evaluation module (evaluate, leaderboard)."""

import typer


def register(app: typer.Typer) -> None:
    """Add the evaluation commands to the emomerge app (filled in by the evaluation work)."""
