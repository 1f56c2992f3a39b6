"""Real Chromium at the kiosk page: a user with a booking happening now checks in and out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from labcommons.booking.models import Booking, BookingStatus
from tests.booking.test_usage import add_booking, grid_now
from tests.factories import World
from tests.server import running_server

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.xdist_group("browser"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (make browser)"),
]


@pytest.fixture
def server(world: World, db_url: str) -> Iterator[str]:
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


def test_check_in_and_out_at_the_kiosk(page: object, server: str, world: World) -> None:
    expect = playwright_api.expect
    pg: playwright_api.Page = page  # type: ignore[assignment]
    conf = world.instruments["CONF"]
    booking_id = add_booking(world, "alice", starts_at=grid_now())

    pg.goto(f"{server}/kiosk/{conf}")
    expect(pg).to_have_url(f"{server}/login?next=%2Fkiosk%2F{conf}")
    pg.fill("input[name=email]", "alice@example.org")
    pg.fill("input[name=password]", "correct horse")
    pg.click("form.stacked button[type=submit]")
    expect(pg).to_have_url(f"{server}/kiosk/{conf}")
    expect(pg.locator("h1")).to_have_text("激光共聚焦显微镜")
    expect(pg.locator("#now .kiosk-who")).to_have_text("Alice")

    pg.click("#now button[data-action=check_in]")
    expect(pg.locator(".flash")).to_contain_text("已签到：Alice")
    expect(pg.locator("#checked-in")).to_be_visible()
    pg.click("#now button[data-action=check_out]")
    expect(pg.locator(".flash")).to_contain_text("已签退：Alice")
    expect(pg.locator("#now button")).to_have_count(0)

    with world.db.unit_of_work(write=False) as s:
        booking = s.get(Booking, booking_id)
        assert booking is not None
        assert booking.checked_in_at is not None and booking.checked_out_at is not None
        assert booking.checked_out_at >= booking.checked_in_at
        assert booking.status == BookingStatus.completed
