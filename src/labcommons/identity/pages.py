"""Sign-in and sign-out pages: a browser session in the `labcommons_session` cookie."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import Response

from labcommons.config import get_settings
from labcommons.db import Database
from labcommons.errors import Unauthenticated
from labcommons.http import SESSION_COOKIE, get_db, page_actor
from labcommons.i18n import gettext_ as _
from labcommons.identity import federation, service
from labcommons.pages import check_csrf, redirect, render, safe_next

router = APIRouter(include_in_schema=False)


def _next_target(next_: str | None) -> str:
    target = safe_next(next_)
    # Coming back to the sign-in page after signing in would only bounce.
    return "/" if target.split("?")[0] in ("/login", "/logout") else target


@router.get("/login", response_model=None)
def login_form(
    request: Request, next_: Annotated[str, Query(alias="next", max_length=2000)] = "/"
) -> Response:
    """The sign-in form; a signed-in user goes straight on to `next`."""
    if page_actor(request) is not None:
        return redirect(_next_target(next_))
    return _login_page(request, next=_next_target(next_), email="", error=None)


def _login_page(request: Request, status_code: int = 200, **context: object) -> Response:
    """The sign-in page: the enabled upstream providers, then the local form when local accounts are on."""
    with get_db(request).unit_of_work(write=False) as session:
        providers = list(federation.enabled_providers(session))
    return render(
        request, "identity/login.html", status_code=status_code, providers=providers,
        local_login_enabled=get_settings().local_login_enabled, page_path="/login", **context,
    )


@router.post("/login", response_model=None)
def login(
    request: Request,
    db: Annotated[Database, Depends(get_db)],
    csrf_token: Annotated[str, Form()] = "",
    email: Annotated[str, Form(max_length=254)] = "",
    password: Annotated[str, Form(max_length=1000)] = "",
    next_: Annotated[str, Form(alias="next", max_length=2000)] = "/",
) -> Response:
    """Check the e-mail and password, open a session and go on to `next` (a local path only)."""
    check_csrf(request, csrf_token)
    target = _next_target(next_)
    try:
        with db.unit_of_work() as session:
            user = service.verify_password(session, email, password)
            token = service.start_web_session(session, user)
            name = user.name
    except Unauthenticated:
        return _login_page(request, 401, next=target, email=email, error=_("Wrong e-mail or password."))
    response = redirect(target, flash=_("Signed in as %(name)s.") % {"name": name})
    response.set_cookie(
        SESSION_COOKIE, token, max_age=int(service.SESSION_LIFETIME.total_seconds()), httponly=True,
        samesite="lax", secure=get_settings().cookie_secure,
    )
    return response


@router.post("/logout", response_model=None)
def logout(
    request: Request, db: Annotated[Database, Depends(get_db)], csrf_token: Annotated[str, Form()] = ""
) -> Response:
    """End the browser session (POST with a CSRF token, so no other site can sign the user out)."""
    check_csrf(request, csrf_token)
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        with db.unit_of_work() as session:
            service.end_web_session(session, token)
    response = redirect("/", flash=_("Signed out."))
    response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="lax", secure=get_settings().cookie_secure)
    return response
