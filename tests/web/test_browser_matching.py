"""Real Chromium: a user types a need in Chinese on /match, sees the sequencer ranked with why it matches (swapped in
by htmx, the address updated), and saves the demand."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.factories import World
from tests.matching.h1_support import build_match_world
from tests.web import test_browser_orders as harness
from tests.web.test_browser import CHROMIUM

playwright_api = pytest.importorskip("playwright.sync_api")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.xdist_group("browser"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (make browser)"),
]

PASSWORD = "correct horse"
DEMAND = "我们需要做高通量基因测序，小鼠脑组织样本20个"
server = harness.server
browser = harness.browser


def test_chinese_demand_finds_the_sequencer_with_its_reasons(browser: object, server: str, world: World) -> None:
    expect = playwright_api.expect
    build_match_world(world)
    context = browser.new_context(locale="zh-CN", viewport={"width": 1280, "height": 1000})  # type: ignore[attr-defined]
    context.set_default_timeout(15_000)
    page: playwright_api.Page = context.new_page()
    page.goto(f"{server}/login")
    page.fill("input[name=email]", "bob@example.org")
    page.fill("input[name=password]", PASSWORD)
    page.click("form.stacked button[type=submit]")
    page.wait_for_url(f"{server}/")

    page.click("nav.main-nav >> text=找服务")
    expect(page).to_have_url(f"{server}/match")
    page.fill("textarea[name=q]", DEMAND)
    page.click("form.match-form button[type=submit]")
    card = page.locator('li.match-card[data-code="CQ-SEQ"]')
    # The server loads the embedding model on its first match (about 10 s).
    expect(card).to_be_visible(timeout=60_000)
    expect(card.locator(".result-name")).to_have_text("高通量基因测序仪")
    expect(card.locator(".why-terms")).to_contain_text("命中您的用词")
    expect(card.locator(".why-terms mark").first).to_be_visible()
    expect(card.locator(".why-category")).to_contain_text("基因测序")
    expect(card.locator(".why-slot")).to_contain_text("Asia/Shanghai")
    expect(page).to_have_url(re.compile(r"/match\?q="))  # htmx pushed the search into the address
    assert page.locator("li.match-card").first.get_attribute("data-code") == "CQ-SEQ"

    page.click("text=保存需求，让服务方响应")
    expect(page).to_have_url(re.compile(r"/demands/\d+$"))
    expect(page.locator(".demand-text")).to_have_text(DEMAND)
    expect(page.locator("#matches li.match-card").first).to_contain_text("高通量基因测序仪")
    context.close()
