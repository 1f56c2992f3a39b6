"""Real Chromium: a Chongqing company's engineer books a Sichuan instrument, charging the company account that holds
a Chongqing innovation voucher; the booking is used and charged, the month is invoiced, and the invoice page shows
the voucher's part and the account's part adding up to the total."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from labcommons.billing import invoices
from labcommons.billing.models import AccountKind, Charge, Invoice
from labcommons.booking import usage
from labcommons.booking.models import Booking
from labcommons.db import utcnow
from tests.billing.billing_support import add_company, add_rate, charging, give_voucher, open_account
from tests.factories import World, add_instrument, next_grid_day
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
INDUSTRY_HOURLY_FEN = 30_001  # odd, so the voucher's half is rounded down and the account pays the extra fen


def _setup(world: World) -> tuple[int, int]:
    """A Sichuan confocal that charges industry by the hour; dave's CQ company account with a CQ voucher."""
    with world.db.unit_of_work() as s:
        world.instruments["SC-CONF"] = add_instrument(
            s, world.facilities["SC-UNI"], "SC-CONF", name_zh="转盘共聚焦显微镜", name_en="Spinning-disk confocal",
            min_booking_minutes=60,
        ).id
    add_company(world)  # dave, at a Chongqing company
    charging(world, "SC-UNI")
    add_rate(world, instrument="SC-CONF", category="industry", amount_fen=INDUSTRY_HOURLY_FEN)
    account = open_account(world, "dave", "CQ-CO-ACC", kind=AccountKind.company)
    voucher = give_voucher(world, account, 500_000, issuer="CQ", kinds="instrument", code="CQ-IV-E2E")
    return account, voucher


def _fen(text: str) -> int:
    """An amount as the page prints it (currency sign, thousands separators) in fen."""
    cleaned = re.sub(r"[^0-9.\-]", "", text)
    return int(Decimal(cleaned) * 100)


def test_company_voucher_pays_its_share_of_a_cross_region_booking(browser: object, server: str,
                                                                  world: World) -> None:
    expect = playwright_api.expect
    account_id, _voucher_id = _setup(world)
    start = next_grid_day(days=3, hour=2).astimezone(ZoneInfo("Asia/Shanghai"))

    context = browser.new_context(locale="zh-CN", viewport={"width": 1280, "height": 1000})  # type: ignore[attr-defined]
    context.set_default_timeout(15_000)
    page: playwright_api.Page = context.new_page()
    page.goto(f"{server}/login")
    page.fill("input[name=email]", "dave@example.org")
    page.fill("input[name=password]", PASSWORD)
    page.click("form.stacked button[type=submit]")
    page.wait_for_url(f"{server}/")

    # The booking form shows the rate card and the account to charge; dave picks the company account.
    page.goto(f"{server}/instruments/{world.instruments['SC-CONF']}")
    form = page.locator("form.book-form")
    expect(form.locator("#charge-to")).to_be_visible()
    form.locator("input[name=date]").fill(start.date().isoformat())
    form.locator("input[name=start]").fill(start.strftime("%H:%M"))
    form.locator("select[name=duration]").select_option("60")
    form.locator("textarea[name=purpose]").fill("类器官活细胞成像")
    form.locator("select[name=account_id]").select_option(str(account_id))
    form.locator("button.book-once").click()
    expect(page).to_have_url(f"{server}/bookings")
    expect(page.locator("#upcoming .booking")).to_have_count(1)

    # Used at the instrument (check-in and check-out as the instrument computer would report them), then the
    # month is invoiced: the charge is split into the voucher's half and the account's rest.
    with world.db.unit_of_work() as s:
        booking = s.scalars(select(Booking).where(Booking.user_id == world.actors["dave"].user_id)).one()
        usage.check_in(s, booking, now=booking.starts_at + timedelta(minutes=1))
        usage.check_out(s, booking, now=booking.ends_at)
        charge = s.scalars(select(Charge).where(Charge.source_id == booking.id)).one()
        assert charge.account_id == account_id and charge.amount_fen == INDUSTRY_HOURLY_FEN
        now = utcnow()
        made = invoices.generate_invoices(s, invoices.period_of(now), now=now, allow_open=True)
        assert len(made) == 1
        invoice_id = made[0].id
    with world.db.unit_of_work(write=False) as s:
        invoice = s.get(Invoice, invoice_id)
        assert invoice is not None
        voucher_fen, due_fen = INDUSTRY_HOURLY_FEN * 5000 // 10000, INDUSTRY_HOURLY_FEN - INDUSTRY_HOURLY_FEN // 2
        assert (invoice.voucher_fen, invoice.prepaid_fen, invoice.due_fen) == (voucher_fen, 0, due_fen)
        number = invoice.number

    page.goto(f"{server}/billing/invoices")
    page.click(f"text={number}")
    expect(page).to_have_url(f"{server}/billing/invoices/{invoice_id}")
    expect(page.locator("body")).to_contain_text("CQ-IV-E2E")
    cells = page.locator("#totals td")
    net, voucher, prepaid, due = (_fen(cells.nth(i).inner_text()) for i in (2, 3, 4, 5))
    assert (net, voucher, prepaid, due) == (INDUSTRY_HOURLY_FEN, voucher_fen, 0, due_fen)
    assert voucher + prepaid + due == net
    line = page.locator("td.voucher-part").first
    assert _fen(line.inner_text().split("\n")[0]) == voucher_fen
    context.close()
