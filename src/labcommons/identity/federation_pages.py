"""Pages of upstream sign-in: start and callback, linking from the account page, and the providers admin page."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import Response

from labcommons.config import get_settings
from labcommons.db import Database
from labcommons.errors import Conflict, DomainError, InvalidInput, NotFound
from labcommons.http import SESSION_COOKIE, get_db, request_db
from labcommons.i18n import gettext_ as _
from labcommons.identity import federation, roles, service
from labcommons.identity.federation import SignInRefused
from labcommons.identity.pages import login_page, next_target, set_session_cookie
from labcommons.pages import check_csrf, redirect, render, render_error, require_actor

router = APIRouter(include_in_schema=False)

# Binds a sign-in in flight to the browser that started it; only its hash is stored with the login state.
OIDC_COOKIE = "labcommons_oidc"
_COOKIE_MAX_AGE = int(federation.LOGIN_STATE_LIFETIME.total_seconds())


def _refused(request: Request, exc: DomainError, *, linking: bool, next_path: str = "/") -> Response:
    if linking:
        return render_error(request, exc.status_code, exc.message, code=exc.code)
    return login_page(request, exc.status_code, error=_(exc.message), next=next_path, email="")


def _start(request: Request, db: Database, name: str, next_path: str, link_user_id: int | None) -> Response:
    try:
        # Discovery goes over the network: fetch it before the write transaction, which on SQLite holds the
        # database's only write lock.
        with db.unit_of_work(write=False) as session:
            issuer = federation.get_provider(session, name).issuer
        federation.provider_metadata(issuer)
        with db.unit_of_work() as session:
            flight = federation.begin_login(
                session, name, next_path=next_path, browser_token=request.cookies.get(OIDC_COOKIE),
                link_user_id=link_user_id,
            )
    except (SignInRefused, NotFound) as exc:
        return _refused(request, exc, linking=link_user_id is not None, next_path=next_path)
    response = redirect(flight.url)
    response.set_cookie(OIDC_COOKIE, flight.browser_token, max_age=_COOKIE_MAX_AGE, httponly=True, samesite="lax",
                        secure=get_settings().cookie_secure)
    return response


@router.post("/login/oidc/{name}", response_model=None)
def start_login(
    request: Request,
    name: str,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    next_: Annotated[str, Form(alias="next", max_length=2000)] = "/",
) -> Response:
    """Send the browser to the provider's authorization endpoint (code flow with PKCE, state and nonce)."""
    check_csrf(request, csrf_token)
    return _start(request, db, name, next_target(next_), None)


@router.post("/account/identities/link/{name}", response_model=None)
def start_link(
    request: Request,
    name: str,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    next_: Annotated[str, Form(alias="next", max_length=2000)] = "/account",
) -> Response:
    """Link another upstream identity to the signed-in account: the same flow, remembered as a link."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    return _start(request, db, name, next_target(next_, "/account"), actor.user_id)


@router.get("/login/oidc/{name}/callback", response_model=None)
def callback(
    request: Request,
    name: str,
    db: Annotated[Database, Depends(request_db)],
    state: Annotated[str, Query(max_length=500)] = "",
    code: Annotated[str, Query(max_length=2000)] = "",
    error: Annotated[str, Query(max_length=200)] = "",
    iss: Annotated[str | None, Query(max_length=500)] = None,
) -> Response:
    """Finish an upstream sign-in: check the state, exchange the code, verify the ID token, open a session."""
    try:
        with db.unit_of_work() as session:
            pending = federation.take_login_state(session, state)
    except SignInRefused as exc:
        return _refused(request, exc, linking=False)
    linking = pending.link_user_id is not None
    try:
        federation.check_callback(pending, name, browser_token=request.cookies.get(OIDC_COOKIE), iss=iss)
        if error or not code:
            raise SignInRefused(federation.PROVIDER_ERROR, code="provider_error")
        claims = federation.exchange_code(pending, code)
        with db.unit_of_work() as session:
            user = federation.account_for(session, pending, claims)
            token = None
            if not linking:
                if previous := request.cookies.get(SESSION_COOKIE):
                    service.end_web_session(session, previous)  # a sign-in never leaves the old session behind
                token = service.start_web_session(session, user, method=f"oidc:{name}")
            user_name = user.name
    except SignInRefused as exc:
        return _refused(request, exc, linking=linking, next_path=pending.next_path)
    if token is None:
        response = redirect(pending.next_path, flash=_("The identity is now linked to your account."))
    else:
        response = redirect(pending.next_path, flash=_("Signed in as %(name)s.") % {"name": user_name})
        set_session_cookie(response, token)
    response.delete_cookie(OIDC_COOKIE, httponly=True, samesite="lax", secure=get_settings().cookie_secure)
    return response


@router.post("/account/identities/{identity_id}/unlink", response_model=None)
def unlink(
    request: Request,
    identity_id: int,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    next_: Annotated[str, Form(alias="next", max_length=2000)] = "/account",
) -> Response:
    """Remove a linked identity (not the last way to sign in)."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    with db.unit_of_work() as session:
        federation.unlink_identity(session, user_id=actor.user_id, identity_id=identity_id)
    return redirect(next_target(next_, "/account"), flash=_("The identity was unlinked."))


