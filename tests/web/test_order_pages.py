"""Order pages: the order form, my orders, the order page for its user and for staff (quote, steps, messages,
rating), and the staff queue; Post/Redirect/Get with flashes, errors shown on the page."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from labcommons.catalog.models import PriceUnit
from labcommons.orders.models import OrderStatus
from tests.factories import World, grant
from tests.orders.order_support import add_service, far_day, new_order, status_of, walk_to
from tests.web.conftest import csrf_of, sign_in

S = OrderStatus


def english(client: TestClient) -> None:
    client.cookies.set("lang", "en")


def test_the_order_form_shows_requirements_and_price_and_submits(client: TestClient, world: World) -> None:
    service_id = add_service(world, price_fen=12_050, unit=PriceUnit.sample, requirements_en="Frozen, 2 ml tubes")
    english(client)
    anonymous = client.get(f"/services/{service_id}/order", follow_redirects=False)
    assert anonymous.status_code == 303 and anonymous.headers["location"].startswith("/login")
    sign_in(client, "bob")
    form = client.get(f"/services/{service_id}/order")
    assert form.status_code == 200
    assert "Frozen, 2 ml tubes" in form.text and "¥120.50" in form.text and "per sample" in form.text
    data = {"csrf_token": csrf_of(form.text), "title": "RNA of 3 blocks", "description": "Spatial",
            "sample_count": "3", "sample_description": "FFPE", "wanted_by": "", "contact_phone": "023-1",
            "action": "submit"}
    answer = client.post(f"/services/{service_id}/order", data=data, follow_redirects=False)
    assert answer.status_code == 303
    order_id = int(answer.headers["location"].rsplit("/", 1)[1])
    page = client.get(answer.headers["location"])
    assert "quoted at the list price; you can accept the quote now" in page.text
    assert status_of(world, order_id) == S.quoted
    assert "¥361.50" in page.text and 'class="inline accept-quote"' in page.text


def test_the_order_form_keeps_what_was_typed_on_errors_and_saves_drafts(client: TestClient, world: World) -> None:
    service_id = add_service(world)
    english(client)
    sign_in(client, "bob")
    form = client.get(f"/services/{service_id}/order")
    assert "Quote on request" in form.text
    data = {"csrf_token": csrf_of(form.text), "title": "", "description": "keep me", "sample_count": "two",
            "action": "submit"}
    bad = client.post(f"/services/{service_id}/order", data=data)
    assert bad.status_code == 422 and "Enter a whole number." in bad.text and "keep me" in bad.text
    assert re.search(r'name="sample_count"[^>]*aria-invalid="true"', bad.text)
    missing = client.post(f"/services/{service_id}/order", data={**data, "sample_count": "2"})
    assert missing.status_code == 422 and "Fill in the required fields." in missing.text
    draft = client.post(f"/services/{service_id}/order", data={**data, "sample_count": "2", "title": "Later",
                                                                "action": "draft"}, follow_redirects=False)
    assert draft.status_code == 303
    page = client.get(draft.headers["location"])
    assert "Draft SO-" in page.text and 'data-status="draft"' in page.text
    assert 'value="submitted"' in page.text  # the submit button of the draft
    forged = client.post(f"/services/{service_id}/order", data={**data, "csrf_token": "x"}, follow_redirects=False)
    assert forged.status_code == 403
    inactive = add_service(world, active=False)
    assert client.get(f"/services/{inactive}/order").status_code == 404


def test_my_orders_lists_only_mine_with_badges(client: TestClient, world: World) -> None:
    service_id = add_service(world)
    mine = new_order(world, service_id, submit=True, title="My spatial run")
    new_order(world, service_id, customer="carol", title="Carol's run")
    english(client)
    sign_in(client, "bob")
    page = client.get("/orders")
    assert page.status_code == 200 and "My spatial run" in page.text and "Carol's run" not in page.text
    assert f'href="/orders/{mine}"' in page.text and 'data-status="submitted"' in page.text
    assert 'href="/orders">My orders</a>' in page.text  # the nav link for signed-in users
    assert 'href="/manage/orders"' not in page.text  # not staff
    assert "My spatial run" not in client.get("/orders?status=draft").text


def test_the_order_page_for_its_user_staff_and_strangers(client: TestClient, world: World) -> None:
    service_id = add_service(world)
    grant(world, "alice")
    order_id = new_order(world, service_id, submit=True)
    english(client)
    sign_in(client, "carol")
    assert client.get(f"/orders/{order_id}").status_code == 404
    sign_in(client, "bob")
    page = client.get(f"/orders/{order_id}")
    assert page.status_code == 200
    assert 'data-step="submitted" data-state="current"' in page.text and "<progress" in page.text
    assert 'class="stacked quote-form"' not in page.text  # users do not quote
    assert 'value="cancelled"' in page.text and 'value="rejected"' not in page.text
    assert 'id="samples"' in page.text and 'id="results"' in page.text
    sign_in(client, "alice")
    staff = client.get(f"/orders/{order_id}")
    assert 'class="stacked quote-form"' in staff.text and staff.text.count('name="line_description"') == 5
    assert 'value="rejected"' in staff.text and 'value="cancelled"' not in staff.text
    assert 'href="/manage/orders">Orders</a>' in staff.text  # the nav link for staff


def test_staff_quote_with_several_rows_then_the_user_accepts(client: TestClient, world: World) -> None:
    service_id = add_service(world)
    grant(world, "alice")
    order_id = new_order(world, service_id, submit=True)
    english(client)
    sign_in(client, "alice")
    page = client.get(f"/orders/{order_id}")
    base = {"csrf_token": csrf_of(page.text), "valid_until": far_day().isoformat(), "note": "incl. QC",
            "line_description": ["Library prep", "Sequencing", "", "", ""],
            "line_quantity": ["2", "1", "", "", ""], "line_price": ["600.50", "1,000", "", "", ""]}
    bad = client.post(f"/orders/{order_id}/quotes", data={**base, "line_price": ["6.505", "1", "", "", ""]})
    assert bad.status_code == 422 and "Enter an amount in yuan" in bad.text
    assert re.search(r'name="line_price"[^>]*value="6.505"[^>]*aria-invalid="true"', bad.text)
    sent = client.post(f"/orders/{order_id}/quotes", data=base, follow_redirects=False)
    assert sent.status_code == 303 and sent.headers["location"] == f"/orders/{order_id}#quote"
    after = client.get(f"/orders/{order_id}")
    assert "Quote version 1 sent: ¥2,201.00." in after.text and 'id="quote-total"><strong>¥2,201.00' in after.text
    # A new version starts from the lines on offer.
    assert 'value="Library prep"' in after.text and 'value="600.50"' in after.text and 'value="1000.00"' in after.text
    assert after.text.count('name="line_description"') == 5
    assert status_of(world, order_id) == S.quoted
    sign_in(client, "bob")
    page = client.get(f"/orders/{order_id}")
    quote_id = re.search(r'/quotes/(\d+)/accept', page.text)
    assert quote_id is not None
    accepted = client.post(f"/orders/{order_id}/quotes/{quote_id.group(1)}/accept",
                           data={"csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert accepted.status_code == 303
    assert "Quote version 1 accepted" in client.get(accepted.headers["location"]).text
    assert status_of(world, order_id) == S.accepted
    again = client.post(f"/orders/{order_id}/quotes/{quote_id.group(1)}/accept",
                        data={"csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert again.status_code == 303
    assert "no longer on offer" in client.get(again.headers["location"]).text


def test_plain_users_may_not_post_quotes(client: TestClient, world: World) -> None:
    order_id = new_order(world, add_service(world), submit=True)
    sign_in(client, "bob")
    csrf = csrf_of(client.get(f"/orders/{order_id}").text)
    refused = client.post(f"/orders/{order_id}/quotes", data={"csrf_token": csrf}, follow_redirects=False)
    assert refused.status_code == 403


def test_steps_with_comments_and_refusals_on_the_page(client: TestClient, world: World) -> None:
    grant(world, "alice")
    order_id = new_order(world, add_service(world), submit=True)
    english(client)
    sign_in(client, "alice")
    page = client.get(f"/orders/{order_id}")
    csrf = csrf_of(page.text)
    missing = client.post(f"/orders/{order_id}/transitions", data={"csrf_token": csrf, "to": "on_hold",
                                                                  "comment": "", "expected_version": "2"})
    assert missing.status_code == 422 and "Say why; the other side is told." in missing.text
    stale = client.post(f"/orders/{order_id}/transitions", data={"csrf_token": csrf, "to": "on_hold",
                                                                "comment": "x", "expected_version": "1"},
                        follow_redirects=False)
    assert stale.status_code == 303 and "Someone else changed this order" in client.get(stale.headers["location"]).text
    held = client.post(f"/orders/{order_id}/transitions", data={"csrf_token": csrf, "to": "on_hold",
                                                               "comment": "reagent late", "expected_version": "2"},
                       follow_redirects=False)
    assert held.status_code == 303
    page = client.get(held.headers["location"])
    assert "Order SO-" in page.text and "On hold" in page.text and "reagent late" in page.text
    assert "Resume (Submitted)" in page.text
    illegal = client.post(f"/orders/{order_id}/transitions", data={"csrf_token": csrf, "to": "closed"},
                          follow_redirects=False)
    assert illegal.status_code == 303
    assert "This step is not possible now" in client.get(illegal.headers["location"]).text
    # A version str.isdigit takes but int() does not was a 500; like any other non-number it is no version.
    for odd in ("²", "9" * 5000):
        resumed = client.post(f"/orders/{order_id}/transitions", follow_redirects=False,
                              data={"csrf_token": csrf, "to": "submitted", "expected_version": odd})
        assert resumed.status_code == 303, odd
    assert status_of(world, order_id) == S.submitted


def test_ids_beyond_the_id_range_are_refused_not_500s(client: TestClient, world: World) -> None:
    sign_in(client, "bob")
    huge = 2**31  # PostgreSQL's "integer out of range" was a 500
    for path in (f"/orders/{huge}", f"/orders/{huge}/labels", f"/samples/{huge}/label", f"/services/{huge}",
                 f"/services/{huge}/order"):
        assert client.get(path).status_code == 422, path
    csrf = csrf_of(client.get("/orders").text)
    answer = client.post(f"/orders/{huge}/messages", data={"csrf_token": csrf, "body": "hello"})
    assert answer.status_code == 422
    # PostgreSQL cannot store a NUL character (SQLite can): that was a 500 page.
    order_id = new_order(world, add_service(world), submit=True)
    nul = client.post(f"/orders/{order_id}/messages", data={"csrf_token": csrf, "body": "hel\x00lo"},
                      follow_redirects=False)
    assert nul.status_code == (303 if world.db.is_sqlite else 422)


def test_messages_and_the_rating_after_closing(client: TestClient, world: World) -> None:
    grant(world, "alice")
    order_id = new_order(world, add_service(world))
    walk_to(world, order_id, S.results_delivered)
    english(client)
    sign_in(client, "bob")
    page = client.get(f"/orders/{order_id}")
    csrf = csrf_of(page.text)
    assert 'class="stacked rating-form"' not in page.text
    empty = client.post(f"/orders/{order_id}/messages", data={"csrf_token": csrf, "body": "  "})
    assert empty.status_code == 422 and "Fill in the required fields." in empty.text
    sent = client.post(f"/orders/{order_id}/messages", data={"csrf_token": csrf, "body": "Thanks, all clear."},
                       follow_redirects=False)
    assert sent.status_code == 303 and sent.headers["location"].endswith("#messages")
    closed = client.post(f"/orders/{order_id}/transitions", data={"csrf_token": csrf, "to": "closed"},
                         follow_redirects=False)
    assert closed.status_code == 303
    page = client.get(f"/orders/{order_id}")
    assert "Thanks, all clear." in page.text and 'class="stacked rating-form"' in page.text
    bad = client.post(f"/orders/{order_id}/rating", data={"csrf_token": csrf, "score": "9"})
    assert bad.status_code == 422 and "Enter a number from 1 to 5." in bad.text
    rated = client.post(f"/orders/{order_id}/rating", data={"csrf_token": csrf, "score": "4", "comment": "Fast"},
                        follow_redirects=False)
    assert rated.status_code == 303
    page = client.get(rated.headers["location"])
    assert "Thank you for your rating." in page.text and "★★★★☆" in page.text
    assert 'class="stacked rating-form"' not in page.text
    again = client.post(f"/orders/{order_id}/rating", data={"csrf_token": csrf, "score": "1"},
                        follow_redirects=False)
    assert "You have rated this order already." in client.get(again.headers["location"]).text


def test_the_staff_queue_with_counts_and_filter(client: TestClient, world: World) -> None:
    grant(world, "alice")
    service_id = add_service(world)
    submitted = new_order(world, service_id, submit=True, title="Waiting order")
    quoted = new_order(world, service_id, title="Quoted order")
    walk_to(world, quoted, S.quoted)
    new_order(world, service_id, title="Private draft")
    new_order(world, add_service(world, facility="SC-UNI"), submit=True, title="Elsewhere")
    english(client)
    sign_in(client, "bob")
    assert client.get("/manage/orders").status_code == 403
    sign_in(client, "alice")
    page = client.get("/manage/orders")
    assert page.status_code == 200
    assert "Waiting order" in page.text and "Quoted order" in page.text
    assert "Private draft" not in page.text and "Elsewhere" not in page.text
    assert "All (2)" in page.text and "Submitted (1)" in page.text and "Quoted (1)" in page.text
    filtered = client.get("/manage/orders?status=quoted")
    assert "Quoted order" in filtered.text and "Waiting order" not in filtered.text
    assert f'href="/orders/{submitted}"' not in filtered.text
    assert client.get("/manage/orders?status=lost").status_code == 422


def test_pages_in_chinese(client: TestClient, world: World) -> None:
    grant(world, "alice")
    order_id = new_order(world, add_service(world), submit=True)
    sign_in(client, "alice")
    page = client.get(f"/orders/{order_id}")
    assert "发送报价" in page.text and "已提交" in page.text and "拒绝订单" in page.text
    assert ">订单</a>" in client.get("/manage/orders").text
