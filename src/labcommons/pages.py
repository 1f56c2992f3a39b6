"""Shared page machinery: the Jinja2 environment, locale and time-zone helpers, CSRF, flash and errors."""

from __future__ import annotations

import secrets
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from labcommons import i18n
from labcommons.config import get_settings
from labcommons.errors import Forbidden
from labcommons.http import SESSION_COOKIE, page_actor
from labcommons.identity import service as identity

_ROOT = Path(__file__).resolve().parent
_TEMPLATE_DIRS = [_ROOT / "templates"] + sorted(p for p in _ROOT.glob("*/templates") if p.is_dir())

env = Environment(
    loader=FileSystemLoader([str(p) for p in _TEMPLATE_DIRS]),
    autoescape=select_autoescape(["html"]),
    extensions=["jinja2.ext.i18n"],
    trim_blocks=True,
    lstrip_blocks=True,
)
env.install_gettext_callables(i18n.gettext_, i18n.ngettext_, newstyle=True)  # type: ignore[attr-defined]


def user_zone(request: Request) -> ZoneInfo:
    """The time zone pages show times in: the user's own, else the platform default."""
    actor = page_actor(request)
    name = (actor.timezone if actor else None) or get_settings().default_timezone
    return ZoneInfo(name)


def localtime(request: Request, moment: datetime | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
    if moment is None:
        return ""
    return moment.astimezone(user_zone(request)).strftime(fmt)


def localized(obj: Any, field: str) -> str:
    """obj.<field>_zh or obj.<field>_en for the current locale, falling back to the other language."""
    zh, en = getattr(obj, f"{field}_zh", ""), getattr(obj, f"{field}_en", "")
    return (zh or en) if i18n.get_locale() == "zh_CN" else (en or zh)


def yuan(fen: int | None) -> str:
    """Integer fen shown as yuan, without floats."""
    if fen is None:
        return ""
    sign = "-" if fen < 0 else ""
    fen = abs(fen)
    return f"{sign}¥{fen // 100:,}.{fen % 100:02d}"


ANON_COOKIE = "labcommons_anon"


def _browser_token(request: Request) -> str:
    # The session cookie once signed in; before that a random cookie the middleware hands out.
    return (
        request.cookies.get(SESSION_COOKIE)
        or request.cookies.get(ANON_COOKIE)
        or getattr(request.state, "anon_token", "")
    )


def csrf_for(request: Request) -> str:
    return identity.csrf_token(get_settings().secret_key, _browser_token(request))


def check_csrf(request: Request, given: str | None) -> None:
    """Refuse a form post whose CSRF token does not belong to this browser."""
    token = _browser_token(request)
    if not token or not identity.check_csrf(get_settings().secret_key, token, given or ""):
        raise Forbidden("The form expired or came from elsewhere; reload the page and try again.",
                        field="csrf_token")


def url_with(request: Request, **changes: Any) -> str:
    """The current URL with some query parameters replaced (None removes one)."""
    params = dict(request.query_params)
    for key, value in changes.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = str(value)
    return f"{request.url.path}?{urlencode(params)}" if params else request.url.path


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """Render a page with the common context (user, locale, helpers, flash)."""
    flash = request.cookies.get("labcommons_flash")
    base = {
        "request": request,
        "actor": page_actor(request),
        "locale": i18n.get_locale(),
        "localized": localized,
        "localtime": lambda m, fmt="%Y-%m-%d %H:%M": localtime(request, m, fmt),
        "tz_name": str(user_zone(request)),
        "yuan": yuan,
        "csrf_token": csrf_for(request),
        "url_with": lambda **kw: url_with(request, **kw),
        "flash": flash,
    }
    response = HTMLResponse(env.get_template(template).render(**base, **context), status_code=status_code)
    if flash:
        response.delete_cookie("labcommons_flash")
    return response


def set_flash(response: Response, message: str) -> None:
    """A one-time message shown on the next page (Post/Redirect/Get)."""
    response.set_cookie("labcommons_flash", message, max_age=60, httponly=True, samesite="lax")


def render_error(request: Request, status_code: int, message: str) -> Response:
    if status_code == 401:
        from fastapi.responses import RedirectResponse

        return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
    return render(request, "error.html", status_code=status_code, status=status_code, message=message)


def new_anon_token() -> str:
    return secrets.token_urlsafe(24)