# --- administration ---


def _admin_page(request: Request, status_code: int = 200, **context: Any) -> Response:
    with get_db(request).unit_of_work(write=False) as session:
        providers = list(federation.list_providers(session))
        regions = list(federation.list_regions(session))
    context.setdefault("form", {})
    context.setdefault("error", None)
    return render(
        request, "identity/admin_providers.html", status_code=status_code, providers=providers, regions=regions,
        redirect_uri=federation.redirect_uri, page_path="/admin/providers", **context,
    )


@router.get("/admin/providers", response_model=None)
def admin_providers(request: Request) -> Response:
    """The upstream identity providers, for platform administrators."""
    roles.require_platform_admin(require_actor(request))
    return _admin_page(request)


@router.post("/admin/providers", response_model=None)
def admin_add_provider(
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    name: Annotated[str, Form(max_length=40)] = "",
    region: Annotated[str, Form(max_length=16)] = "",
    issuer: Annotated[str, Form(max_length=500)] = "",
    client_id: Annotated[str, Form(max_length=200)] = "",
    client_secret: Annotated[str, Form(max_length=500)] = "",
    display_name_zh: Annotated[str, Form(max_length=200)] = "",
    display_name_en: Annotated[str, Form(max_length=200)] = "",
    trusted_for_linking: Annotated[bool, Form()] = False,
) -> Response:
    """Register a provider; re-show the form with the problem when it is refused."""
    roles.require_platform_admin(require_actor(request))
    check_csrf(request, csrf_token)
    try:
        with db.unit_of_work() as session:
            federation.add_provider(
                session, name=name, region_code=region, issuer=issuer, client_id=client_id,
                client_secret=client_secret, display_name_zh=display_name_zh, display_name_en=display_name_en,
                trusted_for_linking=trusted_for_linking,
            )
    except (InvalidInput, Conflict) as exc:
        form = {"name": name, "region": region, "issuer": issuer, "client_id": client_id,
                "display_name_zh": display_name_zh, "display_name_en": display_name_en,
                "trusted_for_linking": trusted_for_linking}
        return _admin_page(request, exc.status_code, form=form, error=_(exc.message), error_field=exc.field)
    return redirect("/admin/providers", flash=_("Identity service %(name)s added.") % {"name": name})


@router.post("/admin/providers/{name}/enabled", response_model=None)
def admin_set_enabled(
    request: Request,
    name: str,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    enabled: Annotated[bool, Form()] = False,
) -> Response:
    roles.require_platform_admin(require_actor(request))
    check_csrf(request, csrf_token)
    with db.unit_of_work() as session:
        federation.set_provider_enabled(session, name, enabled)
    message = _("Identity service %(name)s enabled.") if enabled else _("Identity service %(name)s disabled.")
    return redirect("/admin/providers", flash=message % {"name": name})


@router.post("/admin/providers/{name}/trusted", response_model=None)
def admin_set_trusted(
    request: Request,
    name: str,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    trusted: Annotated[bool, Form()] = False,
) -> Response:
    roles.require_platform_admin(require_actor(request))
    check_csrf(request, csrf_token)
    with db.unit_of_work() as session:
        federation.set_trusted_for_linking(session, name, trusted)
    return redirect("/admin/providers", flash=_("Identity service %(name)s updated.") % {"name": name})
