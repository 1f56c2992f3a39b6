"""Sample pages: the forms the order page posts, the printable labels, the scanner landing, the fragment."""

from __future__ import annotations

import re
from datetime import datetime
from zoneinfo import ZoneInfo

from fastapi.testclient import TestClient
from sqlalchemy import select

from labcommons import i18n
from labcommons.orders import samples
from labcommons.orders.models import OrderStatus, Sample, SampleStatus, ServiceOrder
from labcommons.pages import env
from tests.factories import World, grant
from tests.orders.test_samples import make_order, order_of, record, register, sample_id
from tests.web.conftest import flash_of, page_csrf, sign_in

S = OrderStatus


def _statuses(world: World, order_id: int) -> list[tuple[str, SampleStatus, str]]:
    with world.db.unit_of_work(write=False) as s:
        return [(x.code, x.status, x.location) for x in
                s.scalars(select(Sample).where(Sample.order_id == order_id).order_by(Sample.position))]


def test_the_customer_announces_samples_from_the_order_page(client: TestClient, world: World) -> None:
    order_id = make_order(world, S.submitted)
    number = order_of(world, order_id).number
    sign_in(client, "bob")
    response = client.post(f"/orders/{order_id}/samples", data={
        "csrf_token": page_csrf(client), "descriptions": "liver\n\n  kidney  \n", "count": ""}, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == f"/orders/{order_id}#samples"
    assert f"{number}-S01" in flash_of(response) and f"{number}-S02" in flash_of(response)
    assert _statuses(world, order_id) == [(f"{number}-S01", SampleStatus.expected, ""),
                                          (f"{number}-S02", SampleStatus.expected, "")]
    # Receiving is the staff's: the customer's "receive" box is refused and nothing is added.
    refused = client.post(f"/orders/{order_id}/samples", data={
        "csrf_token": page_csrf(client), "count": "1", "receive": "1"}, follow_redirects=False)
    assert refused.status_code == 403
    bad = client.post(f"/orders/{order_id}/samples", data={"csrf_token": page_csrf(client), "count": "two"},
                      follow_redirects=False)
    assert bad.status_code == 303 and flash_of(bad).startswith("error|")
    assert len(_statuses(world, order_id)) == 2
    # Without the form's CSRF token nothing happens.
    assert client.post(f"/orders/{order_id}/samples", data={"count": "1"}).status_code == 403
    assert len(_statuses(world, order_id)) == 2


def test_staff_record_custody_from_the_order_page(client: TestClient, world: World) -> None:
    grant(world, "alice")
    order_id = make_order(world, S.accepted)
    code = register(world, world.actors["bob"], order_id, count=1)[0]
    sid = sample_id(world, code)
    sign_in(client, "alice")
    client.get("/account?lang=en")  # the language cookie: flash messages below in English
    response = client.post(f"/samples/{sid}/events", data={
        "csrf_token": page_csrf(client), "event": "received", "location": "", "note": "box intact"},
        follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == f"/orders/{order_id}#samples"
    assert code in flash_of(response)
    assert order_of(world, order_id).status == S.samples_received
    again = client.post(f"/samples/{sid}/events", data={"csrf_token": page_csrf(client), "event": "received"},
                        follow_redirects=False)
    assert again.status_code == 303 and again.headers["location"] == f"/orders/{order_id}#samples"
    assert flash_of(again).startswith("error|") and "Stored / moved" in flash_of(again)
    no_place = client.post(f"/samples/{sid}/events", data={"csrf_token": page_csrf(client), "event": "stored"},
                           follow_redirects=False)
    assert flash_of(no_place) == "error|Say where the sample is stored."
    client.post(f"/samples/{sid}/events", data={"csrf_token": page_csrf(client), "event": "stored",
                                                "location": "freezer B2"})
    assert _statuses(world, order_id) == [(code, SampleStatus.stored, "freezer B2")]
    # Staff register and receive in one step.
    client.post(f"/orders/{order_id}/samples", data={"csrf_token": page_csrf(client), "count": "2", "receive": "1",
                                                     "location": "reception"})
    assert [x[1:] for x in _statuses(world, order_id)[1:]] == [(SampleStatus.received, "reception")] * 2


def test_the_customer_may_not_record_custody_and_others_see_nothing(client: TestClient, world: World) -> None:
    grant(world, "alice")
    order_id = make_order(world, S.accepted)
    code = register(world, world.actors["bob"], order_id, count=1)[0]
    sid = sample_id(world, code)
    sign_in(client, "bob")
    assert client.post(f"/samples/{sid}/events", data={"csrf_token": page_csrf(client), "event": "received"},
                       follow_redirects=False).status_code == 403
    sign_in(client, "carol")
    for path in (f"/samples/{sid}/label", f"/orders/{order_id}/labels", f"/samples/code/{code}"):
        assert client.get(path, follow_redirects=False).status_code == 404, path
    assert client.post(f"/orders/{order_id}/samples", data={"csrf_token": page_csrf(client), "count": "1"},
                       follow_redirects=False).status_code == 404
    assert _statuses(world, order_id) == [(code, SampleStatus.expected, "")]


def test_label_pages_print_one_label_per_sample(client: TestClient, world: World) -> None:
    alice = grant(world, "alice")
    order_id = make_order(world, S.accepted)
    codes = register(world, world.actors["bob"], order_id, descriptions=["Mouse liver <FFPE>", "Serum"])
    record(world, alice, sample_id(world, codes[0]), "received")
    sign_in(client, "bob")
    page = client.get(f"/orders/{order_id}/labels?lang=en")
    assert page.status_code == 200
    html = page.text
    assert 'href="/static/labels.css"' in html
    assert html.count('class="sample-label"') == 2
    assert all(code in html for code in codes)
    assert "Mouse liver &lt;FFPE&gt;" in html and "<FFPE>" not in html
    assert html.count('class="label-qr"') == 2 and html.count('class="label-barcode"') == 2
    received = re.findall(r'class="label-received">([^<]*)<', html)
    today = datetime.now(ZoneInfo("Asia/Shanghai")).strftime("%Y-%m-%d")  # bob has no zone of his own
    assert received == [f"Received: {today}", "Received: —"]
    single = client.get(f"/samples/{sample_id(world, codes[1])}/label")
    assert single.status_code == 200 and single.text.count('class="sample-label"') == 1 and codes[1] in single.text
    css = client.get("/static/labels.css").text
    assert "@page" in css and "62mm 29mm" in css


def test_a_scanned_label_leads_to_the_sample_on_its_order(client: TestClient, world: World) -> None:
    order_id = make_order(world, S.submitted)
    code = register(world, world.actors["bob"], order_id, count=1)[0]
    sid = sample_id(world, code)
    anonymous = client.get(f"/samples/code/{code}", follow_redirects=False)
    assert anonymous.status_code == 303 and anonymous.headers["location"].startswith("/login")
    sign_in(client, "bob")
    scanned = client.get(f"/samples/code/{code}", follow_redirects=False)
    assert scanned.status_code == 303 and scanned.headers["location"] == f"/orders/{order_id}#sample-{sid}"
    grant(world, "alice")
    sign_in(client, "alice")
    assert client.get(f"/samples/code/{code.lower()}", follow_redirects=False).headers["location"] == \
        f"/orders/{order_id}#sample-{sid}"
    assert client.get("/samples/code/SO-2026-999999-S01", follow_redirects=False).status_code == 404


def _fragment(world: World, order_id: int, *, is_staff: bool, is_customer: bool, names: bool = True) -> str:
    with world.db.unit_of_work(write=False) as s:
        order = s.get(ServiceOrder, order_id)
        assert order is not None
        rows = samples.samples_with_events(s, order)
        actors = samples.sample_actor_names(s, rows) if names else None
    context = {"order": order, "samples": rows, "is_staff": is_staff, "is_customer": is_customer,
               "csrf_token": "tok", "localtime": lambda m, fmt="%Y-%m-%d %H:%M": m.strftime(fmt)}
    if names:
        context["sample_actors"] = actors
    return env.get_template("orders/_samples.html").render(**context)


def test_the_fragment_shows_the_trail_and_the_forms_each_side_may_use(world: World) -> None:
    alice = grant(world, "alice")
    order_id = make_order(world, S.accepted)
    codes = register(world, world.actors["bob"], order_id, descriptions=["plasma", "serum"])
    record(world, alice, sample_id(world, codes[0]), "received")
    record(world, alice, sample_id(world, codes[0]), "stored", location="freezer B2", note="rack 4")
    i18n.set_locale("en")
    try:
        as_staff = _fragment(world, order_id, is_staff=True, is_customer=False)
        as_customer = _fragment(world, order_id, is_staff=False, is_customer=True)
        unnamed = _fragment(world, order_id, is_staff=True, is_customer=False, names=False)
    finally:
        i18n.set_locale(i18n.DEFAULT_LOCALE)
    assert 'id="samples"' in as_staff and f'id="sample-{sample_id(world, codes[0])}"' in as_staff
    # The custody trail: what, who, where.
    assert "Received" in as_staff and "Stored / moved" in as_staff and "Alice" in as_staff
    assert "at freezer B2" in as_staff and "rack 4" in as_staff
    assert "facility staff" in unnamed and "Alice" not in unnamed
    # Staff get a custody form per sample with only the steps allowed now.
    forms = re.findall(r'action="/samples/(\d+)/events".*?</form>', as_staff, re.S)
    assert len(forms) == 2
    stored_form = re.search(rf'action="/samples/{sample_id(world, codes[0])}/events".*?</form>', as_staff, re.S)
    assert stored_form is not None
    assert re.findall(r'<option value="(\w+)"', stored_form.group(0)) == ["stored", "consumed", "returned",
                                                                          "disposed"]
    expected_form = re.search(rf'action="/samples/{sample_id(world, codes[1])}/events".*?</form>', as_staff, re.S)
    assert expected_form is not None and re.findall(r'<option value="(\w+)"', expected_form.group(0)) == ["received"]
    assert 'name="receive"' in as_staff
    # The customer sees the samples and may announce more, but records no custody.
    assert "/events" not in as_customer and 'name="receive"' not in as_customer
    assert f'action="/orders/{order_id}/samples"' in as_customer and 'name="csrf_token" value="tok"' in as_customer
    assert f'href="/orders/{order_id}/labels"' in as_customer


def test_the_fragment_in_chinese_and_without_samples(world: World) -> None:
    order_id = make_order(world, S.draft)
    i18n.set_locale("zh_CN")
    try:
        html = _fragment(world, order_id, is_staff=False, is_customer=True)
    finally:
        i18n.set_locale(i18n.DEFAULT_LOCALE)
    assert "样品" in html
    # A draft takes no samples yet: no form, and no labels to print.
    assert "/samples\"" not in html and "/labels" not in html


def test_the_order_page_shows_the_samples_section(client: TestClient, world: World) -> None:
    alice = grant(world, "alice")
    order_id = make_order(world, S.accepted)
    codes = register(world, world.actors["bob"], order_id, count=2)
    first, second = sample_id(world, codes[0]), sample_id(world, codes[1])
    record(world, alice, first, "received")
    sign_in(client, "alice")
    page = client.get(f"/orders/{order_id}?lang=en")
    assert page.status_code == 200
    assert f'id="sample-{first}"' in page.text and f'action="/samples/{second}/events"' in page.text
    assert "Alice" in page.text[page.text.index('id="samples"'):]
    sign_in(client, "bob")
    page = client.get(f"/orders/{order_id}")
    assert f'id="sample-{first}"' in page.text and "/events" not in page.text
