"""OpenID Connect provider endpoints (discovery, JWKS, authorize, token, userinfo) and the clients admin page."""

from __future__ import annotations

import base64
from typing import Annotated, Any
from urllib.parse import unquote

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from labcommons.db import Database
from labcommons.errors import InvalidInput, Unauthenticated
from labcommons.http import SESSION_COOKIE, page_actor, request_db
from labcommons.i18n import gettext_ as _
from labcommons.identity import provider
from labcommons.identity.roles import require_platform_admin
from labcommons.pages import N_, check_csrf, redirect, render, require_actor

router = APIRouter(include_in_schema=False)

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

# What each scope shows on the consent page (see provider.SCOPE_CLAIMS).
SCOPE_TEXTS = {
    "openid": N_("Your platform account number, region, institution and roles"),
    "profile": N_("Your name and preferred language"),
    "email": N_("Your e-mail address"),
}


def _oauth_error(exc: provider.OAuthError) -> JSONResponse:
    headers = dict(NO_STORE)
    if isinstance(exc, provider.InvalidClient):
        headers["WWW-Authenticate"] = 'Basic realm="labcommons"'
    elif isinstance(exc, provider.InvalidToken):
        headers["WWW-Authenticate"] = f'Bearer error="invalid_token", error_description="{exc.message}"'
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)


@router.get("/.well-known/openid-configuration")
def openid_configuration() -> JSONResponse:
    return JSONResponse(provider.discovery(), headers={"Cache-Control": "public, max-age=300"})


@router.get("/oidc/jwks")
def jwks(db: Annotated[Database, Depends(request_db)]) -> JSONResponse:
    # Generated on first need inside a write transaction, so a fresh platform publishes a key before signing.
    with db.unit_of_work() as session:
        provider.signing_key(session)
        keys = provider.jwks(session)
    # Short caching: relying parties must see a rotated-in key soon after `oidc-keys rotate`.
    return JSONResponse(keys, headers={"Cache-Control": "public, max-age=300"})


def _authorize(
    request: Request, db: Database, params: dict[str, str], *, decision: str | None = None
) -> Response:
    """The authorization endpoint for GET (a client's request) and POST (the consent form)."""
    actor = page_actor(request)
    with db.unit_of_work() as session:
        try:
            auth = provider.check_authorization_request(
                session, client_id=params.get("client_id", ""), redirect_uri=params.get("redirect_uri", ""),
                response_type=params.get("response_type", ""), scope=params.get("scope", ""),
                state=params.get("state"), nonce=params.get("nonce"),
                code_challenge=params.get("code_challenge", ""),
                code_challenge_method=params.get("code_challenge_method", ""),
            )
        except provider.AuthorizationError as exc:
            return redirect(exc.location())
        prompt = params.get("prompt", "").split()
        if actor is None:
            if "none" in prompt:
                return redirect(provider.AuthorizationError(
                    "login_required", "The user is not signed in.", redirect_uri=auth.redirect_uri,
                    state=auth.state).location())
            # The error handler sends the browser to sign in and back to this very request.
            raise Unauthenticated("Sign in to continue to the application.")
        if decision == "deny":
            return redirect(provider.deny(auth))
        if decision == "allow":
            provider.remember_consent(session, auth, actor.user_id)
        elif provider.needs_consent(session, auth, actor.user_id):
            if "none" in prompt:
                return redirect(provider.AuthorizationError(
                    "consent_required", "The user has not allowed this application.",
                    redirect_uri=auth.redirect_uri, state=auth.state).location())
            return render(
                request, "identity/consent.html", auth=auth, params=params,
                scope_texts=[_(SCOPE_TEXTS[s]) for s in auth.scopes if s in SCOPE_TEXTS],
            )
        auth_time = provider.session_auth_time(session, request.cookies.get(SESSION_COOKIE, ""))
        location = provider.issue_code(session, auth, actor.user_id, auth_time)
    return redirect(location)


AUTHORIZE_PARAMS = ("client_id", "redirect_uri", "response_type", "scope", "state", "nonce", "code_challenge",
                    "code_challenge_method", "prompt")


@router.get("/oidc/authorize", response_model=None)
def authorize(request: Request, db: Annotated[Database, Depends(request_db)]) -> Response:
    """Start a sign-in for a member system: consent if needed, then back to it with a code."""
    params = {k: request.query_params[k] for k in AUTHORIZE_PARAMS if k in request.query_params}
    return _authorize(request, db, params)


@router.post("/oidc/authorize", response_model=None)
async def authorize_decision(request: Request, db: Annotated[Database, Depends(request_db)]) -> Response:
    """The consent form: Allow remembers the consent and issues a code, Deny answers access_denied."""
    form = await request.form()
    check_csrf(request, str(form.get("csrf_token", "")))
    params = {k: str(form[k]) for k in AUTHORIZE_PARAMS if k in form}
    decision = "allow" if form.get("decision") == "allow" else "deny"
    # The rest is synchronous database work; keep it off the event loop.
    return await run_in_threadpool(_authorize, request, db, params, decision=decision)


