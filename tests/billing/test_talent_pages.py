"""Talent card pages: my cards and the submit form, the authority's queue and entitlement editor, the fast-track
badge staff see on orders; Post/Redirect/Get with flashes, both languages; on both databases."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from labcommons.app import create_app
from labcommons.billing.models import CardStatus
from labcommons.catalog.models import Facility, Service, ServiceKind
from labcommons.orders import service as orders
from labcommons.orders.models import OrderStatus
from tests.billing.test_talent import add_card, add_schemes, authority
from tests.factories import World, grant
from tests.web.conftest import csrf_of, flash_of, sign_in


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    with TestClient(create_app(db=world.db)) as test_client:
        yield test_client


@pytest.fixture
def cards(world: World) -> World:
    add_schemes(world)
    authority(world, "scauth", "SC")
    authority(world, "cqauth", "CQ")
    return world


def english(client: TestClient) -> None:
    client.cookies.set("lang", "en")


def test_my_cards_page_in_both_languages(client: TestClient, cards: World) -> None:
    add_card(cards, "bob", "tianfu", "TF-1")
    anonymous = client.get("/account/talent-cards", follow_redirects=False)
    assert anonymous.status_code == 303 and anonymous.headers["location"].startswith("/login")
    sign_in(client, "bob")
    english(client)
    page = client.get("/account/talent-cards")
    assert page.status_code == 200
    assert "Tianfu Talent Card" in page.text and "TF-1" in page.text and "Verified" in page.text
    assert "10% off fees" in page.text and "Book up to 20 more days ahead" in page.text
    assert "Consultation orders handled first" in page.text
    assert 'href="/account/talent-cards"' in client.get("/account").text
    client.cookies.set("lang", "zh_CN")
    zh = client.get("/account/talent-cards")
    assert zh.status_code == 200 and 'lang="zh-CN"' in zh.text
    assert "天府人才卡" in zh.text and "人才服务卡" in zh.text and "已核验" in zh.text


def test_submitting_a_card_redirects_with_a_flash_and_keeps_input_on_errors(client: TestClient,
                                                                           cards: World) -> None:
    sign_in(client, "bob")
    english(client)
    form = client.get("/account/talent-cards")
    csrf = csrf_of(form.text)
    data = {"csrf_token": csrf, "scheme_code": "tianfu", "card_number": "TF-22", "holder_name": "Bob",
            "valid_until": ""}
    answer = client.post("/account/talent-cards", data=data, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/account/talent-cards"
    assert "TF-22 submitted" in flash_of(answer)
    page = client.get("/account/talent-cards")
    assert "Awaiting verification" in page.text
    taken = client.post("/account/talent-cards", data=data)
    assert taken.status_code == 409 and "This card number is already registered." in taken.text
    assert re.search(r'name="card_number"[^>]*aria-invalid="true"', taken.text)
    bad = client.post("/account/talent-cards", data={**data, "card_number": "TF-23", "valid_until": "soon"})
    assert bad.status_code == 422 and "Enter the date as YYYY-MM-DD." in bad.text and 'value="TF-23"' in bad.text
    forged = client.post("/account/talent-cards", data={**data, "csrf_token": "x"}, follow_redirects=False)
    assert forged.status_code == 403


def test_the_authority_verifies_rejects_and_revokes(client: TestClient, cards: World) -> None:
    matching = add_card(cards, "bob", "tianfu", "TF-1", status=CardStatus.pending)
    differing = add_card(cards, "carol", "tianfu", "TF-2", status=CardStatus.pending, holder="Caroline Q")
    other_region = add_card(cards, "carol", "cq_talent", "CQ-1", status=CardStatus.pending)
    sign_in(client, "scauth")
    english(client)
    queue = client.get("/manage/talent-cards")
    assert queue.status_code == 200
    assert f'data-card="{matching}"' in queue.text and f'data-card="{differing}"' in queue.text
    assert f'data-card="{other_region}"' not in queue.text
    assert "The name on the card differs from the account" in queue.text
    assert 'href="/manage/talent-cards"' in client.get("/account").text
    csrf = csrf_of(queue.text)

    done = client.post(f"/manage/talent-cards/{matching}/verify", data={"csrf_token": csrf},
                       follow_redirects=False)
    assert done.status_code == 303 and "TF-1 verified" in flash_of(done)
    unconfirmed = client.post(f"/manage/talent-cards/{differing}/verify", data={"csrf_token": csrf})
    assert unconfirmed.status_code == 422 and "tick the box" in unconfirmed.text
    assert re.search(r'name="confirm_holder"[^>]*aria-invalid="true"', unconfirmed.text)
    no_reason = client.post(f"/manage/talent-cards/{differing}/reject", data={"csrf_token": csrf, "note": ""})
    assert no_reason.status_code == 422 and "Say why" in no_reason.text
    rejected = client.post(f"/manage/talent-cards/{differing}/reject",
                           data={"csrf_token": csrf, "note": "Name differs"}, follow_redirects=False)
    assert rejected.status_code == 303 and "TF-2 rejected" in flash_of(rejected)
    # Another region's card: refused as if absent, with the reason on the next page.
    elsewhere = client.post(f"/manage/talent-cards/{other_region}/verify", data={"csrf_token": csrf},
                            follow_redirects=False)
    assert elsewhere.status_code == 303 and flash_of(elsewhere).startswith("error|")
    verified = client.get("/manage/talent-cards?show=verified")
    assert f'data-card="{matching}"' in verified.text and "Revoke" in verified.text
    revoked = client.post(f"/manage/talent-cards/{matching}/revoke", data={"csrf_token": csrf, "note": "Withdrawn"},
                          follow_redirects=False)
    assert revoked.status_code == 303 and "TF-1 revoked" in flash_of(revoked)
    client.cookies.set("lang", "zh_CN")
    zh = client.get("/manage/talent-cards?show=all")
    assert zh.status_code == 200 and "人才卡核验" in zh.text and "已被发卡地区撤销" in zh.text


def test_the_entitlement_editor(client: TestClient, cards: World) -> None:
    sign_in(client, "scauth")
    english(client)
    page = client.get("/manage/talent-cards")
    # Every scheme is shown; the authority edits what its own region's providers grant.
    assert 'data-scheme="tianfu"' in page.text and 'data-scheme="cq_talent"' in page.text
    csrf = csrf_of(page.text)
    data = {"csrf_token": csrf, "scheme_code": "cq_talent", "provider_region_code": "SC", "kind": "fee_discount",
            "value": "1250"}
    saved = client.post("/manage/talent-entitlements", data=data, follow_redirects=False)
    assert saved.status_code == 303 and "Entitlement saved." in flash_of(saved)
    assert "12.5% off fees" in client.get("/manage/talent-cards").text
    bad = client.post("/manage/talent-entitlements", data={**data, "value": "lots"})
    assert bad.status_code == 422 and "Enter a whole number." in bad.text and 'value="lots"' in bad.text
    foreign = client.post("/manage/talent-entitlements", data={**data, "provider_region_code": "CQ"})
    assert foreign.status_code == 403
    row = re.search(r'data-entitlement="(\d+)">\s*<td>SC</td>', client.get("/manage/talent-cards").text)
    assert row
    removed = client.post(f"/manage/talent-entitlements/{row.group(1)}/remove", data={"csrf_token": csrf},
                          follow_redirects=False)
    assert removed.status_code == 303 and "Entitlement removed." in flash_of(removed)
    sign_in(client, "bob")
    assert client.get("/manage/talent-cards").status_code == 403


def test_staff_see_the_fast_track_badge_on_consultations_of_holders(client: TestClient, cards: World) -> None:
    with cards.db.unit_of_work() as s:
        fac = s.get(Facility, cards.facilities["SC-UNI"])
        assert fac is not None
        svc = Service(code="SC-CONSULT", facility_id=fac.id, kind=ServiceKind.consultation, name_zh="实验设计咨询",
                      name_en="Experiment design consultation", category_code="GEN.SEQ",
                      institution_id=fac.institution_id, region_code="SC")
        s.add(svc)
        s.flush()
        ids = {}
        for user in ("bob", "carol"):
            order = orders.create_order(s, cards.actors[user], svc.id, title=f"Design for {user}", description="",
                                        sample_count=0, sample_description="")
            orders.transition(s, cards.actors[user], order.id, OrderStatus.submitted)
            ids[user] = order.id
    add_card(cards, "bob", "tianfu", "TF-1")
    grant(cards, "alice", "facility_staff", facility="SC-UNI")
    sign_in(client, "alice")
    english(client)
    assert 'id="fast-track"' in client.get(f"/orders/{ids['bob']}").text
    assert 'id="fast-track"' not in client.get(f"/orders/{ids['carol']}").text
    queue = client.get("/manage/orders").text
    bob_row = re.search(rf'data-order="{ids["bob"]}".*?</li>', queue, re.S)
    carol_row = re.search(rf'data-order="{ids["carol"]}".*?</li>', queue, re.S)
    assert bob_row and "Fast track" in bob_row.group(0)
    assert carol_row and "Fast track" not in carol_row.group(0)
    # The customer does not see the staff's badge.
    sign_in(client, "bob")
    assert 'id="fast-track"' not in client.get(f"/orders/{ids['bob']}").text
