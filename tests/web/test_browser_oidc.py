"""Real Chromium signs in through the demo Sichuan identity service and books an instrument as the new user.

The two demo regional providers run in this process on loopback; the app is a separate uvicorn process that
reaches them over real HTTP for discovery, the code exchange and the JWKS, as it would reach real ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from labcommons.booking.models import Booking
from labcommons.catalog.service import get_instrument
from labcommons.identity.demo_providers import (
    DEMO_REGIONS,
    DemoPerson,
    DemoProviderHandle,
    register_demo_provider,
    serve_in_thread,
)
from labcommons.identity.models import ExternalIdentity, User
from tests.factories import World, next_grid_day
from tests.server import free_port, running_server
from tests.web.test_browser import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS

playwright_api = pytest.importorskip("playwright.sync_api")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.xdist_group("browser"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (make browser)"),
]

SC = DEMO_REGIONS["SC"]
# The test world's Alice is also known to the Chongqing service, as the demo's Li Wei is: her account gets linked.
ALICE_AT_CQ = DemoPerson("cq-alice", "Alice Zhang", "alice@example.org", "CQ-LAB", "测试实验室", "Test laboratory",
                         has_local_account=True)
CQ = replace(DEMO_REGIONS["CQ"], persons=(*DEMO_REGIONS["CQ"].persons, ALICE_AT_CQ))
# A Sichuan person new to the platform; the test world has no institution SC-TECH, so the claim is ignored.
NEWCOMER = next(p for p in SC.persons if p.sub == "sc-0002")


@pytest.fixture
def stack(world: World, db_url: str) -> Iterator[tuple[str, dict[str, DemoProviderHandle]]]:
    """Both demo providers on free ports, registered in the test database, and the app that trusts them."""
    app_port = free_port()
    app_base = f"http://127.0.0.1:{app_port}"
    handles = {region.code: serve_in_thread(region, 0, app_base_url=app_base) for region in (SC, CQ)}
    try:
        with world.db.unit_of_work() as s:
            for handle in handles.values():
                register_demo_provider(s, handle.region, handle.issuer)
        with running_server(db_url, port=app_port) as base:
            assert base == app_base
            yield base, handles
    finally:
        for handle in handles.values():
            handle.stop()


@pytest.fixture
def page(stack: tuple[str, dict[str, DemoProviderHandle]]) -> Iterator[object]:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(locale="zh-CN", viewport={"width": 1280, "height": 900})
        context.set_default_timeout(15_000)
        try:
            yield context.new_page()
        finally:
            context.close()
            browser.close()


def test_sign_in_with_the_sichuan_demo_service_and_book(
    page: object, stack: tuple[str, dict[str, DemoProviderHandle]], world: World, request: pytest.FixtureRequest
) -> None:
    expect = playwright_api.expect
    pg: playwright_api.Page = page  # type: ignore[assignment]
    server, handles = stack
    engine = request.node.callspec.params["db"]
    with world.db.unit_of_work(write=False) as s:
        length = get_instrument(s, world.instruments["SEQ"]).min_booking_minutes
    start = next_grid_day(days=4, hour=3).astimezone(ZoneInfo("Asia/Shanghai"))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    pg.goto(f"{server}/login")
    expect(pg.locator("button[data-provider]")).to_have_count(2)
    sichuan = pg.locator(f'button[data-provider="{SC.name}"]')
    expect(sichuan).to_contain_text(SC.display_name_zh)
    pg.screenshot(path=str(SCREENSHOTS / f"login-providers-{engine}.png"), full_page=True)
    sichuan.click()

    # On the provider: its own page, listing the demo people as one-click buttons.
    expect(pg.locator("h1")).to_have_text(SC.display_name_zh)
    assert pg.url.startswith(f"{handles['SC'].issuer}/authorize?")
    expect(pg.locator("button.person")).to_have_count(len(SC.persons))
    pg.screenshot(path=str(SCREENSHOTS / f"demo-idp-sc-{engine}.png"), full_page=True)
    pg.click(f'button.person[data-sub="{NEWCOMER.sub}"]')

    # Back on the platform, signed in as the newcomer.
    expect(pg.locator("header .who")).to_have_text(NEWCOMER.name)
    assert pg.url.startswith(server)

    pg.goto(f"{server}/instruments/{world.instruments['SEQ']}")
    expect(pg.locator("h1")).to_contain_text("高通量基因测序仪")
    form = pg.locator("form.book-form")
    form.locator("input[name=date]").fill(start.date().isoformat())
    form.locator("input[name=start]").fill(start.strftime("%H:%M"))
    form.locator("select[name=duration]").select_option(str(length))
    form.locator("textarea[name=purpose]").fill("空间转录组预实验")
    form.locator("button.book-once").click()
    expect(pg).to_have_url(f"{server}/bookings")
    expect(pg.locator(".flash")).to_contain_text("预约成功：高通量基因测序仪")
    expect(pg.locator("#upcoming .booking")).to_have_count(1)
    pg.screenshot(path=str(SCREENSHOTS / f"oidc-booking-{engine}.png"), full_page=True)

    with world.db.unit_of_work(write=False) as s:
        user = s.scalars(select(User).where(User.email == NEWCOMER.email)).one()
        assert (user.name, user.region_code, user.institution_id, user.password_hash) == (
            NEWCOMER.name, "SC", None, None)
        identity = s.scalars(select(ExternalIdentity).where(ExternalIdentity.user_id == user.id)).one()
        assert (identity.issuer, identity.subject) == (handles["SC"].issuer, NEWCOMER.sub)
        bookings = s.scalars(select(Booking).where(Booking.user_id == user.id)).all()
        assert [(b.instrument_id, b.purpose) for b in bookings] == [(world.instruments["SEQ"], "空间转录组预实验")]


def test_the_chongqing_service_links_to_an_existing_account_by_verified_email(
    page: object, stack: tuple[str, dict[str, DemoProviderHandle]], world: World
) -> None:
    expect = playwright_api.expect
    pg: playwright_api.Page = page  # type: ignore[assignment]
    server, handles = stack

    pg.goto(f"{server}/login")
    pg.click(f'button[data-provider="{CQ.name}"]')
    expect(pg.locator("h1")).to_have_text(CQ.display_name_zh)
    pg.click(f'button.person[data-sub="{ALICE_AT_CQ.sub}"]')
    # Signed in to her existing account (its name, not the provider's), now linked to the Chongqing identity.
    expect(pg.locator("header .who")).to_have_text("Alice")
    with world.db.unit_of_work(write=False) as s:
        identity = s.scalars(select(ExternalIdentity).where(ExternalIdentity.subject == ALICE_AT_CQ.sub)).one()
        assert (identity.user_id, identity.issuer) == (world.actors["alice"].user_id, handles["CQ"].issuer)
        assert s.scalars(select(User).where(User.email == "alice@example.org")).one().password_hash is not None
