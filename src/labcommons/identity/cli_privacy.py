"""`labcommons users export` and `labcommons users delete`: a user's personal data, for the platform operator
answering a request made outside the platform (by letter, by the user's institution)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from labcommons.cli_support import console, database, err, fail
from labcommons.errors import DomainError


def export(
    email: Annotated[str, typer.Argument(help="The user's e-mail address")],
    out: Annotated[Path | None, typer.Option("--out", help="Write to this file instead of standard output",
                                             dir_okay=False, writable=True)] = None,
) -> None:
    """Export everything the platform holds about a user as one JSON document."""
    from labcommons.identity import privacy, service

    try:
        with database().unit_of_work(write=False) as session:
            user = service.find_user(session, email)
            document = privacy.export_personal_data(session, user.id)
    except DomainError as exc:
        raise fail(exc) from exc
    text = json.dumps(document, ensure_ascii=False, indent=2)
    if out is None:
        typer.echo(text)
        return
    out.write_text(text + "\n", encoding="utf-8")
    table = Table(title=f"Personal data of user {document['profile']['id']} written to {out}")
    table.add_column("section")
    table.add_column("entries", justify="right")
    for name, value in document.items():
        if isinstance(value, list | dict) and name != "profile":
            table.add_row(name, str(len(value)))
    console.print(table)


def delete(
    email: Annotated[str, typer.Argument(help="The user's e-mail address")],
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: this cannot be undone")] = False,
) -> None:
    """Delete a user's personal data (pseudonymising the account; the ledger and audit log stay)."""
    from labcommons.identity import privacy, service

    if not yes:
        err.print("[red]error:[/red] deleting personal data cannot be undone; add --yes to confirm")
        raise typer.Exit(code=2)
    try:
        with database().unit_of_work() as session:
            user = service.find_user(session, email)
            summary = privacy.delete_personal_data(session, None, user.id, email)
    except privacy.DeletionBlocked as exc:
        table = Table(title="Deletion must wait", title_style="bold red")
        table.add_column("reason")
        table.add_column("concerns")
        for blocker in exc.blockers:
            table.add_row(blocker.message, ", ".join(blocker.items))
        err.print(table)
        raise typer.Exit(code=2) from exc
    except DomainError as exc:
        raise fail(exc) from exc
    table = Table(title=f"Personal data of user {summary.user_id} deleted")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, count in sorted(summary.counts.items()):
        table.add_row(name.replace("_", " "), str(count))
    console.print(table)


def register(users_app: typer.Typer) -> None:
    """Add the personal-data commands to `labcommons users`."""
    users_app.command("export")(export)
    users_app.command("delete")(delete)
