"""`labcommons idp ...`: upstream OpenID Connect providers users sign in with, and merging accounts."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from labcommons.cli_support import console, database, fail
from labcommons.errors import DomainError
from labcommons.identity import federation

app = typer.Typer(no_args_is_help=True)


@app.command("add")
def add(
    name: Annotated[str, typer.Option(help="Short slug used in URLs, e.g. sc-ids.")],
    region: Annotated[str, typer.Option(help="Region code, e.g. SC.")],
    issuer: Annotated[str, typer.Option(help="Issuer URL (https; plain http on loopback only).")],
    client_id: Annotated[str, typer.Option()],
    client_secret: Annotated[str, typer.Option()] = "",
    display_name_zh: Annotated[str, typer.Option()] = "",
    display_name_en: Annotated[str, typer.Option()] = "",
    trusted_for_linking: Annotated[bool, typer.Option(
        help="Let a verified e-mail from this provider join an existing account.")] = False,
) -> None:
    """Register a provider; its discovery document is fetched at first sign-in."""
    try:
        with database().unit_of_work() as session:
            provider = federation.add_provider(
                session, name=name, region_code=region, issuer=issuer, client_id=client_id,
                client_secret=client_secret, display_name_zh=display_name_zh, display_name_en=display_name_en,
                trusted_for_linking=trusted_for_linking,
            )
            console.print(f"added [bold]{provider.name}[/bold] ({provider.region_code}) {provider.issuer}")
            console.print(f"register this redirect URI with the provider: {federation.redirect_uri(provider.name)}")
    except DomainError as exc:
        raise fail(exc) from exc


@app.command("list")
def list_() -> None:
    """Every provider, enabled or not."""
    with database().unit_of_work(write=False) as session:
        providers = federation.list_providers(session)
        table = Table("name", "region", "issuer", "client id", "trusted for linking", "enabled", "display name")
        for p in providers:
            table.add_row(p.name, p.region_code, p.issuer, p.client_id, "yes" if p.trusted_for_linking else "no",
                          "yes" if p.enabled else "no", p.display_name_zh or p.display_name_en)
    console.print(table)


def _set_enabled(name: str, enabled: bool) -> None:
    try:
        with database().unit_of_work() as session:
            federation.set_provider_enabled(session, name, enabled)
    except DomainError as exc:
        raise fail(exc) from exc
    console.print(f"{name} {'enabled' if enabled else 'disabled'}")


@app.command("enable")
def enable(name: str) -> None:
    """Offer the provider on the sign-in page again."""
    _set_enabled(name, True)


@app.command("disable")
def disable(name: str) -> None:
    """Stop sign-ins through the provider (flights in progress are refused at the callback)."""
    _set_enabled(name, False)


@app.command("merge")
def merge(
    from_email: Annotated[str, typer.Option("--from", help="The account to fold in and deactivate.")],
    into_email: Annotated[str, typer.Option("--into", help="The account that keeps the identities.")],
) -> None:
    """Move one account's external identities into another, end its sessions and deactivate it."""
    try:
        with database().unit_of_work() as session:
            result = federation.merge_users(session, from_email=from_email, into_email=into_email)
    except DomainError as exc:
        raise fail(exc) from exc
    console.print(f"moved {result.identities_moved} identities, {result.bookings_moved} bookings and "
                  f"{result.roles_moved} roles, ended {result.sessions_ended} sessions; "
                  f"{from_email} is deactivated")
