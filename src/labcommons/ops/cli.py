"""`labcommons backup PATH` and `labcommons restore PATH --yes` for the database at LABCOMMONS_DATABASE_URL."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from labcommons.cli_support import console, database, err, fail
from labcommons.config import get_settings
from labcommons.errors import DomainError
from labcommons.ops import backup as service

PHASES = {"copy": "copying pages", "dump": "dumping tables", "restore": "restoring", "verify": "verifying audit chain"}

PgBin = Annotated[Path | None, typer.Option("--pg-bin", help="Directory of pg_dump/pg_restore (default: PATH, then "
                                                               "/usr/lib/postgresql/*/bin, newest first)")]


@contextmanager
def _progress() -> Iterator[Callable[[str, int, int | None], None]]:
    tasks: dict[str, TaskID] = {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), console=err,
                  transient=True) as progress:
        def report(phase: str, done: int, total: int | None) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(PHASES.get(phase, phase), total=total)
            progress.update(tasks[phase], completed=done, total=total)

        yield report


def _summary(manifest: service.Manifest, title: str) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("", style="bold")
    table.add_column("", overflow="fold")
    table.add_row("dialect", f"{manifest.dialect} (server {manifest.server_version}, {manifest.tool})")
    table.add_row("created (UTC)", manifest.created_at.strftime("%Y-%m-%d %H:%M:%S"))
    table.add_row("schema revision", manifest.alembic_revision)
    table.add_row("tables / rows", f"{len(manifest.tables)} / {manifest.rows}")
    table.add_row("size", f"{manifest.size_bytes:,} bytes")
    table.add_row("sha256", manifest.sha256)
    return table


def _failed(exc: Exception) -> typer.Exit:
    # Errors of the database, the driver or the file system: the message says what happened, never a traceback.
    err.print(f"[red]error:[/red] {type(exc).__name__}: {exc}")
    return typer.Exit(code=2)


def backup_command(
    path: Annotated[Path, typer.Argument(help="The dump to write; its manifest goes to PATH.manifest.json")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing backup at PATH")] = False,
    pg_bin: PgBin = None,
) -> None:
    """Back up the whole database while the application keeps running (SQLite online backup, or pg_dump)."""
    db = database()
    try:
        with _progress() as report:
            result = service.backup(db.engine, path, overwrite=force, progress=report, pg_bin=pg_bin,
                                    busy_timeout=get_settings().sqlite_busy_timeout_seconds)
    except DomainError as exc:
        raise fail(exc) from exc
    except (OSError, sqlite3.Error, SQLAlchemyError) as exc:
        raise _failed(exc) from exc
    finally:
        db.dispose()
    console.print(_summary(result.manifest, "Backup written"))
    console.print(f"dump: [bold]{result.path}[/bold]\nmanifest: [bold]{result.manifest_path}[/bold]",
                  highlight=False)


def restore_command(
    path: Annotated[Path, typer.Argument(help="The dump written by `labcommons backup`")],
    yes: Annotated[bool, typer.Option("--yes", help="Confirm that every row of the database is replaced")] = False,
    pg_bin: PgBin = None,
) -> None:
    """Replace the whole database by a backup (stop the application first), then check and verify it."""
    db = database()
    where = db.engine.url.render_as_string(hide_password=True)
    try:
        if not yes:
            manifest = service.verify_backup(path, dialect=db.engine.dialect.name)
            console.print(_summary(manifest, "Backup verified"))
            err.print(f"[red]refused:[/red] restore replaces every row of {where}; stop the application and run "
                      "again with --yes")
            raise typer.Exit(code=2)
        with _progress() as report:
            result = service.restore(db.engine, path, confirmed=True, progress=report, pg_bin=pg_bin,
                                     busy_timeout=get_settings().sqlite_busy_timeout_seconds)
    except DomainError as exc:
        raise fail(exc) from exc
    except (OSError, sqlite3.Error, SQLAlchemyError) as exc:
        raise _failed(exc) from exc
    finally:
        db.dispose()
    console.print(_summary(result.manifest, f"Restored into {where}"))
    console.print(f"row counts match the manifest: {len(result.counts)} tables, {sum(result.counts.values())} rows")
    if result.upgraded_from:
        console.print(f"schema upgraded from {result.upgraded_from} to {result.revision}")
    audit = result.audit
    if audit.ok:
        console.print(f"audit chain ok: {audit.entries} entries, head {audit.last_seq}:{audit.last_hash}",
                      soft_wrap=True)
        return
    for problem in audit.problems[:10]:
        err.print(f"  entry {problem.seq}: {problem.kind}: {problem.detail}")
    err.print(f"[red]audit chain BROKEN[/red] after restore: {len(audit.problems)} problem(s) in {audit.entries} "
              "entries (the data is restored; is LABCOMMONS_AUDIT_KEY / the secret key the one of the backed-up "
              "installation?)")
    raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Add the backup and restore commands to the top-level CLI."""
    app.command("backup")(backup_command)
    app.command("restore")(restore_command)
