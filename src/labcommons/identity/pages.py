"""Sign-in and sign-out pages: a browser session in the `labcommons_session` cookie."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Path, Query, Request
from fastapi.responses import Response

from labcommons.config import get_settings
from labcommons.db import Database
from labcommons.errors import InvalidInput, NotFound, TooManyAttempts, Unauthenticated
from labcommons.http import SESSION_COOKIE, get_db, page_actor, request_db
from labcommons.i18n import gettext_ as _
from labcommons.i18n import ngettext_ as ngettext
from labcommons.identity import federation, passwords, service
from labcommons.pages import check_csrf, redirect, render, safe_next

router = APIRouter(include_in_schema=False)


def next_target(next_: str | None, default: str = "/") -> str:
    """Where to go after signing in: a local path, never back to the sign-in or sign-out page."""
    target = safe_next(next_, default)
    # Coming back to the sign-in page after signing in would only bounce.
    return default if target.split("?")[0] in ("/login", "/logout") else target


def set_session_cookie(response: Response, token: str) -> None:
    """Hand the browser its new session (HttpOnly, SameSite=Lax, Secure behind https)."""
    response.set_cookie(
        SESSION_COOKIE, token, max_age=int(service.SESSION_LIFETIME.total_seconds()), httponly=True,
        samesite="lax", secure=get_settings().cookie_secure,
    )


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="lax", secure=get_settings().cookie_secure)


@router.get("/login", response_model=None)
def login_form(
    request: Request, next_: Annotated[str, Query(alias="next", max_length=2000)] = "/"
) -> Response:
    """The sign-in form; a signed-in user goes straight on to `next`."""
    if page_actor(request) is not None:
        return redirect(next_target(next_))
    return login_page(request, next=next_target(next_), email="", error=None)


def login_page(request: Request, status_code: int = 200, **context: object) -> Response:
    """The sign-in page: the enabled upstream providers, then the local form when local accounts are on."""
    with get_db(request).unit_of_work(write=False) as session:
        providers = list(federation.enabled_providers(session))
    return render(
        request, "identity/login.html", status_code=status_code, providers=providers,
        local_login_enabled=get_settings().local_login_enabled, page_path="/login", **context,
    )


def _client_address(request: Request) -> str:
    # The peer address, or behind a trusted proxy (trust_proxy_headers, or uvicorn --proxy-headers) the client it
    # names: otherwise every user would share the proxy's budget, and one guesser would lock all of them out.
    from labcommons.security.middleware import client_address

    return client_address(request, get_settings()) or "unknown"


def _require_local_login() -> None:
    if not get_settings().local_login_enabled:
        raise NotFound(passwords.LOCAL_LOGIN_OFF)


def _too_many(exc: TooManyAttempts) -> str:
    minutes = passwords.retry_minutes(exc.retry_after)
    return ngettext(
        "Too many failed sign-ins. Try again in %(num)d minute.",
        "Too many failed sign-ins. Try again in %(num)d minutes.",
        minutes,
    ) % {"num": minutes}


@router.post("/login", response_model=None)
def login(
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    email: Annotated[str, Form(max_length=254)] = "",
    password: Annotated[str, Form(max_length=1000)] = "",
    next_: Annotated[str, Form(alias="next", max_length=2000)] = "/",
) -> Response:
    """Check the e-mail and password, open a session and go on to `next` (a local path only)."""
    _require_local_login()
    check_csrf(request, csrf_token)
    target = next_target(next_)
    keys = passwords.login_keys(email, _client_address(request))
    try:
        # Its own short transaction, committed before the password is looked at: the attempt counts even if the
        # sign-in fails, and a locked key is refused without checking, so guessing stops even for right guesses.
        with db.unit_of_work() as session:
            passwords.reserve_attempt(session, keys)
        with db.unit_of_work() as session:
            user = service.verify_password(session, email, password)
            passwords.attempt_succeeded(session, keys, email)
            if previous := request.cookies.get(SESSION_COOKIE):
                service.end_web_session(session, previous)  # a sign-in never leaves the old session behind
            token = service.start_web_session(session, user)
            name = user.name
    except TooManyAttempts as exc:
        response = login_page(request, 429, next=target, email=email, error=_too_many(exc))
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except Unauthenticated:
        return login_page(request, 401, next=target, email=email, error=_("Wrong e-mail or password."))
    response = redirect(target, flash=_("Signed in as %(name)s.") % {"name": name})
    set_session_cookie(response, token)
    return response


@router.post("/logout", response_model=None)
def logout(
    request: Request, db: Annotated[Database, Depends(request_db)], csrf_token: Annotated[str, Form()] = ""
) -> Response:
    """End the browser session (POST with a CSRF token, so no other site can sign the user out)."""
    check_csrf(request, csrf_token)
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        with db.unit_of_work() as session:
            service.end_web_session(session, token)
    response = redirect("/", flash=_("Signed out."))
    clear_session_cookie(response)
    return response


# --- password reset by e-mail -----------------------------------------------------------------------------------


def _no_referrer(response: Response) -> Response:
    # The reset token is in the address; it must not leak to other sites through the Referer header.
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@router.get("/password/forgot", response_model=None)
def forgot_form(request: Request) -> Response:
    """Ask for a reset link by e-mail."""
    _require_local_login()
    return render(request, "identity/forgot.html", email="", error=None, sent=False, page_path="/password/forgot")


@router.post("/password/forgot", response_model=None)
def forgot(
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    email: Annotated[str, Form(max_length=254)] = "",
) -> Response:
    """Send a reset link if the account exists; the answer is the same either way, so it reveals no accounts."""
    _require_local_login()
    check_csrf(request, csrf_token)
    keys = passwords.forgot_keys(email, _client_address(request))
    try:
        with db.unit_of_work() as session:
            passwords.check_not_locked(session, keys)
            passwords.record_failure(session, keys)
            passwords.request_reset(session, email)
    except TooManyAttempts as exc:
        minutes = passwords.retry_minutes(exc.retry_after)
        error = ngettext(
            "Too many requests. Try again in %(num)d minute.", "Too many requests. Try again in %(num)d minutes.",
            minutes,
        ) % {"num": minutes}
        response = render(request, "identity/forgot.html", status_code=429, email=email, error=error, sent=False,
                          page_path="/password/forgot")
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    return redirect("/password/forgot/sent")


@router.get("/password/forgot/sent", response_model=None)
def forgot_sent(request: Request) -> Response:
    """What every reset request ends on, whether or not the account exists."""
    _require_local_login()
    return render(request, "identity/forgot.html", email="", error=None, sent=True, page_path="/password/forgot")


TokenPath = Annotated[str, Path(max_length=100)]


def _reset_page(request: Request, token: str, status_code: int = 200, **context: Any) -> Response:
    context.setdefault("error", None)
    context.setdefault("error_field", None)
    return _no_referrer(render(request, "identity/reset.html", status_code=status_code, token=token,
                               min_length=passwords.MIN_PASSWORD_LENGTH, **context))


@router.get("/password/reset/{token}", response_model=None)
def reset_form(request: Request, db: Annotated[Database, Depends(request_db)], token: TokenPath) -> Response:
    """The new-password form of a live link, or the page saying the link no longer works."""
    _require_local_login()
    try:
        with db.unit_of_work(write=False) as session:
            user = passwords.check_reset_token(session, token)
            email = user.email
    except passwords.ResetLinkInvalid:
        return _reset_page(request, "", 410, invalid=True)
    return _reset_page(request, token, invalid=False, email=email)


@router.post("/password/reset/{token}", response_model=None)
def reset(
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    token: TokenPath,
    csrf_token: Annotated[str, Form()] = "",
    password: Annotated[str, Form(max_length=1000)] = "",
    confirmation: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    """Set the new password, end every session of the account and send the user to sign in."""
    _require_local_login()
    check_csrf(request, csrf_token)
    try:
        with db.unit_of_work() as session:
            passwords.complete_reset(session, token, password, confirmation)
    except passwords.ResetLinkInvalid:
        return _reset_page(request, "", 410, invalid=True)
    except InvalidInput as exc:
        return _reset_page(request, token, 422, invalid=False, email="", error=_(exc.message),
                           error_field=exc.field)
    response = redirect("/login", flash=_("Your password was changed. Sign in with the new one."))
    clear_session_cookie(response)
    return _no_referrer(response)
