"""Real Chromium: the Chongqing region authority signs in, opens the statistics, picks the period in the form,
sees the charts, downloads the XLSX through the page's link, and its numbers equal what the JSON API returns for
the same user, scope and period."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from openpyxl import load_workbook

from labcommons.reporting.exports import hours
from tests.factories import World
from tests.reporting.test_api import REGION_CQ, Stats, build_stats
from tests.web import test_browser_orders as harness
from tests.web.test_browser import CHROMIUM

playwright_api = pytest.importorskip("playwright.sync_api")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.xdist_group("browser"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (make browser)"),
]

PASSWORD = "correct horse"
# The same uvicorn server and Chromium as the order test.
server = harness.server
browser = harness.browser


@pytest.fixture
def stats(world: World) -> Stats:
    return build_stats(world)


def test_region_authority_downloads_the_xlsx_that_matches_the_api(browser: object, server: str,
                                                                  stats: Stats) -> None:
    expect = playwright_api.expect
    context = browser.new_context(locale="zh-CN", viewport={"width": 1280, "height": 1000},  # type: ignore[attr-defined]
                                  accept_downloads=True)
    context.set_default_timeout(15_000)
    page: playwright_api.Page = context.new_page()
    page.goto(f"{server}/login")
    page.fill("input[name=email]", "frank@example.org")
    page.fill("input[name=password]", PASSWORD)
    page.click("form.stacked button[type=submit]")
    page.wait_for_url(f"{server}/")

    # The layout links the statistics; the dashboard opens on the region, the widest scope frank may see.
    page.click('nav.main-nav a[href="/stats"]')
    heading = page.locator("#stats-heading")
    expect(heading).to_have_attribute("data-scope", "region:CQ")
    # The period is chosen in the form (htmx swaps the body; the URL follows).
    page.fill("input[name=from]", stats.first.isoformat())
    page.fill("input[name=to]", stats.last.isoformat())
    page.click("form.stats-form button[type=submit]")
    expect(heading).to_have_attribute("data-from", stats.first.isoformat())
    expect(heading).to_have_attribute("data-to", stats.last.isoformat())
    expect(page).to_have_url(f"{server}/stats?scope=region%3ACQ&from={stats.first.isoformat()}"
                             f"&to={stats.last.isoformat()}")

    # The charts are inline SVG, with their marks.
    expect(page.locator("svg.chart")).to_have_count(6)
    expect(page.locator("svg.chart-heatmap rect.cell")).to_have_count(168)
    expect(page.locator("svg.chart-flows g.flow").first).to_be_visible()
    assert page.locator("svg#chart-top rect.bar").count() >= 3

    with page.expect_download() as download_info:
        page.click("#xlsx-link")
    download = download_info.value
    assert download.suggested_filename == (
        f"labcommons-stats-region-CQ-{stats.first.isoformat()}-{stats.last.isoformat()}.xlsx")
    book = load_workbook(io.BytesIO(Path(download.path()).read_bytes()))  # the saved file has no extension

    # The same user's view through the JSON API (the browser's session cookie authenticates it).
    response = page.request.get(f"{server}/api/v1/stats/dashboard", params=stats.params("region:CQ"))
    assert response.ok, response.text()
    api: dict[str, Any] = response.json()
    t = api["totals"]
    assert t["booked_min"] == REGION_CQ["booked_min"] and t["users"] == REGION_CQ["users"]

    totals = {row[0]: row[2] for row in book["totals"].iter_rows(min_row=4, values_only=True)}
    assert totals["booked_hours"] == pytest.approx(float(hours(t["booked_min"])))
    assert totals["effective_hours"] == pytest.approx(float(hours(t["effective_min"])))
    assert totals["users"] == t["users"] and totals["institutions"] == t["institutions"]
    assert totals["revenue_fen"] == t["revenue_fen"]
    breakdown = {str(r[1]): (r[5], r[6], r[12]) for r in book["breakdown"].iter_rows(min_row=4, values_only=True)}
    # Hours are written as two-decimal numbers, so the floats read back equal the API's minutes / 60 exactly.
    assert breakdown == {b["key"]: (float(hours(b["booked_min"])), float(hours(b["effective_min"])), b["revenue_fen"])
                         for b in api["breakdown"]}
    assert len(breakdown) == 2
    # And the page's key figures say the same.
    users = page.locator('.stat-card[data-key="users"] .value')
    expect(users).to_have_text(str(t["users"]))
    context.close()
