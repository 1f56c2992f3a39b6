"""HTTP defences for every response: body size limits, write rate limits, security headers.

One pure ASGI middleware wrapped around the whole app, outside Starlette's error middleware, so its headers are on
every response, the 500 page included. It refuses before the app runs: a Content-Length above the route's limit
(413), a write over the caller's budget for the minute (429). A body sent without a length (chunked) is counted as
it streams; the first byte past the limit fails the app's read, and whatever the app then answers is replaced by
the 413.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from labcommons import i18n
from labcommons.config import Settings
from labcommons.errors import DomainError
from labcommons.i18n import gettext_ as _

log = logging.getLogger("labcommons.security")

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Result files go to these routes (the API takes the raw bytes, the order page a multipart form around them). They
# check the file's size themselves, on its Content-Length before reading and at the first byte past
# result_max_bytes while streaming, and answer with their own 413 file_too_large (or, on the page, a flash);
# here they only get a backstop a little above that, so the friendlier answer comes first.
_UPLOAD = re.compile(r"(/api/v1)?/orders/[0-9]+/results")
UPLOAD_SLACK_BYTES = 256 * 1024

# Pages: only our own scripts, styles and images (htmx is served from /static and runs with eval off). No
# form-action: signing in with another region's identity provider is a form post answered by a redirect to that
# provider, which form-action 'self' would block.
PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
               "base-uri 'self'; frame-ancestors 'none'")
# Swagger UI (the API docs) comes from a CDN, styles itself inline and starts from an inline script, which is
# allowed by its hash (taken from the page as it is served). The page shows no user data.
DOCS_POLICY = ("default-src 'self'; script-src 'self' https://cdn.jsdelivr.net {hashes}; "
               "style-src 'self' https://cdn.jsdelivr.net 'unsafe-inline'; "
               "img-src 'self' data: https://fastapi.tiangolo.com; object-src 'none'; base-uri 'self'; "
               "frame-ancestors 'none'")
_INLINE_SCRIPT = re.compile(rb"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.S | re.I)
# No page of ours uses these browser features; nothing embedded or injected may either.
PERMISSIONS_POLICY = "camera=(), microphone=(), geolocation=(), payment=(), usb=(), serial=(), bluetooth=(), midi=()"


class BodyTooLarge(DomainError):
    """A request body past the route's limit; raised from the app's read of the body."""

    status_code = 413
    code = "body_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body is larger than the limit of {limit} bytes.", field="body",
                         max_bytes=limit)


def client_address(request: Request, settings: Settings) -> str | None:
    """The client's address: when the proxy is trusted, the last X-Forwarded-For entry, else the socket peer.

    The last entry is the one our proxy appended (nginx's $proxy_add_x_forwarded_for); those before it come from
    the client and could be anything, so trusting the first would let a client pick its own address."""
    if settings.trust_proxy_headers:
        forwarded = request.headers.get("x-forwarded-for", "")
        last = forwarded.split(",")[-1].strip()
        if last:
            return last[:64]
    return request.client.host if request.client else None


def over_tls(request: Request, settings: Settings) -> bool:
    """Whether the browser reached us over https: directly, or through a trusted proxy that says so."""
    if request.url.scheme == "https":
        return True
    if settings.trust_proxy_headers:
        return request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower() == "https"
    return False


def body_limit(settings: Settings, path: str) -> int:
    """The largest body a request to `path` may carry."""
    if _UPLOAD.fullmatch(path):
        return max(settings.result_max_bytes + UPLOAD_SLACK_BYTES, settings.max_body_bytes)
    return settings.max_body_bytes


def declared_length(headers: Headers) -> int | None:
    """The Content-Length, None when absent or not a number (the server refuses those; counting still applies)."""
    raw = headers.get("content-length", "").strip()
    return int(raw) if raw.isdigit() and len(raw) <= 20 else None


def _status_texts(status: int) -> tuple[str, str]:
    if status == 413:
        return _("Too large"), _("What was sent is larger than this address accepts.")
    return _("Too many requests"), _("You are making changes faster than allowed. Wait a minute and try again.")


@dataclass
class _Exchange:
    """What the middleware knows about one request while the app handles it."""

    limit: int
    received: int = 0
    overflow: bool = False
    started: bool = False
    replaced: bool = False


class SecurityMiddleware:
    """Size limits, write rate limits and security headers; see the module's docstring."""

    def __init__(self, app: ASGIApp, settings: Settings, docs_paths: frozenset[str]) -> None:
        self.app = app
        self.settings = settings
        self.docs_paths = docs_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        path: str = scope["path"]
        tls = over_tls(request, self.settings)
        send = self._buffer_docs(send) if path in self.docs_paths else send
        send = self._with_headers(send, tls=tls, docs=path in self.docs_paths)
        exchange = _Exchange(limit=body_limit(self.settings, path))
        declared = declared_length(request.headers)
        if declared is not None and declared > exchange.limit:
            await self._refuse_too_large(request, send, exchange.limit)
            return
        if scope["method"] in WRITE_METHODS and self.settings.write_rate_per_minute > 0:
            retry_after = await self._over_rate(request)
            if retry_after is not None:
                await self._refuse_rate(request, send, retry_after)
                return

        async def counted_receive() -> Message:
            if exchange.overflow:
                raise BodyTooLarge(exchange.limit)
            message = await receive()
            if message["type"] == "http.request":
                exchange.received += len(message.get("body", b""))
                if exchange.received > exchange.limit:
                    exchange.overflow = True
                    raise BodyTooLarge(exchange.limit)
            return message

        async def guarded_send(message: Message) -> None:
            if exchange.replaced:
                return
            if message["type"] == "http.response.start":
                if exchange.overflow:
                    # Whatever the app made of the failed read (400, 500, a redirect with a flash), it is a 413.
                    exchange.replaced = True
                    await self._refuse_too_large(request, send, exchange.limit)
                    return
                exchange.started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            # A failed read of an oversized body is answered here, not logged as an error of ours (Starlette's
            # error middleware re-raises after its 500, which guarded_send has already turned into the 413).
            if not exchange.overflow:
                raise
            if not exchange.started and not exchange.replaced:
                await self._refuse_too_large(request, send, exchange.limit)

    # --- rate limit --------------------------------------------------------------------------------------------

    async def _over_rate(self, request: Request) -> int | None:
        """Count this write; the seconds to wait when it is over the caller's budget, else None."""
        from labcommons.http import SESSION_COOKIE
        from labcommons.security import service

        scheme, _sep, token = request.headers.get("authorization", "").partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" else None
        database = request.app.state.db

        def count() -> service.WriteCount:
            # Its own short write transaction before the request's: on SQLite (one writer at a time) it takes the
            # write lock up front (BEGIN IMMEDIATE, so no read-to-write upgrade can fail) for one statement, and the
            # count stands even when the write it counts is rolled back.
            with database.unit_of_work() as session:
                return service.count_write(
                    session, limit=self.settings.write_rate_per_minute,
                    address=client_address(request, self.settings), bearer=bearer or None,
                    session_token=request.cookies.get(SESSION_COOKIE) or None,
                )

        try:
            counted = await run_in_threadpool(count)
        except Exception:
            # The limit protects the database; when the database cannot count, the write itself will fail there.
            log.exception("could not count a write for the rate limit")
            return None
        return None if counted.allowed else counted.retry_after

    # --- refusals ----------------------------------------------------------------------------------------------

    async def _refuse_too_large(self, request: Request, send: Send, limit: int) -> None:
        error = BodyTooLarge(limit)
        response = self._refusal(request, error.status_code, error.body(), headers={"Connection": "close"})
        await response(request.scope, _no_body, send)

    async def _refuse_rate(self, request: Request, send: Send, retry_after: int) -> None:
        body = {"error": "rate_limited", "message": f"Too many writes; try again in {retry_after} seconds.",
                "field": None, "retry_after": retry_after}
        response = self._refusal(request, 429, body, headers={"Retry-After": str(retry_after)})
        await response(request.scope, _no_body, send)

    def _refusal(self, request: Request, status: int, body: dict[str, Any], headers: dict[str, str]) -> Response:
        """The JSON error under /api, else the translated error page."""
        if request.url.path.startswith("/api/"):
            return JSONResponse(body, status_code=status, headers=headers)
        query_lang = request.query_params.get("lang")
        i18n.set_locale(i18n.pick_locale(query_lang, request.cookies.get("lang"),
                                         request.headers.get("accept-language")))
        title, generic = _status_texts(status)
        try:
            from labcommons.pages import render

            page: Response = render(request, "error.html", status_code=status, status=status, title=title,
                                    generic=generic, detail="", code=body["error"])
        except Exception:
            # The page needs the database (who is signed in); the refusal must not depend on it.
            log.exception("could not render the %s page", status)
            page = HTMLResponse(f"<!doctype html><title>{status}</title><h1>{title}</h1><p>{generic}</p>",
                                status_code=status)
        page.headers.update(headers)
        return page

    # --- headers -----------------------------------------------------------------------------------------------

    def _with_headers(self, send: Send, *, tls: bool, docs: bool) -> Send:
        settings = self.settings

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                # A route's own policy stands (result downloads are sandboxed); everything else gets ours.
                headers.setdefault("Content-Security-Policy", PAGE_POLICY)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Referrer-Policy", "same-origin")
                headers.setdefault("Permissions-Policy", PERMISSIONS_POLICY)
                if not docs:
                    # The docs' OAuth2 redirect page talks to its opener; nothing else of ours needs one.
                    headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
                if tls and settings.hsts_max_age_seconds > 0:
                    headers.setdefault("Strict-Transport-Security", f"max-age={settings.hsts_max_age_seconds}")
            await send(message)

        return send_with_headers

    @staticmethod
    def _buffer_docs(send: Send) -> Send:
        """Hold the docs page until it is whole, to allow exactly its inline scripts by their hashes."""
        start: MutableMapping[str, Any] | None = None
        chunks: list[bytes] = []

        async def buffered(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            hashes = " ".join(
                f"'sha256-{base64.b64encode(hashlib.sha256(m.group(1)).digest()).decode()}'"
                for m in _INLINE_SCRIPT.finditer(body)
            )
            headers = MutableHeaders(scope=start)
            headers["Content-Security-Policy"] = DOCS_POLICY.format(hashes=hashes).replace("  ", " ")
            headers["Content-Length"] = str(len(body))
            await send(start)
            await send({"type": "http.response.body", "body": body, "more_body": False})

        return buffered


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def install_security(app: FastAPI, settings: Settings) -> None:
    """Wrap `app` in the size limit, rate limit and header middleware, outermost (outside even Starlette's error
    middleware, so a 500 carries the headers too)."""
    docs_paths = frozenset(p for p in (app.docs_url, app.swagger_ui_oauth2_redirect_url) if p)
    build_stack: Callable[[], ASGIApp] = app.build_middleware_stack

    def build_with_security() -> ASGIApp:
        return SecurityMiddleware(build_stack(), settings, docs_paths)

    app.build_middleware_stack = build_with_security  # type: ignore[method-assign]
