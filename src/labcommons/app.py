"""The application factory: API under /api/v1, pages at /, static files."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from labcommons import __version__, i18n
from labcommons.audit import context as audit_context
from labcommons.config import Settings, get_settings
from labcommons.db import Database
from labcommons.http import SESSION_COOKIE, install_error_handlers
from labcommons.security.middleware import client_address, install_security

API_PREFIX = "/api/v1"


def create_app(
    settings: Settings | None = None, db: Database | None = None, *, run_jobs: bool | None = None
) -> FastAPI:
    """Build the app; the database comes from `db` or from the settings' URL when it starts.

    `run_jobs` starts the in-process job runner with the lifespan; by default only an app that owns its database
    (serve, demo, asgi) runs one, so tests that pass `db` never have a thread sending their mail behind them.
    """
    settings = settings or get_settings()
    in_process_jobs = settings.jobs_in_process and (db is None if run_jobs is None else run_jobs)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = db is None
        app.state.db = db or Database.from_url(
            settings.database_url, busy_timeout=settings.sqlite_busy_timeout_seconds,
            pool_size=settings.db_pool_size,
        )
        runner = None
        if in_process_jobs:
            from labcommons.jobs import Worker

            runner = app.state.job_runner = Worker(app.state.db, poll_seconds=settings.job_poll_seconds)
            runner.start()
        sealer = None
        if owned or run_jobs:
            from labcommons.audit.capture import deferred_sealing
            from labcommons.audit.seal import Sealer

            if deferred_sealing(app.state.db.engine.dialect.name):
                sealer = Sealer(app.state.db, settings.audit_seal_interval_seconds)
                sealer.start()
        try:
            yield
        finally:
            if sealer is not None:
                sealer.stop()
            if runner is not None:
                runner.stop()
            if owned:
                app.state.db.dispose()

    app = FastAPI(
        title="LabCommons API",
        version=__version__,
        description="Shared large instruments and technical services across regions.",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    if db is not None:
        app.state.db = db
    install_error_handlers(app)

    from labcommons.booking.api import router as booking_api
    from labcommons.booking.extra_api import router as booking_extra_api
    from labcommons.catalog.api import router as catalog_api

    api = APIRouter(prefix=API_PREFIX)
    api.include_router(catalog_api)
    api.include_router(booking_api)
    api.include_router(booking_extra_api)
    from labcommons.notifications.api import router as notifications_api

    api.include_router(notifications_api)
    from labcommons.booking.manage_api import router as manage_api
    api.include_router(manage_api)
    from labcommons.orders.api import router as orders_api
    from labcommons.orders.results_api import router as results_api
    from labcommons.orders.samples_api import router as samples_api

    api.include_router(orders_api)
    api.include_router(samples_api)
    api.include_router(results_api)
    from labcommons.billing.talent_api import router as talent_api
    api.include_router(talent_api)
    from labcommons.billing.invoice_api import router as invoice_api
    api.include_router(invoice_api)
    from labcommons.billing.api import router as billing_api  # after invoice_api: /charges.csv before /charges/{id}
    api.include_router(billing_api)
    from labcommons.matching.api import router as matching_api
    api.include_router(matching_api)
    from labcommons.reporting.api import router as reporting_api
    api.include_router(reporting_api)

    @api.get("/health", tags=["ops"])
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    app.include_router(api)

    from labcommons.booking.extra_pages import router as booking_extra_pages
    from labcommons.booking.pages import router as booking_pages
    from labcommons.booking.usage_pages import router as usage_pages
    from labcommons.catalog.pages import router as catalog_pages
    from labcommons.identity.account_pages import router as account_pages
    from labcommons.identity.admin_pages import router as admin_pages
    from labcommons.identity.federation_pages import router as federation_pages
    from labcommons.identity.pages import router as identity_pages
    from labcommons.identity.provider_pages import router as provider_pages

    app.include_router(catalog_pages)
    app.include_router(booking_pages)
    app.include_router(booking_extra_pages)
    app.include_router(usage_pages)
    from labcommons.booking.manage_pages import router as manage_pages
    app.include_router(manage_pages)
    app.include_router(identity_pages)
    app.include_router(federation_pages)
    app.include_router(provider_pages)
    app.include_router(account_pages)
    app.include_router(admin_pages)
    from labcommons.notifications.pages import router as notifications_pages

    app.include_router(notifications_pages)
    from labcommons.catalog.service_pages import router as service_pages
    from labcommons.orders.pages import router as order_pages
    from labcommons.orders.results_pages import router as result_pages
    from labcommons.orders.samples_pages import router as sample_pages

    app.include_router(service_pages)
    app.include_router(order_pages)
    app.include_router(sample_pages)
    app.include_router(result_pages)
    from labcommons.billing.talent_pages import router as talent_pages
    app.include_router(talent_pages)
    from labcommons.billing.pages import router as billing_pages
    app.include_router(billing_pages)
    from labcommons.billing.invoice_pages import router as invoice_pages
    app.include_router(invoice_pages)
    from labcommons.matching.pages import router as matching_pages
    app.include_router(matching_pages)
    from labcommons.reporting.pages import router as reporting_pages
    app.include_router(reporting_pages)
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    from labcommons.audit.api import router as audit_api
    from labcommons.audit.pages import router as audit_pages
    from labcommons.identity.privacy_api import router as privacy_api
    from labcommons.identity.privacy_pages import router as privacy_pages

    app.include_router(audit_api, prefix=API_PREFIX)
    app.include_router(privacy_api, prefix=API_PREFIX)
    app.include_router(audit_pages)
    app.include_router(privacy_pages)

    app.add_middleware(LocaleAndCookies, settings=settings)

    # Outermost, around Starlette's error middleware too: size limits, rate limits and security headers apply to
    # every response, errors included.
    install_security(app, settings)
    from labcommons.ops.observability import install_observability

    # Outermost of all: the request id and the latency histogram cover the security layer's answers too.
    install_observability(app, settings)
    return app


class LocaleAndCookies:
    """Per request: the audit context with the client's address, the locale (query, cookie or Accept-Language), and
    the language and anonymous-visitor cookies of pages.

    A plain ASGI middleware, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs every request in an
    extra task with memory streams, a cost paid on each booking."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from labcommons.pages import ANON_COOKIE, new_anon_token

        request = Request(scope)
        with audit_context.acting("anonymous", client_ip=client_address(request, self.settings)):
            query_lang = request.query_params.get("lang")
            locale = i18n.pick_locale(query_lang, request.cookies.get("lang"), request.headers.get("accept-language"))
            i18n.set_locale(locale)
            path: str = scope["path"]
            is_page = not path.startswith(("/api/", "/static/"))
            cookies = Response()
            if query_lang and is_page:
                cookies.set_cookie("lang", locale, max_age=365 * 86400, samesite="lax")
            if is_page and not request.cookies.get(SESSION_COOKIE) and not request.cookies.get(ANON_COOKIE):
                anon = request.state.anon_token = new_anon_token()
                cookies.set_cookie(ANON_COOKIE, anon, httponly=True, samesite="lax",
                                   secure=self.settings.cookie_secure)
            set_cookies = [value for name, value in cookies.raw_headers if name == b"set-cookie"]
            if not set_cookies:
                await self.app(scope, receive, send)
                return

            async def send_with_cookies(message: Message) -> None:
                if message["type"] == "http.response.start":
                    headers = MutableHeaders(scope=message)
                    for value in set_cookies:
                        headers.append("set-cookie", value.decode("latin-1"))
                await send(message)

            await self.app(scope, receive, send_with_cookies)
