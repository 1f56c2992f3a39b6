"""What every command group shares: the database from the settings, consoles, and error exits."""

from __future__ import annotations

import typer
from rich.console import Console

from labcommons.config import get_settings
from labcommons.db import Database
from labcommons.errors import DomainError

console = Console()
err = Console(stderr=True)


def database() -> Database:
    """The database at LABCOMMONS_DATABASE_URL."""
    settings = get_settings()
    return Database.from_url(settings.database_url, busy_timeout=settings.sqlite_busy_timeout_seconds)


def fail(exc: DomainError) -> typer.Exit:
    """Print a domain error and give the exit to raise (status 2)."""
    err.print(f"[red]error:[/red] {exc.message}" + (f" (field: {exc.field})" if exc.field else ""))
    return typer.Exit(code=2)
