"""Real Chromium, two people: a Chongqing company engineer orders a test from a Sichuan facility, staff quote it,
the engineer accepts, staff receive the sample and print its label, deliver the report, the engineer downloads
it (checksum equal to what was uploaded) and rates the service."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from labcommons.catalog.models import Institution, InstitutionKind, PriceUnit, Service, ServiceKind
from labcommons.catalog.service import place_service
from labcommons.identity import roles
from labcommons.identity import service as identity
from labcommons.orders.models import OrderStatus, ResultFile, ServiceOrder
from tests.factories import World
from tests.server import running_server
from tests.web.test_browser import CHROMIUM, CHROMIUM_ARGS

playwright_api = pytest.importorskip("playwright.sync_api")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.xdist_group("browser"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (make browser)"),
]

PASSWORD = "correct horse"
REPORT = "检测报告 SC-PROT-2026.pdf"


def _setup(world: World) -> int:
    """A quote-on-request proteomics test at the Sichuan facility, carol as its staff, dan at a CQ company."""
    with world.db.unit_of_work() as s:
        company = Institution(code="CQ-BIOTECH", region_code="CQ", kind=InstitutionKind.company,
                              name_zh="两江生物科技有限公司", name_en="Liangjiang Biotech Co.")
        s.add(company)
        s.flush()
        identity.create_user(s, email="dan@example.org", name="Dan Zhou", institution_code="CQ-BIOTECH",
                             password=PASSWORD)
        roles.grant_role(s, None, identity.find_user(s, "carol@example.org"), "facility_staff",
                         facility_id=world.facilities["SC-UNI"])
        service = Service(
            code="SC-PROT-01", facility_id=world.facilities["SC-UNI"], kind=ServiceKind.testing,
            name_zh="血清蛋白质组定量检测", name_en="Serum proteome quantification", category_code="ANA.MS",
            description_zh="DIA 定量，含质控报告。", description_en="DIA quantification with a QC report.",
            turnaround_days=10, list_price_fen=None, price_unit=PriceUnit.sample,
            sample_requirements_zh="血清 ≥ 100 µL，干冰运输。", sample_requirements_en="Serum ≥ 100 µL on dry ice.",
        )
        place_service(s, service)
        s.add(service)
        s.flush()
        return service.id


@pytest.fixture
def server(world: World, db_url: str, tmp_path: Path) -> Iterator[str]:
    env = {"LABCOMMONS_RESULT_DIR": str(tmp_path / "results"), "LABCOMMONS_RESULT_TMP_DIR": str(tmp_path / "tmp")}
    with running_server(db_url, env=env) as base:
        yield base


@pytest.fixture
def browser(server: str) -> Iterator[object]:
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _signed_in(browser: object, server: str, email: str, locale: str) -> playwright_api.Page:
    context = browser.new_context(locale=locale, viewport={"width": 1280, "height": 1000},  # type: ignore[attr-defined]
                                  accept_downloads=True)
    context.set_default_timeout(15_000)
    page: playwright_api.Page = context.new_page()
    page.goto(f"{server}/login")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", PASSWORD)
    page.click("form.stacked button[type=submit]")
    page.wait_for_url(f"{server}/")
    return page


def _status(page: playwright_api.Page) -> str:
    return page.locator("#order-status").get_attribute("data-status") or ""


def _order(world: World) -> ServiceOrder:
    with world.db.unit_of_work(write=False) as s:
        order = s.scalars(select(ServiceOrder)).one()
        s.expunge(order)
        return order


def test_company_orders_a_test_and_gets_a_checked_report(
    browser: object, server: str, world: World, tmp_path: Path
) -> None:
    expect = playwright_api.expect
    service_id = _setup(world)
    customer = _signed_in(browser, server, "dan@example.org", "zh-CN")
    staff = _signed_in(browser, server, "carol@example.org", "en-GB")

    # The engineer finds the service by the same search as instruments, under the Testing kind, and orders it.
    customer.goto(f"{server}/?q=蛋白质组&kind=testing")
    customer.click(f'a[href="/services/{service_id}"]')
    expect(customer.locator("h1")).to_contain_text("血清蛋白质组定量检测")
    customer.click("a.order")
    customer.fill("input[name=title]", "血清样本蛋白质组检测")
    customer.fill("textarea[name=description]", "两份血清，DIA 定量，需要差异分析。")
    customer.fill("input[name=sample_count]", "1")
    customer.click("button[name=action][value=submit]")
    expect(customer.locator("#order-status")).to_have_attribute("data-status", "submitted")
    order = _order(world)
    order_url = f"{server}/orders/{order.id}"

    # Staff find it in their queue and quote two lines (one price with fen).
    staff.goto(f"{server}/manage/orders")
    staff.click(f'a[href="/orders/{order.id}"]')
    lines = staff.locator(".quote-form-lines tbody tr")
    lines.nth(0).locator("input[name=line_description]").fill("DIA proteome quantification")
    lines.nth(0).locator("input[name=line_quantity]").fill("1")
    lines.nth(0).locator("input[name=line_price]").fill("1200.50")
    lines.nth(1).locator("input[name=line_description]").fill("Differential analysis report")
    lines.nth(1).locator("input[name=line_quantity]").fill("2")
    lines.nth(1).locator("input[name=line_price]").fill("300")
    staff.click(".quote-form button[type=submit]")
    expect(staff.locator("#order-status")).to_have_attribute("data-status", "quoted")
    expect(staff.locator("#quote-total")).to_contain_text("¥1,800.50")

    # The engineer sees the same total and accepts.
    customer.goto(order_url)
    expect(customer.locator("#quote-total")).to_contain_text("¥1,800.50")
    customer.click(".accept-quote button")
    expect(customer.locator("#order-status")).to_have_attribute("data-status", "accepted")

    # Staff receive the sample (the order moves on by itself) and open its printable label.
    staff.goto(order_url)
    staff.locator(".sample-register").evaluate("d => d.open = true")
    staff.fill(".sample-register-form textarea[name=descriptions]", "Serum A, 120 µL")
    staff.check(".sample-register-form input[name=receive]")
    staff.fill(".sample-register-form input[name=location]", "Freezer B2")
    staff.click(".sample-register-form button[type=submit]")
    expect(staff.locator("#order-status")).to_have_attribute("data-status", "samples_received")
    sample_code = f"{order.number}-S01"
    expect(staff.locator("#samples")).to_contain_text(sample_code)
    staff.click("a.sample-label-link")
    expect(staff.locator("body")).to_contain_text(sample_code)
    assert staff.locator("svg").count() >= 2  # the QR code and the barcode
    assert staff.pdf(width="62mm", height="29mm")[:4] == b"%PDF"  # it prints
    staff.goto(order_url)

    # Work starts, the report is uploaded and delivered.
    staff.click("button[name=to][value=in_progress]")
    expect(staff.locator("#order-status")).to_have_attribute("data-status", "in_progress")
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 4000 + "蛋白质组".encode())
    staff.set_input_files(".upload-result input[type=file]", files=[{
        "name": REPORT, "mimeType": "application/pdf", "buffer": report.read_bytes()}])
    staff.click(".upload-result button[type=submit]")
    expect(staff.locator("#results")).to_contain_text(REPORT)
    staff.click("button[name=to][value=results_delivered]")
    expect(staff.locator("#order-status")).to_have_attribute("data-status", "results_delivered")

    # The engineer downloads the report: the same bytes, the same SHA-256 the platform recorded.
    customer.goto(order_url)
    with customer.expect_download() as download_info:
        customer.click(f'#results a:has-text("{REPORT}")')
    downloaded = Path(download_info.value.path())
    digest = hashlib.sha256(downloaded.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(report.read_bytes()).hexdigest()
    with world.db.unit_of_work(write=False) as s:
        assert s.scalars(select(ResultFile.sha256)).one() == digest

    # Closing and rating; the service page shows the average.
    customer.click("button[name=to][value=closed]")
    expect(customer.locator("#order-status")).to_have_attribute("data-status", "closed")
    customer.check(".rating-form input[name=score][value='5']")
    customer.fill(".rating-form textarea[name=comment]", "报告清晰，周期准时。")
    customer.click(".rating-form button[type=submit]")
    expect(customer.locator("#rating-given")).to_contain_text("5/5")
    customer.goto(f"{server}/services/{service_id}")
    expect(customer.locator("body")).to_contain_text("报告清晰，周期准时。")
    assert _order(world).status == OrderStatus.closed
