"""`labcommons instrument-tokens`: the secrets instrument computers use to check users in and out."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from labcommons.cli_support import console, database, fail
from labcommons.errors import DomainError

app = typer.Typer(no_args_is_help=True, help="Instrument tokens for check-in kiosks and interlocks.")


@app.command("create")
def create(
    instrument: Annotated[str, typer.Option("--instrument", help="Instrument code")],
    name: Annotated[str, typer.Option("--name", help="Where the token is used, e.g. 'PC next to the scope'")] = "",
) -> None:
    """Create a token for one instrument and print it once (only its hash is stored)."""
    from labcommons.booking import calendar, usage

    try:
        with database().unit_of_work() as session:
            found = calendar.find_instrument(session, instrument)
            row, secret = usage.create_instrument_token(session, found.id, name=name)
            console.print(f"token {row.id} for {found.code}; send it as 'Authorization: Instrument <token>'.")
            console.print("Copy it now: it will not be shown again.")
            # Unstyled on its own line so scripts can take the last line.
            console.print(secret, markup=False, highlight=False, soft_wrap=True)
    except DomainError as exc:
        raise fail(exc) from exc


@app.command("list")
def list_(instrument: Annotated[str | None, typer.Option("--instrument", help="Only this instrument")] = None) -> None:
    """List instrument tokens (never the secrets)."""
    from sqlalchemy import select

    from labcommons.booking import calendar, usage
    from labcommons.catalog.models import Instrument

    try:
        with database().unit_of_work(write=False) as session:
            instrument_id = calendar.find_instrument(session, instrument).id if instrument else None
            rows = usage.list_instrument_tokens(session, instrument_id)
            ids = {r.instrument_id for r in rows}
            found = session.execute(select(Instrument.id, Instrument.code).where(Instrument.id.in_(ids)))
            codes = {i: c for i, c in found}
    except DomainError as exc:
        raise fail(exc) from exc
    table = Table("id", "instrument", "name", "created", "revoked")
    for row in rows:
        revoked = row.revoked_at.isoformat(timespec="minutes") if row.revoked_at else ""
        table.add_row(str(row.id), codes.get(row.instrument_id, "?"), row.name,
                      row.created_at.isoformat(timespec="minutes"), revoked)
    console.print(table)


@app.command("revoke")
def revoke(token_id: Annotated[int, typer.Argument(help="The token's id (see list)")]) -> None:
    """Revoke a token: the instrument's computer can no longer check anyone in with it."""
    from labcommons.booking import usage

    try:
        with database().unit_of_work() as session:
            usage.revoke_instrument_token(session, token_id)
    except DomainError as exc:
        raise fail(exc) from exc
    console.print(f"revoked instrument token {token_id}")
