"""`labcommons backup` and `labcommons restore` (groundwork: filled in by the backup work)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the backup and restore commands to the top-level CLI."""
