"""`labcommons roles`: grant, revoke and list roles as the platform operator."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from labcommons.cli_support import console, database, fail
from labcommons.errors import DomainError

app = typer.Typer(
    no_args_is_help=True,
    help="Role grants. These commands act as the platform operator: no permission check applies.",
)

FacilityOpt = Annotated[str | None, typer.Option("--facility", help="Facility code (facility roles)")]
InstitutionOpt = Annotated[str | None, typer.Option("--institution", help="Institution code (institution_admin)")]
RegionOpt = Annotated[str | None, typer.Option("--region", help="Region code (region_authority)")]
RoleOpt = Annotated[str, typer.Option("--role", help="facility_staff, facility_manager, institution_admin, "
                                      "region_authority or platform_admin")]


def _scope_text(kind: str, code: str) -> str:
    return f"{kind}:{code}" if code else "platform"


@app.command("grant")
def grant(
    email: Annotated[str, typer.Option("--email")],
    role: RoleOpt,
    facility: FacilityOpt = None,
    institution: InstitutionOpt = None,
    region: RegionOpt = None,
) -> None:
    """Grant a role over a facility, institution or region (none for platform_admin), as the operator."""
    from labcommons.identity import roles, service

    try:
        with database().unit_of_work() as session:
            ids = roles.resolve_scope(session, facility=facility, institution=institution, region=region)
            user = service.find_user(session, email)
            roles.grant_role(session, None, user, role, facility_id=ids.facility_id,
                             institution_id=ids.institution_id, region_code=ids.region_code)
            scope = facility or institution or region
            console.print(f"granted {role} to {user.email} over {scope or 'the platform'}")
    except DomainError as exc:
        raise fail(exc) from exc


@app.command("revoke")
def revoke(
    email: Annotated[str, typer.Option("--email")],
    role: RoleOpt,
    facility: FacilityOpt = None,
    institution: InstitutionOpt = None,
    region: RegionOpt = None,
) -> None:
    """Revoke a role over a scope, as the operator."""
    from labcommons.identity import roles, service

    try:
        with database().unit_of_work() as session:
            ids = roles.resolve_scope(session, facility=facility, institution=institution, region=region)
            user = service.find_user(session, email)
            roles.revoke_role(session, None, user, role, facility_id=ids.facility_id,
                              institution_id=ids.institution_id, region_code=ids.region_code)
            console.print(f"revoked {role} from {user.email}")
    except DomainError as exc:
        raise fail(exc) from exc


@app.command("list")
def list_(email: Annotated[str | None, typer.Option("--email", help="Only this user's roles")] = None) -> None:
    """List role grants (all of them, or one user's)."""
    from labcommons.identity import roles

    with database().unit_of_work(write=False) as session:
        rows = roles.list_grants(session, None, email=email)
    table = Table("id", "e-mail", "name", "role", "scope")
    for row in rows:
        table.add_row(str(row.id), row.email, row.name, row.role, _scope_text(row.scope_kind, row.scope_code))
    console.print(table)