def _basic_credentials(request: Request) -> tuple[str, str] | None:
    scheme, _sep, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except ValueError:  # binascii.Error, UnicodeDecodeError, and non-ASCII text given to b64decode
        raise provider.InvalidClient("The Authorization header is malformed.") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise provider.InvalidClient("The Authorization header is malformed.")
    # RFC 6749 §2.3.1: both parts are form-urlencoded before Base64.
    return unquote(client_id.replace("+", " ")), unquote(secret.replace("+", " "))


@router.post("/oidc/token")
def token(
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    grant_type: Annotated[str, Form()] = "",
    code: Annotated[str, Form()] = "",
    redirect_uri: Annotated[str, Form()] = "",
    code_verifier: Annotated[str, Form()] = "",
    client_id: Annotated[str, Form()] = "",
    client_secret: Annotated[str, Form()] = "",
) -> JSONResponse:
    """Exchange an authorization code (with its PKCE verifier) for tokens; RFC 6749 JSON errors."""
    try:
        basic = _basic_credentials(request)
        if basic and client_secret:
            raise provider.OAuthError("invalid_request", "Use one client authentication method, not two.")
        cid, secret = basic or (client_id, client_secret)
        with db.unit_of_work() as session:
            client = provider.authenticate_client(session, cid, secret)
            if grant_type != "authorization_code":
                raise provider.OAuthError("unsupported_grant_type", "Only authorization_code is supported.")
            body = provider.exchange_code(session, client, code=code, redirect_uri=redirect_uri,
                                          code_verifier=code_verifier)
    except provider.CodeReplayed as exc:
        # The refusal rolled the first transaction back; the revocation must commit on its own.
        with db.unit_of_work() as session:
            provider.revoke_tokens_of_code(session, exc.code_id)
        return _oauth_error(exc)
    except provider.OAuthError as exc:
        return _oauth_error(exc)
    return JSONResponse(body, headers=NO_STORE)


@router.api_route("/oidc/userinfo", methods=["GET", "POST"])
def userinfo(request: Request, db: Annotated[Database, Depends(request_db)]) -> JSONResponse:
    """The signed-in user's claims for a Bearer access token."""
    scheme, _sep, value = request.headers.get("authorization", "").partition(" ")
    try:
        if scheme.lower() != "bearer":
            raise provider.InvalidToken("Send the access token as 'Authorization: Bearer <token>'.")
        with db.unit_of_work(write=False) as session:
            claims = provider.userinfo(session, value.strip())
    except provider.OAuthError as exc:
        return _oauth_error(exc)
    return JSONResponse(claims, headers=NO_STORE)


# --- administration of client registrations ---


def _admin_page(request: Request, db: Database, status_code: int = 200, **context: Any) -> Response:
    with db.unit_of_work(write=False) as session:
        clients = [
            {"client_id": c.client_id, "name": c.name, "redirect_uris": provider.redirect_uris_of(c),
             "trusted": c.trusted, "enabled": c.enabled, "created_at": c.created_at}
            for c in provider.list_clients(session)
        ]
    context.setdefault("form", {"name": "", "redirect_uris": "", "trusted": False})
    return render(request, "identity/admin_clients.html", status_code=status_code, clients=clients,
                  page_path="/admin/clients", **context)


@router.get("/admin/clients", response_model=None)
def admin_clients(request: Request, db: Annotated[Database, Depends(request_db)]) -> Response:
    """Member systems registered to sign in through the platform (platform admins only)."""
    require_platform_admin(require_actor(request))
    return _admin_page(request, db)


@router.post("/admin/clients", response_model=None)
def admin_register_client(
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    name: Annotated[str, Form()] = "",
    redirect_uris: Annotated[str, Form()] = "",
    trusted: Annotated[str, Form()] = "",
) -> Response:
    """Register a client and show its secret on this response only (never in a cookie or a later page)."""
    require_platform_admin(require_actor(request))
    check_csrf(request, csrf_token)
    form = {"name": name, "redirect_uris": redirect_uris, "trusted": bool(trusted)}
    try:
        with db.unit_of_work() as session:
            client, secret = provider.register_client(session, name=name, redirect_uris=redirect_uris.split(),
                                                      trusted=bool(trusted))
            created = {"client_id": client.client_id, "secret": secret, "name": client.name}
    except InvalidInput as exc:
        error = _("Enter a name and at least one redirect URI: an https address, or http only on 127.0.0.1 or "
                  "localhost, without a fragment.")
        return _admin_page(request, db, 422, form=form, error=error, error_field=exc.field)
    response = _admin_page(request, db, created=created)
    response.headers.update(NO_STORE)
    return response


@router.post("/admin/clients/{client_id}", response_model=None)
def admin_update_client(
    request: Request,
    client_id: str,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    action: Annotated[str, Form()] = "",
) -> Response:
    """Enable, disable, trust or distrust a client."""
    require_platform_admin(require_actor(request))
    check_csrf(request, csrf_token)
    with db.unit_of_work() as session:
        if action in ("enable", "disable"):
            client = provider.set_client_enabled(session, client_id, action == "enable")
        elif action in ("trust", "distrust"):
            client = provider.set_client_trusted(session, client_id, action == "trust")
        else:
            raise InvalidInput("Unknown action.", field="action")
        name = client.name
    return redirect("/admin/clients", flash=_("Updated %(name)s.") % {"name": name})
