"""Real Chromium: a facility manager approves one pending booking and declines another with a reason."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from labcommons.booking import service
from labcommons.booking.models import Booking, BookingPolicy, BookingStatus
from labcommons.booking.policy import DEFAULTS
from labcommons.identity import roles
from labcommons.identity import service as identity
from tests.factories import World, next_grid_day
from tests.server import running_server
from tests.web.test_browser import CHROMIUM, CHROMIUM_ARGS

playwright_api = pytest.importorskip("playwright.sync_api")

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


def _pending_bookings(world: World) -> list[int]:
    conf = world.instruments["CONF"]
    start = next_grid_day(days=3)
    with world.db.unit_of_work() as s:
        s.merge(BookingPolicy(instrument_id=conf, **(DEFAULTS | {"requires_approval": True})))
        s.flush()
        roles.grant_role(s, None, identity.find_user(s, "bob@example.org"), "facility_manager",
                         facility_id=world.facilities["CQ-LAB"])
        ids = []
        for hours, user in ((0, "alice"), (2, "carol")):
            b = service.reserve_slot(s, world.actors[user], conf, start + timedelta(hours=hours),
                                     start + timedelta(hours=hours + 1), "FISH imaging")
            assert b.status == BookingStatus.pending
            ids.append(b.id)
    return ids


def test_manager_approves_one_booking_and_declines_another(page: object, server: str, world: World) -> None:
    expect = playwright_api.expect
    pg: playwright_api.Page = page  # type: ignore[assignment]
    approve_id, decline_id = _pending_bookings(world)

    pg.goto(f"{server}/login")
    pg.fill("input[name=email]", "bob@example.org")
    pg.fill("input[name=password]", "correct horse")
    pg.click("form.stacked button[type=submit]")
    pg.click("nav.main-nav >> text=审批")
    expect(pg.locator("h1")).to_have_text("待审批的预约")
    expect(pg.locator("#pending .booking")).to_have_count(2)

    pg.locator(f'[data-booking="{approve_id}"] .approve-form button').click()
    expect(pg.locator(".flash")).to_contain_text("已批准")
    expect(pg.locator("#pending .booking")).to_have_count(1)

    row = pg.locator(f'[data-booking="{decline_id}"]')
    row.locator("input[name=reason]").fill("激光器本周检修")
    row.locator(".decline-form button").click()
    expect(pg.locator(".flash")).to_contain_text("已拒绝")
    expect(pg.locator(".empty")).to_contain_text("没有待审批的预约")

    with world.db.unit_of_work(write=False) as s:
        approved, declined = s.get(Booking, approve_id), s.get(Booking, decline_id)
        assert approved is not None and declined is not None
        bob = world.actors["bob"].user_id
        assert (approved.status, approved.decided_by_id) == (BookingStatus.confirmed, bob)
        assert (declined.status, declined.cancel_kind, declined.cancel_note, declined.decided_by_id) == (
            BookingStatus.cancelled, "declined", "激光器本周检修", bob)
