"""`labcommons users export` and `labcommons users delete` (groundwork: filled in by the privacy work)."""

from __future__ import annotations

import typer


def register(users_app: typer.Typer) -> None:
    """Add the personal-data commands to `labcommons users`."""
