"""Shared page machinery: the Jinja2 environment, locale and time-zone helpers, CSRF, flash and errors."""

from __future__ import annotations

import secrets
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit
from zoneinfo import ZoneInfo

from babel.dates import format_skeleton
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from labcommons import i18n
from labcommons.actor import Actor
from labcommons.config import get_settings
from labcommons.errors import Forbidden, Unauthenticated
from labcommons.http import SESSION_COOKIE, page_actor
from labcommons.i18n import gettext_ as _
from labcommons.identity import service as identity

_ROOT = Path(__file__).resolve().parent
_TEMPLATE_DIRS = [_ROOT / "templates", *sorted(p for p in _ROOT.glob("*/templates") if p.is_dir())]

env = Environment(
    loader=FileSystemLoader([str(p) for p in _TEMPLATE_DIRS]),
    autoescape=select_autoescape(["html"]),
    extensions=["jinja2.ext.i18n"],
    trim_blocks=True,
    lstrip_blocks=True,
)
env.install_gettext_callables(i18n.gettext_, i18n.ngettext_, newstyle=True)  # type: ignore[attr-defined]

FLASH_COOKIE = "labcommons_flash"


# N_ is the conventional name `pybabel extract` looks for.
def N_(message: str) -> str:
    """Mark a message for the catalogue without translating it yet (it is translated where shown)."""
    return message


CSRF_FAILED = N_("The form expired or came from elsewhere; reload the page and try again.")


def user_zone(request: Request) -> ZoneInfo:
    """The time zone pages show times in: the user's own, else the platform default."""
    actor = page_actor(request)
    name = (actor.timezone if actor else None) or get_settings().default_timezone
    return ZoneInfo(name)


