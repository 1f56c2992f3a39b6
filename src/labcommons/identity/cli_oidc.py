"""`labcommons oidc-client …` (member systems signing in through the platform) and `labcommons oidc-keys …`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from labcommons.cli_support import console, database, fail
from labcommons.db import utcnow
from labcommons.errors import DomainError
from labcommons.identity import provider

app = typer.Typer(no_args_is_help=True)
keys_app = typer.Typer(no_args_is_help=True)


@app.command("add")
def client_add(
    name: Annotated[str, typer.Option(help="Name users see on the consent screen.")],
    redirect_uri: Annotated[list[str], typer.Option(help="Exact redirect URI; repeat for several.")],
    trusted: Annotated[bool, typer.Option(help="Skip the consent screen (members under agreement).")] = False,
) -> None:
    """Register a member system; prints its client_id and secret (the secret only this once)."""
    try:
        with database().unit_of_work() as session:
            client, secret = provider.register_client(session, name=name, redirect_uris=redirect_uri,
                                                      trusted=trusted)
            client_id = client.client_id
    except DomainError as exc:
        raise fail(exc) from exc
    console.print(f"client_id: {client_id}", highlight=False, soft_wrap=True)
    console.print(f"client_secret: {secret}", highlight=False, soft_wrap=True)
    console.print("[yellow]The secret is not stored; copy it now.[/yellow]")


@app.command("list")
def client_list() -> None:
    """Registered member systems."""
    table = Table("name", "redirect URIs", "trusted", "enabled")
    # The id must stay whole to be copied; the other columns give way on a narrow terminal.
    table.add_column("client_id", no_wrap=True, min_width=28)
    with database().unit_of_work(write=False) as session:
        for client in provider.list_clients(session):
            table.add_row(client.name, "\n".join(provider.redirect_uris_of(client)),
                          "yes" if client.trusted else "no", "yes" if client.enabled else "no", client.client_id)
    console.print(table)


def _set_enabled(client_id: str, enabled: bool) -> None:
    try:
        with database().unit_of_work() as session:
            provider.set_client_enabled(session, client_id, enabled)
    except DomainError as exc:
        raise fail(exc) from exc
    console.print(f"{client_id} {'enabled' if enabled else 'disabled'}")


@app.command("disable")
def client_disable(client_id: str) -> None:
    """Stop a member system from signing users in (its tokens stop working too)."""
    _set_enabled(client_id, False)


@app.command("enable")
def client_enable(client_id: str) -> None:
    """Let a disabled member system sign users in again."""
    _set_enabled(client_id, True)


@keys_app.command("list")
def keys_list() -> None:
    """Signing keys, newest last; "signing" marks the one in use."""
    now = utcnow()
    with database().unit_of_work(write=False) as session:
        keys = provider.list_keys(session)
    current = next((k.id for k in reversed(keys) if k.retired_at is None), None)
    # One line per key rather than a table: kids are long and must stay whole for copying.
    for key in keys:
        state = "signing" if key.id == current else "published" if provider.is_published(key, now) else "expired"
        retired = f"retired {key.retired_at.isoformat(timespec='seconds')}" if key.retired_at else ""
        console.print(f"{key.kid}  {state:<9}  created {key.created_at.isoformat(timespec='seconds')}  {retired}",
                      highlight=False, soft_wrap=True)


@keys_app.command("rotate")
def keys_rotate() -> None:
    """Sign with a new key; the old one stays published for the grace period so issued tokens still verify."""
    with database().unit_of_work() as session:
        kid = provider.rotate_keys(session).kid
    console.print(f"now signing with {kid}", highlight=False)


@keys_app.command("prune")
def keys_prune() -> None:
    """Delete keys retired longer ago than the grace period."""
    with database().unit_of_work() as session:
        count = provider.prune_keys(session)
    console.print(f"deleted {count} retired key(s)")
