"""Administration: the index of admin pages and role grants (/admin, /admin/roles)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response

from labcommons.actor import Actor
from labcommons.db import Database
from labcommons.errors import Conflict, DomainError, Forbidden, InvalidInput, NotFound
from labcommons.http import request_db
from labcommons.i18n import gettext_ as _
from labcommons.identity import roles, service
from labcommons.identity.models import Role
from labcommons.identity.roles import Action, Target
from labcommons.pages import check_csrf, env, redirect, render, require_actor


def role_label(role: str) -> str:
    """A role in words, in the current language."""
    return _(roles.ROLE_LABELS.get(role, role))


router = APIRouter(include_in_schema=False)


def _may(actor: Actor | None, action: str) -> bool:
    return roles.authorize(actor, Action(action))


# The layout shows the Admin link only to those the permission table lets in.
env.globals["may"] = _may


def _admin(request: Request) -> Actor:
    """The signed-in actor if they administer something; a redirect to sign in or 403 otherwise."""
    actor = require_actor(request)
    roles.require(actor, Action.administer_roles)
    return actor


@router.get("/admin", response_model=None)
def admin_index(request: Request) -> Response:
    """Links to the administration pages the actor's roles open."""
    actor = _admin(request)
    links = [
        ("/admin/roles", _("Role grants"), _("Who is staff, manager or administrator of what."),
         roles.authorize(actor, Action.administer_roles)),
        ("/admin/providers", _("Identity providers"), _("Regional and institutional sign-in services."),
         roles.authorize(actor, Action.manage_identity_providers)),
        ("/admin/clients", _("Client systems"), _("Member systems that sign their users in through the platform."),
         roles.authorize(actor, Action.manage_oidc_clients)),
    ]
    return render(request, "identity/admin_index.html", links=[link for link in links if link[3]])


def _roles_page(request: Request, actor: Actor, db: Database, status_code: int = 200, **context: object) -> Response:
    with db.unit_of_work(write=False) as session:
        grants = roles.list_grants(session, actor)
    context.setdefault("form", {"email": "", "role": "", "scope": ""})
    context.setdefault("error", None)
    grantable = roles.grantable_roles(actor)
    return render(
        request, "identity/admin_roles.html", status_code=status_code, page_path="/admin/roles", grants=grants,
        grantable=[(r.value, _(roles.ROLE_LABELS[r]), roles.ROLE_SCOPE[r].value) for r in grantable],
        role_label=role_label, **context,
    )


@router.get("/admin/roles", response_model=None)
def roles_page(request: Request, db: Annotated[Database, Depends(request_db)]) -> Response:
    """The grants the actor administers, a form to grant a role, and revoke buttons."""
    return _roles_page(request, _admin(request), db)


def _grant_error(exc: DomainError) -> str:
    if isinstance(exc, Conflict):
        return _("This user already has this role over this scope.")
    if isinstance(exc, Forbidden):
        return _("You may not grant this role over this scope.")
    if isinstance(exc, NotFound) and exc.field == "email":
        return _("No user has this e-mail address.")
    if isinstance(exc, NotFound):
        return _("Nothing has this code; use a facility, institution or region code.")
    if isinstance(exc, InvalidInput) and exc.field == "role":
        return _("Choose a role.")
    if isinstance(exc, InvalidInput) and exc.field == "email":
        return _("No user has this e-mail address.")
    return _("This role needs the code of its facility, institution or region.")


@router.post("/admin/roles", response_model=None)
def grant(
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    email: Annotated[str, Form(max_length=254)] = "",
    role: Annotated[str, Form(max_length=40)] = "",
    scope: Annotated[str, Form(max_length=60)] = "",
) -> Response:
    """Grant a role over the scope named by its code (a facility, an institution or a region)."""
    actor = _admin(request)
    check_csrf(request, csrf_token)
    form = {"email": email, "role": role, "scope": scope}
    try:
        with db.unit_of_work() as session:
            chosen = Role(role) if role in Role.__members__ else None
            if chosen is None:
                raise InvalidInput("Unknown role.", field="role")
            kind = roles.ROLE_SCOPE[chosen]
            code = scope.strip() or None
            ids = roles.resolve_scope(
                session, facility=code if kind is Target.facility else None,
                institution=code if kind is Target.institution else None,
                region=code if kind is Target.region else None,
            )
            user = service.find_user(session, email)
            roles.grant_role(session, actor, user, chosen, facility_id=ids.facility_id,
                             institution_id=ids.institution_id, region_code=ids.region_code)
            name = user.name
    except DomainError as exc:
        status = 409 if isinstance(exc, Conflict) else 403 if isinstance(exc, Forbidden) else 422
        return _roles_page(request, actor, db, status, form=form, error=_grant_error(exc))
    return redirect("/admin/roles", flash=_("Granted %(role)s to %(name)s.") % {
        "role": _(roles.ROLE_LABELS[chosen]), "name": name})


@router.post("/admin/roles/{grant_id}/revoke", response_model=None)
def revoke(
    grant_id: int, request: Request, db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Revoke a grant the actor administers; any other is 404."""
    actor = _admin(request)
    check_csrf(request, csrf_token)
    with db.unit_of_work() as session:
        removed = roles.revoke_grant(session, actor, grant_id)
        label = _(roles.ROLE_LABELS[Role(removed.role)])
    return redirect("/admin/roles", flash=_("Revoked %(role)s.") % {"role": label})