def localtime(request: Request, moment: datetime | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
    if moment is None:
        return ""
    return moment.astimezone(user_zone(request)).strftime(fmt)


def local_date(day: date, skeleton: str = "yMMMEd") -> str:
    """A date the way the current locale writes it (CLDR), e.g. 2026年11月25日周三 / Wed, Nov 25, 2026."""
    return format_skeleton(skeleton, day, locale=i18n.get_locale())


def to_utc(request: Request, day: date, clock: time) -> datetime:
    """A wall-clock date and time in the user's zone as an aware UTC datetime."""
    return datetime.combine(day, clock, tzinfo=user_zone(request)).astimezone(UTC)


def parse_local_datetime(request: Request, value: str) -> datetime | None:
    """An <input type=datetime-local> value (YYYY-MM-DDTHH:MM) in the user's zone as UTC; None if blank.

    Raises ValueError for text that is not such a value.
    """
    value = value.strip()
    if not value:
        return None
    naive = datetime.fromisoformat(value)
    if naive.tzinfo is not None:
        raise ValueError("expected a local date and time without an offset")
    return to_utc(request, naive.date(), naive.time())


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


def minutes_text(minutes: int) -> str:
    """A length of time as hours and minutes in the current language (90 → 1 h 30 min / 1 小时 30 分钟)."""
    hours, rest = divmod(minutes, 60)
    if hours and rest:
        return _("%(h)s h %(m)s min") % {"h": hours, "m": rest}
    if hours:
        return _("%(h)s h") % {"h": hours}
    return _("%(m)s min") % {"m": rest}


ANON_COOKIE = "labcommons_anon"


def _browser_token(request: Request) -> str:
    # The session cookie once signed in; before that a random cookie the middleware hands out.
    token = (
        request.cookies.get(SESSION_COOKIE)
        or request.cookies.get(ANON_COOKIE)
        or getattr(request.state, "anon_token", None)
    )
    return str(token or "")


def csrf_for(request: Request) -> str:
    return identity.csrf_token(get_settings().secret_key, _browser_token(request))


def check_csrf(request: Request, given: str | None) -> None:
    """Refuse a form post whose CSRF token does not belong to this browser."""
    token = _browser_token(request)
    if not token or not identity.check_csrf(get_settings().secret_key, token, given or ""):
        raise Forbidden(CSRF_FAILED, field="csrf_token")


def require_actor(request: Request) -> Actor:
    """The signed-in user; Unauthenticated (a redirect to the sign-in page) for anyone else."""
    actor = page_actor(request)
    if actor is None:
        raise Unauthenticated("Sign in to see this page.")
    return actor


def safe_next(target: str | None, default: str = "/") -> str:
    """`target` if it is a path on this site, else `default`: sign-in must not redirect elsewhere."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or any(ord(c) < 32 for c in target):
        return default
    return target


def url_with(request: Request, path: str | None = None, **changes: Any) -> str:
    """The current URL (or `path`) with some query parameters replaced (None removes one).

    `lang` is dropped unless asked for: the cookie remembers the language once it is chosen. Empty
    parameters (an untouched form field) are dropped too.
    """
    params = {k: v for k, v in request.query_params.items() if k != "lang" and v != ""}
    for key, value in changes.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = str(value)
    path = path or request.url.path
    return f"{path}?{urlencode(params)}" if params else path


def is_htmx(request: Request) -> bool:
    """Whether htmx sent the request for a fragment (the page still works without it)."""
    # Restoring history after a cache miss, htmx asks for the whole page.
    headers = request.headers
    return headers.get("hx-request") == "true" and headers.get("hx-history-restore-request") != "true"


def _read_flash(request: Request) -> dict[str, str] | None:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    kind, _sep, text = unquote(raw).partition("|")
    return {"kind": kind if kind in ("info", "error") else "info", "text": text}


def render(
    request: Request, template: str, status_code: int = 200, *, page_path: str | None = None, **context: Any
) -> HTMLResponse:
    """Render a page with the common context (user, locale, helpers, flash).

    `page_path` is the GET address of the page when a POST re-renders it, for the language links.
    """
    partial = is_htmx(request)
    # An htmx fragment leaves the flash for the next full page, where the layout shows it.
    flash = None if partial else _read_flash(request)
    locale = i18n.get_locale()
    base = {
        "request": request,
        "actor": page_actor(request),
        "locale": locale,
        "html_lang": "zh-CN" if locale == "zh_CN" else "en",
        "localized": localized,
        "localtime": lambda m, fmt="%Y-%m-%d %H:%M": localtime(request, m, fmt),
        "local_date": local_date,
        "minutes_text": minutes_text,
        "tz_name": str(user_zone(request)),
        "yuan": yuan,
        "csrf_token": csrf_for(request),
        "url_with": lambda path=None, **kw: url_with(request, path, **kw),
        "lang_url": lambda lang: url_with(request, lang=lang) if page_path is None
        else f"{page_path}?{urlencode({'lang': lang})}",
        "flash": flash,
    }
    response = HTMLResponse(env.get_template(template).render(**base, **context), status_code=status_code)
    if flash:
        response.delete_cookie(FLASH_COOKIE)
    return response


def set_flash(response: Response, message: str, kind: str = "info") -> None:
    """A one-time message shown on the next page (Post/Redirect/Get); `kind` is info or error."""
    # Percent-encoded: cookie values must be ASCII and the message is usually Chinese.
    response.set_cookie(FLASH_COOKIE, quote(f"{kind}|{message}"), max_age=60, httponly=True, samesite="lax",
                        secure=get_settings().cookie_secure)


def redirect(url: str, flash: str | None = None, kind: str = "info") -> RedirectResponse:
    """303 See Other to `url`, optionally carrying a flash message."""
    response = RedirectResponse(url, status_code=303)
    if flash:
        set_flash(response, flash, kind)
    return response


def _status_texts() -> dict[int, tuple[str, str]]:
    return {
        400: (_("Bad request"), _("The request could not be understood.")),
        403: (_("Not allowed"), _("You may not do this.")),
        404: (_("Not found"), _("There is nothing at this address, or you may not see it.")),
        405: (_("Not allowed"), _("This address does not accept that kind of request.")),
        409: (_("Conflict"), _("This clashes with the current state; reload the page and try again.")),
        422: (_("Invalid input"), _("Some of what was sent is not valid.")),
        500: (_("Something went wrong"), _("Something went wrong on our side. Please try again later.")),
    }


def render_error(request: Request, status_code: int, message: str, code: str | None = None) -> Response:
    """The error page of a status; 401 on a page means "sign in first" and redirects there."""
    if status_code == 401:
        back = request.url.path
        if request.method == "GET" and request.url.query:
            back += "?" + request.url.query
        login = f"/login?{urlencode({'next': back})}"
        if is_htmx(request):
            # htmx would swap the sign-in page into a fragment; ask it to navigate instead.
            return Response(status_code=204, headers={"HX-Redirect": login})
        return RedirectResponse(login, status_code=303)
    title, generic = _status_texts().get(status_code, _status_texts()[500 if status_code >= 500 else 400])
    # Services write English; show their text only where a translation exists or the page is English.
    translated = _(message) if message else ""
    detail = translated if translated != message or i18n.get_locale() == "en" else ""
    if detail.lower().rstrip(".") in (title.lower(), generic.lower().rstrip(".")):
        detail = ""
    return render(
        request, "error.html", status_code=status_code, status=status_code, title=title, generic=generic,
        detail=detail, code=code,
    )


def new_anon_token() -> str:
    return secrets.token_urlsafe(24)
