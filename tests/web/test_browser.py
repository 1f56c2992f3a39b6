"""Real Chromium against a real uvicorn process: sign in, search in Chinese, book, and hit a double booking.

It runs on both engines on purpose: the server is a separate process sharing the test database, which is how
the app is deployed (a SQLite file opened by several processes, or one PostgreSQL), and the double booking
is refused by each engine's own overlap guard. Each run takes a few seconds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from labcommons.catalog.service import get_instrument
from tests.factories import World, next_grid_day
from tests.server import running_server

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(os.environ.get("LABCOMMONS_SCREENSHOTS", "/tmp/labcommons-screenshots"))

pytestmark = [
    pytest.mark.browser,
    pytest.mark.xdist_group("browser"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (make browser)"),
]


@pytest.fixture
def server(world: World, db_url: str) -> Iterator[str]:
    """`uvicorn labcommons.asgi:app` on a free loopback port, serving the test database."""
    with running_server(db_url) as base:
        yield base


@pytest.fixture
def page(server: str) -> Iterator[object]:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(locale="zh-CN", viewport={"width": 1280, "height": 900})
        context.set_default_timeout(15_000)
        try:
            yield context.new_page()
        finally:
            context.close()
            browser.close()


def test_sign_in_search_book_and_see_the_double_booking_refused(
    page: object, server: str, world: World, request: pytest.FixtureRequest
) -> None:
    expect = playwright_api.expect
    pg: playwright_api.Page = page  # type: ignore[assignment]
    engine = request.node.callspec.params["db"]
    with world.db.unit_of_work(write=False) as s:
        length = get_instrument(s, world.instruments["SEQ"]).min_booking_minutes
    start = next_grid_day(days=3, hour=2).astimezone(ZoneInfo("Asia/Shanghai"))

    pg.goto(f"{server}/login")
    pg.fill("input[name=email]", "alice@example.org")
    pg.fill("input[name=password]", "correct horse")
    pg.click("form.stacked button[type=submit]")
    expect(pg.locator(".flash")).to_contain_text("已登录：Alice")
    expect(pg.locator("header .who")).to_have_text("Alice")

    # Typing searches through htmx: the results block changes without a page load.
    pg.evaluate("window.stillTheSamePage = true")
    pg.fill("#q", "测序")
    expect(pg.locator(".result-name")).to_have_text(["高通量基因测序仪"])
    expect(pg).to_have_url(re.compile(r"/\?q=%E6%B5%8B%E5%BA%8F"))  # shareable: htmx pushes the search URL
    assert pg.evaluate("window.stillTheSamePage") is True
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SCREENSHOTS / f"home-{engine}.png"), full_page=True)

    pg.click("text=高通量基因测序仪")
    expect(pg.locator("h1")).to_contain_text("高通量基因测序仪")
    expect(pg.locator("#calendar")).to_be_visible()

    def fill_booking(purpose: str) -> None:
        form = pg.locator("form.book-form")
        form.locator("input[name=date]").fill(start.date().isoformat())
        form.locator("input[name=start]").fill(start.strftime("%H:%M"))
        form.locator("select[name=duration]").select_option(str(length))
        form.locator("textarea[name=purpose]").fill(purpose)
        form.locator("button.book-once").click()

    fill_booking("单细胞转录组测序")
    expect(pg).to_have_url(f"{server}/bookings")
    expect(pg.locator(".flash")).to_contain_text("预约成功：高通量基因测序仪")
    row = pg.locator("#upcoming .booking")
    expect(row).to_have_count(1)
    expect(row).to_contain_text(start.strftime("%Y-%m-%d %H:%M"))
    expect(row).to_contain_text("单细胞转录组测序")

    pg.click("#upcoming .booking-name")
    expect(pg.locator(f'td[data-cell="{start:%Y-%m-%dT%H}"]')).to_have_text("您的")
    pg.screenshot(path=str(SCREENSHOTS / f"instrument-{engine}.png"), full_page=True)

    fill_booking("再订一次")
    expect(pg.locator("#book-error")).to_contain_text("该时段已被预约")
    # The form keeps what was typed.
    expect(pg.locator("form.book-form textarea[name=purpose]")).to_have_value("再订一次")
    expect(pg.locator("form.book-form input[name=start]")).to_have_value(start.strftime("%H:%M"))

    pg.goto(f"{server}/bookings")
    expect(pg.locator("#upcoming .booking")).to_have_count(1)
