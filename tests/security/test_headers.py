"""Security headers on every response (pages, API, errors, refusals, static files), HSTS only behind TLS, a
Content-Security-Policy the templates keep to, and the API docs' own policy."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from labcommons.app import create_app
from labcommons.config import Settings
from labcommons.db import Database
from labcommons.security.middleware import PAGE_POLICY
from tests.factories import World, next_grid_day
from tests.web.conftest import page_csrf, sign_in

SRC = Path(__file__).resolve().parents[2] / "src" / "labcommons"
COMMON = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
}


def app_client(db: Database, base_url: str = "http://testserver", **settings: Any) -> TestClient:
    app = create_app(Settings(**settings), db=db)

    @app.get("/boom", include_in_schema=False)
    def boom() -> None:
        raise RuntimeError("a bug of ours")

    @app.get("/api/v1/boom", include_in_schema=False)
    def api_boom() -> None:
        raise RuntimeError("a bug of ours")

    return TestClient(app, base_url=base_url, raise_server_exceptions=False)


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    yield app_client(world.db, max_body_bytes=1000)


def assert_protected(response: httpx.Response) -> None:
    headers = response.headers
    for name, value in COMMON.items():
        assert headers.get(name) == value, (response.request.url, name, headers.get(name))
    policy = headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "object-src 'none'" in policy
    assert "camera=()" in headers["permissions-policy"]
    assert "strict-transport-security" not in headers  # plain http


def test_every_kind_of_response_carries_the_headers(client: TestClient, world: World) -> None:
    responses = {
        "page": client.get("/"),
        "login page": client.get("/login"),
        "api": client.get("/api/v1/instruments"),
        "api health": client.get("/api/v1/health"),
        "openapi": client.get("/api/v1/openapi.json"),
        "page 404": client.get("/instruments/999999"),
        "api 404": client.get("/api/v1/instruments/999999"),
        "api 401": client.get("/api/v1/bookings"),
        "api 422": client.get("/api/v1/instruments", params={"limit": "many"}),
        "page 405": client.put("/login"),
        "page 500": client.get("/boom"),
        "api 500": client.get("/api/v1/boom"),
        "413": client.post("/api/v1/bookings", content=b"x" * 1001),
        "stylesheet": client.get("/static/labcommons.css"),
        "script": client.get("/static/htmx.min.js"),
        "static 404": client.get("/static/nothing.js"),
    }
    statuses = {name: r.status_code for name, r in responses.items()}
    assert statuses == {
        "page": 200, "login page": 200, "api": 200, "api health": 200, "openapi": 200, "page 404": 404,
        "api 404": 404, "api 401": 401, "api 422": 422, "page 405": 405, "page 500": 500, "api 500": 500,
        "413": 413, "stylesheet": 200, "script": 200, "static 404": 404,
    }
    for response in responses.values():
        assert_protected(response)
        assert response.headers["content-security-policy"] == PAGE_POLICY
        assert response.headers["cross-origin-opener-policy"] == "same-origin"
    assert responses["api 500"].json()["error"] == "internal_error"



def test_a_refused_write_is_protected_too(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from labcommons.db import utcnow
    from labcommons.security import service

    stopped = utcnow().replace(second=5)
    monkeypatch.setattr(service, "utcnow", lambda: stopped)  # both writes in one window
    client = app_client(world.db, write_rate_per_minute=1)
    assert client.post("/api/v1/bookings", json={}).status_code == 401
    limited = client.post("/api/v1/bookings", json={})
    assert limited.status_code == 429
    assert_protected(limited)
    page = client.post("/logout")
    assert page.status_code == 429 and page.headers["content-type"].startswith("text/html")
    assert_protected(page)


def test_the_page_policy_allows_only_our_own_scripts_and_styles() -> None:
    directives = dict(part.strip().split(" ", 1) for part in PAGE_POLICY.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert "unsafe" not in PAGE_POLICY and "data:" not in PAGE_POLICY and "*" not in PAGE_POLICY
    # form-action is left out on purpose: signing in with a regional identity provider posts a form that is
    # answered by a redirect to the provider, which form-action 'self' would block.
    assert "form-action" not in directives


def test_a_routes_own_policy_stands(world: World, client: TestClient) -> None:
    """Result downloads are sandboxed by their route; the middleware adds its other headers around them."""
    from tests.factories import grant
    from tests.orders.test_results import make_order, upload

    staff = grant(world, "alice")
    order_id = make_order(world)
    row = upload(world, staff, order_id, b"<html><script>alert(1)</script></html>", name="report.html")
    download = client.get(f"/api/v1/orders/{order_id}/results/{row.id}", headers=world.headers("alice"))
    assert download.status_code == 200
    assert download.headers["content-security-policy"] == "sandbox"
    assert download.headers["x-frame-options"] == "DENY"


def test_hsts_only_over_tls(world: World) -> None:
    year = "max-age=31536000"
    https = app_client(world.db, base_url="https://testserver")
    assert https.get("/").headers["strict-transport-security"] == year
    assert https.get("/api/v1/health").headers["strict-transport-security"] == year
    assert https.get("/static/labcommons.css").headers["strict-transport-security"] == year
    assert https.get("/nowhere").headers["strict-transport-security"] == year

    plain = app_client(world.db)
    assert "strict-transport-security" not in plain.get("/").headers
    # The proxy's word counts only when the deployment says the proxy sets it.
    assert "strict-transport-security" not in plain.get("/", headers={"X-Forwarded-Proto": "https"}).headers
    behind_proxy = app_client(world.db, trust_proxy_headers=True, hsts_max_age_seconds=600)
    assert behind_proxy.get("/", headers={"X-Forwarded-Proto": "https"}).headers[
        "strict-transport-security"] == "max-age=600"
    assert "strict-transport-security" not in behind_proxy.get("/", headers={"X-Forwarded-Proto": "http"}).headers
    assert "strict-transport-security" not in behind_proxy.get("/").headers
    off = app_client(world.db, base_url="https://testserver", hsts_max_age_seconds=0)
    assert "strict-transport-security" not in off.get("/").headers


def test_the_api_docs_have_a_policy_of_their_own(client: TestClient) -> None:
    docs = client.get("/api/v1/docs")
    assert docs.status_code == 200 and "SwaggerUIBundle" in docs.text
    policy = docs.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "https://cdn.jsdelivr.net" in policy
    # The one inline script is allowed by its hash, and nothing else inline is.
    inline = re.findall(r"<script>(.*?)</script>", docs.text, re.S)
    assert len(inline) == 1
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    script_src = next(d for d in policy.split(";") if d.strip().startswith("script-src"))
    assert f"'sha256-{digest}'" in script_src and "unsafe" not in script_src
    assert int(docs.headers["content-length"]) == len(docs.content)
    assert docs.headers["x-content-type-options"] == "nosniff"
    redirect = client.get("/docs/oauth2-redirect")
    assert redirect.status_code == 200 and "'sha256-" in redirect.headers["content-security-policy"]
    assert "cross-origin-opener-policy" not in redirect.headers


# --- the templates keep to the policy --------------------------------------------------------------------------

# Markup the page policy would block: inline scripts and styles, inline event handlers, javascript: links.
BLOCKED = {
    "inline script": re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.I),
    "style element": re.compile(r"<style\b", re.I),
    "style attribute": re.compile(r"\sstyle\s*=", re.I),
    "event handler": re.compile(r"\son[a-z]+\s*=", re.I),
    "hx-on": re.compile(r"\b(data-)?hx-on", re.I),
    "javascript: URL": re.compile(r"javascript:", re.I),
}
# Rendered to PDF by WeasyPrint, never served as a page.
PRINT_ONLY = {"invoice_print.html", "settlement_print.html", "report_print.html"}


def test_no_template_needs_inline_code_or_styles() -> None:
    templates = [p for p in SRC.rglob("templates/**/*.html") if p.name not in PRINT_ONLY]
    assert len(templates) > 40
    found = [f"{path.relative_to(SRC)}: {what}" for path in templates
             for what, pattern in BLOCKED.items() if pattern.search(path.read_text("utf-8"))]
    assert found == []


def test_htmx_is_configured_for_the_policy(client: TestClient) -> None:
    page = client.get("/").text
    config = re.search(r'<meta name="htmx-config" content=\'([^\']+)\'>', page)
    assert config is not None
    import json

    settings = json.loads(config.group(1))
    # No eval (hx-on, js: values), no scripts out of swapped responses, no injected indicator <style>.
    assert (settings["allowEval"], settings["allowScriptTags"], settings["includeIndicatorStyles"]) == (
        False, False, False)
    for href in re.findall(r'<(?:script|link)[^>]+(?:src|href)="([^"]+)"', page):
        assert href.startswith("/static/"), href


def test_the_chart_pages_link_their_styles(world: World, client: TestClient) -> None:
    from tests.factories import grant

    grant(world, "alice", "facility_manager")
    sign_in(client, "alice")
    stats = client.get("/stats")
    assert stats.status_code == 200 and '<link rel="stylesheet" href="/static/stats.css">' in stats.text
    assert client.get("/static/stats.css").status_code == 200
    assert client.get("/static/matching.css").status_code == 200
    assert '<link rel="stylesheet" href="/static/matching.css">' in client.get("/match").text
    assert page_csrf(client)


# --- a real browser ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.xdist_group("browser")
@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_a_browser_sees_no_policy_violation_and_htmx_works(world: World, db_url: str) -> None:
    """Chromium under the real headers: no page asks for anything the policy blocks, the live search still swaps
    its results in, and a hostile booking purpose runs nothing."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    from tests.server import running_server
    from tests.web.test_browser import CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed")
    from tests.factories import grant

    grant(world, "alice", "facility_manager")
    start = next_grid_day(days=3)
    hostile = '<script>alert("purpose")</script><img src=x onerror=alert("img")>'
    booked = app_client(world.db).post("/api/v1/bookings", headers=world.headers("alice"), json={
        "instrument_id": world.instruments["CONF"], "starts_at": start.isoformat(),
        "ends_at": (start + timedelta(hours=1)).isoformat(), "purpose": hostile})
    assert booked.status_code == 201, booked.text
    with running_server(db_url) as base, playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(locale="en-US")
        context.set_default_timeout(15_000)
        # Init scripts come from the browser's debugging protocol, which the page's policy does not govern.
        context.add_init_script("window.__violations = [];"
                                "document.addEventListener('securitypolicyviolation', e => window.__violations.push("
                                "e.violatedDirective + ' ' + e.blockedURI + ' ' + e.sourceFile));")
        dialogs: list[str] = []
        page = context.new_page()
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        try:
            page.goto(f"{base}/login")
            page.fill("input[name=email]", "alice@example.org")
            page.fill("input[name=password]", "correct horse")
            page.click("form.stacked button[type=submit]")
            page.wait_for_url(f"{base}/")
            page.evaluate("window.stillTheSamePage = true")
            page.fill("#q", "sequencer")
            playwright_api.expect(page.locator(".result-name")).to_have_text(["High-throughput sequencer"])
            assert page.evaluate("window.stillTheSamePage") is True  # swapped by htmx, not reloaded
            violations = list(page.evaluate("window.__violations"))
            for path in ("/bookings", f"/instruments/{world.instruments['CONF']}", "/match", "/stats",
                         "/manage/approvals", "/account"):
                page.goto(f"{base}{path}")
                page.wait_for_load_state("networkidle")
                violations += [f"{path}: {v}" for v in page.evaluate("window.__violations")]
            page.goto(f"{base}/bookings")
            playwright_api.expect(page.locator("main")).to_contain_text(hostile)  # shown as text, run as nothing
            assert violations == []
            assert dialogs == []
        finally:
            context.close()
            browser.close()
