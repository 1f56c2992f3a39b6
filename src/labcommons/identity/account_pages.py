"""The account page: profile, roles, linked identities, API tokens and sessions (plus /api/v1/me)."""

from __future__ import annotations

import hmac
from datetime import date, time
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response

from labcommons.actor import Actor
from labcommons.config import get_settings
from labcommons.db import Database, utcnow
from labcommons.errors import InvalidInput
from labcommons.http import request_db
from labcommons.i18n import gettext_ as _
from labcommons.identity import roles, service
from labcommons.identity.account_api import router as account_api
from labcommons.identity.pages import clear_session_cookie
from labcommons.pages import check_csrf, csrf_for, redirect, render, require_actor, to_utc


def role_label(role: str) -> str:
    """A role in words, in the current language."""
    return _(roles.ROLE_LABELS.get(role, role))


router = APIRouter()
router.include_router(account_api, prefix="/api/v1")

# The new token travels to the next GET in a short-lived cookie limited to /account, shown there once.
NEW_TOKEN_COOKIE = "labcommons_new_token"


def _method_label(method: str) -> str:
    if method.startswith("oidc:"):
        return _("Identity service %(name)s") % {"name": method.removeprefix("oidc:")}
    return _("Password")


def _account_page(request: Request, actor: Actor, db: Database, status_code: int = 200, **context: object) -> Response:
    with db.unit_of_work(write=False) as session:
        user = service.find_user(session, actor.email)
        grants = roles.list_grants(session, None, email=actor.email)
        identities = service.external_identities(session, actor.user_id)
        linkable = list(service.linkable_providers(session, actor.user_id))
        tokens = list(service.list_api_tokens(session, actor.user_id))
        sessions = list(service.active_web_sessions(session, actor.user_id))
    default_expiry = (utcnow() + service.TOKEN_DEFAULT_LIFETIME).date()
    context.setdefault("token_form", {"name": "", "scopes": [], "expires_on": default_expiry.isoformat()})
    context.setdefault("token_error", None)
    context.setdefault("new_token", None)
    response = render(
        request, "identity/account.html", status_code=status_code, page_path="/account", user=user,
        grants=grants, role_label=role_label, identities=identities,
        linkable=linkable, tokens=tokens, scopes={k: _(v) for k, v in roles.SCOPES.items()}, sessions=sessions,
        method_label=_method_label, now=utcnow(), max_expiry=(utcnow() + service.TOKEN_MAX_LIFETIME).date(),
        **context,
    )
    return response


@router.get("/account", include_in_schema=False, response_model=None)
def account(request: Request, db: Annotated[Database, Depends(request_db)]) -> Response:
    """The signed-in user's account page."""
    actor = require_actor(request)
    carried = request.cookies.get(NEW_TOKEN_COOKIE)
    new_token = None
    if carried:
        # Shown only to the session that created it: on a shared computer the next user must not see it.
        token, _sep, binding = carried.rpartition(".")
        if token and hmac.compare_digest(binding, csrf_for(request)):
            new_token = token
    response = _account_page(request, actor, db, new_token=new_token)
    response.headers["Cache-Control"] = "no-store"
    if carried:
        response.delete_cookie(NEW_TOKEN_COOKIE, path="/account")
    return response


@router.post("/account/tokens", include_in_schema=False, response_model=None)
def create_token(
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    name: Annotated[str, Form(max_length=100)] = "",
    scopes: Annotated[list[str] | None, Form()] = None,
    expires_on: Annotated[str, Form(max_length=20)] = "",
) -> Response:
    """Create an API token and show it once on the account page (Post/Redirect/Get)."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    chosen = scopes or []
    form = {"name": name, "scopes": chosen, "expires_on": expires_on}
    try:
        if not name.strip():
            raise InvalidInput("A name is required.", field="name")
        try:
            day = date.fromisoformat(expires_on.strip())
        except ValueError:
            raise InvalidInput("Not a date.", field="expires_at") from None
        # The token works through the whole chosen day in the user's zone.
        expires_at = to_utc(request, day, time(23, 59))
        with db.unit_of_work() as session:
            user = service.find_user(session, actor.email)
            token = service.create_api_token(session, user, name=name.strip(), scopes=chosen, expires_at=expires_at)
    except InvalidInput as exc:
        messages = {
            "name": _("Give the token a name."),
            "scopes": _("Choose at least one scope."),
            "expires_at": _("Choose an expiry date between tomorrow and one year from now."),
        }
        error = messages.get(exc.field or "", _("Some of what was sent is not valid."))
        return _account_page(request, actor, db, 422, token_form=form, token_error=error)
    response = redirect("/account#tokens", flash=_("Token created. Copy it now: it will not be shown again."))
    response.set_cookie(NEW_TOKEN_COOKIE, f"{token}.{csrf_for(request)}", max_age=120, path="/account",
                        httponly=True, samesite="strict", secure=get_settings().cookie_secure)
    return response


@router.post("/account/tokens/{token_id}/revoke", include_in_schema=False, response_model=None)
def revoke_token(
    token_id: int, request: Request, db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Revoke one of the user's tokens."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    with db.unit_of_work() as session:
        token = service.revoke_api_token(session, actor.user_id, token_id)
        name = token.name
    return redirect("/account#tokens", flash=_("Token %(name)s revoked.") % {"name": name})


@router.post("/account/logout-everywhere", include_in_schema=False, response_model=None)
def logout_everywhere(
    request: Request, db: Annotated[Database, Depends(request_db)], csrf_token: Annotated[str, Form()] = ""
) -> Response:
    """End every browser session of the user, this one included, and go to the sign-in page."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    with db.unit_of_work() as session:
        service.end_all_web_sessions(session, actor.user_id)
    response = redirect("/login", flash=_("Signed out on every device."))
    clear_session_cookie(response)
    return response
