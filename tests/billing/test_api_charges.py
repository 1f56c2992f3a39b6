"""The billing API around money moving: bookings on a charging facility (holds, account_required, limits), the
price preview, check-out charges with their parts, corrections, reversals, manual charges and the ledger's pages;
on both databases."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from labcommons.billing.models import Charge
from labcommons.booking import usage
from labcommons.booking.models import Booking
from labcommons.db import MAX_ID
from tests.billing.test_api import (
    TODAY,
    billing_client,
    call,
    charging,
    count,
    ok,
    open_account,
    refused,
    voucher_body,
)
from tests.factories import World, next_grid_day

BOOKINGS = "/api/v1/bookings"


@pytest.fixture
def api(world: World) -> TestClient:
    return billing_client(world)


def book(api: TestClient, world: World, user: str, start: datetime, hours: int = 2, key: str | None = None,
         **fields: Any) -> Any:
    headers = world.headers(user, **({"Idempotency-Key": key} if key else {}))
    body = {"instrument_id": world.instruments["CONF"], "starts_at": start.isoformat(),
            "ends_at": (start + timedelta(hours=hours)).isoformat(), **fields}
    return api.post(BOOKINGS, json=body, headers=headers)


def use(world: World, booking_id: int, minutes: int) -> None:
    """Check a booking in at its start and out `minutes` later (which charges it)."""
    with world.db.unit_of_work() as s:
        booking = s.get(Booking, booking_id)
        assert booking is not None
        usage.check_in(s, booking, now=booking.starts_at)
        usage.check_out(s, booking, now=booking.starts_at + timedelta(minutes=minutes))


def my_bookings(api: TestClient, world: World, user: str) -> list[int]:
    return [b["id"] for b in ok(api.get(BOOKINGS, headers=world.headers(user)))["items"]]


def test_a_booking_holds_its_estimate_and_check_out_charges_it(api: TestClient, world: World) -> None:
    charging(api, world)
    aid = open_account(api, world, "bob", "NSFC-1")["id"]
    ok(call(api, world, "POST", "/vouchers", "cqauth", json=voucher_body(aid, amount_fen=5000)), 201)
    start = next_grid_day(3)

    price = ok(call(api, world, "GET", f"/instruments/{world.instruments['CONF']}/price", "bob",
                    params={"starts_at": start.isoformat(), "ends_at": (start + timedelta(hours=2)).isoformat()}))
    assert (price["account_id"], price["category"], price["quantity"], price["list_amount_fen"],
            price["amount_fen"], price["voucher_estimate_fen"]) == (aid, "academic_region", 120, 20000, 20000, 5000)

    booked = ok(book(api, world, "bob", start, account_id=aid), 201)
    [hold] = ok(call(api, world, "GET", f"/accounts/{aid}/holds", "bob"))["items"]
    assert (hold["source_kind"], hold["source_id"], hold["amount_fen"]) == ("booking", booked["id"], 20000)
    summary = ok(call(api, world, "GET", f"/accounts/{aid}/summary", "bob"))
    assert (summary["held_fen"], summary["spent_fen"], summary["voucher_fen"]) == (20000, 0, 5000)

    use(world, booked["id"], 90)  # booked-time basis: two hours are charged all the same
    assert ok(call(api, world, "GET", f"/accounts/{aid}/holds", "bob"))["items"] == []
    page = ok(call(api, world, "GET", f"/accounts/{aid}/charges", "bob"))
    [charge] = page["items"]
    assert page["next_cursor"] is None
    assert (charge["source_kind"], charge["source_id"], charge["quantity"], charge["amount_fen"]) == (
        "booking", booked["id"], 120, 20000)
    assert charge["parts"] == {"voucher_fen": 5000, "prepaid_fen": 0, "invoice_fen": 15000}
    assert ok(call(api, world, "GET", f"/charges/{charge['id']}", "bob")) == charge
    assert ok(call(api, world, "GET", f"/charges/{charge['id']}", "staff")) == charge
    refused(call(api, world, "GET", f"/charges/{charge['id']}", "carol"), 404, field="charge_id")
    refused(call(api, world, "GET", f"/charges/{charge['id']}", "scmgr"), 404, field="charge_id")

    voucher = ok(call(api, world, "GET", f"/accounts/{aid}/vouchers", "bob"))["items"][0]
    detail = ok(call(api, world, "GET", f"/vouchers/{voucher['id']}", "bob"))
    assert detail["balance_fen"] == 0
    assert [(r["charge_id"], r["amount_fen"]) for r in detail["redemptions"]] == [(charge["id"], 5000)]
    summary = ok(call(api, world, "GET", f"/accounts/{aid}/summary", "bob"))
    assert (summary["held_fen"], summary["spent_fen"], summary["voucher_fen"]) == (0, 20000, 0)

    staff_page = ok(call(api, world, "GET", f"/facilities/{world.facilities['CQ-LAB']}/charges", "staff"))
    assert [c["id"] for c in staff_page["items"]] == [charge["id"]]
    refused(call(api, world, "GET", f"/facilities/{world.facilities['CQ-LAB']}/charges", "scmgr"), 403)
    refused(call(api, world, "GET", f"/facilities/{world.facilities['CQ-LAB']}/charges", "bob"), 403)


def test_a_user_with_two_accounts_must_name_one(api: TestClient, world: World) -> None:
    charging(api, world)
    first = open_account(api, world, "bob", "NSFC-1")["id"]
    second = open_account(api, world, "bob", "NSFC-2")["id"]
    start = next_grid_day(3)
    body = refused(book(api, world, "bob", start), 422, "account_required", "account_id")
    assert sorted(body["accounts"]) == sorted([first, second])
    refused(call(api, world, "GET", f"/instruments/{world.instruments['CONF']}/price", "bob",
                 params={"starts_at": start.isoformat(), "ends_at": (start + timedelta(hours=1)).isoformat()}),
            422, "account_required", "account_id")
    assert my_bookings(api, world, "bob") == []
    refused(book(api, world, "bob", start, account_id=MAX_ID), 422, "account_not_usable", "account_id")
    refused(book(api, world, "bob", start, account_id=MAX_ID + 1), 422, field="account_id")
    carol = open_account(api, world, "carol", "SC-1")["id"]
    refused(book(api, world, "bob", start, account_id=carol), 422, "account_not_usable", "account_id")
    assert my_bookings(api, world, "bob") == []
    ok(book(api, world, "bob", start, account_id=second), 201)
    assert [h["amount_fen"] for h in ok(call(api, world, "GET", f"/accounts/{second}/holds", "bob"))["items"]] == [
        20000]
    assert ok(call(api, world, "GET", f"/accounts/{first}/holds", "bob"))["items"] == []


def test_a_booking_past_the_limit_is_refused_and_leaves_nothing(api: TestClient, world: World) -> None:
    charging(api, world)
    aid = open_account(api, world, "bob", "NSFC-1", limit_fen=30000)["id"]
    start = next_grid_day(3)
    ok(book(api, world, "bob", start), 201)  # the only account: chosen without naming it
    body = refused(book(api, world, "bob", start + timedelta(hours=3), key="b-2"), 422, "spending_limit_exceeded",
                   "account_id")
    assert (body["limit_fen"], body["available_fen"]) == (30000, 10000)
    assert len(my_bookings(api, world, "bob")) == 1
    assert len(ok(call(api, world, "GET", f"/accounts/{aid}/holds", "bob"))["items"]) == 1
    summary = ok(call(api, world, "GET", f"/accounts/{aid}/summary", "bob"))
    assert (summary["held_fen"], summary["available_fen"]) == (20000, 10000)
    ok(book(api, world, "bob", start + timedelta(hours=3), hours=1), 201)
    assert ok(call(api, world, "GET", f"/accounts/{aid}/summary", "bob"))["available_fen"] == 0


def test_a_facility_without_a_policy_charges_nothing(api: TestClient, world: World) -> None:
    open_account(api, world, "bob", "NSFC-1")
    open_account(api, world, "bob", "NSFC-2")
    start = next_grid_day(3)
    price = ok(call(api, world, "GET", f"/instruments/{world.instruments['CONF']}/price", "bob",
                    params={"starts_at": start.isoformat(), "ends_at": (start + timedelta(hours=1)).isoformat()}))
    assert (price["charges"], price["amount_fen"]) == (False, 0)
    ok(book(api, world, "bob", start), 201)


def test_price_input_is_checked(api: TestClient, world: World) -> None:
    charging(api, world)
    open_account(api, world, "bob", "NSFC-1")
    start = next_grid_day(3)
    path = f"/instruments/{world.instruments['CONF']}/price"
    params = {"starts_at": start.isoformat(), "ends_at": (start + timedelta(hours=1)).isoformat()}
    refused(call(api, world, "GET", path, "bob", params={**params, "ends_at": params["starts_at"]}), 422,
            field="ends_at")
    refused(call(api, world, "GET", path, "bob", params={**params, "starts_at": "2026-01-01T10:00"}), 422,
            field="starts_at")
    refused(call(api, world, "GET", path, "bob", params={**params, "account_id": "1.5"}), 422, field="account_id")
    refused(call(api, world, "GET", f"/instruments/{MAX_ID}/price", "bob", params=params), 404)
    assert ok(call(api, world, "GET", path, "bob", params=params))["amount_fen"] == 10000


def charged(api: TestClient, world: World, minutes: int = 120) -> tuple[int, dict[str, Any]]:
    """Bob's account and the charge of one used two-hour booking (with a 5000-fen voucher paying its share)."""
    charging(api, world)
    aid = open_account(api, world, "bob", "NSFC-1")["id"]
    ok(call(api, world, "POST", "/vouchers", "cqauth", json=voucher_body(aid, amount_fen=5000)), 201)
    booked = ok(book(api, world, "bob", next_grid_day(3), account_id=aid), 201)
    use(world, booked["id"], minutes)
    [charge] = ok(call(api, world, "GET", f"/accounts/{aid}/charges", "bob"))["items"]
    return aid, charge


def test_a_correction_reverses_and_replaces(api: TestClient, world: World) -> None:
    aid, charge = charged(api, world)
    path = f"/charges/{charge['id']}/correction"
    refused(call(api, world, "POST", path, "bob", json={"note": "x", "quantity": 60}), 403, "forbidden")
    refused(call(api, world, "POST", path, "scmgr", json={"note": "x", "quantity": 60}), 404, field="charge_id")
    for bad, field in (({"quantity": 60}, "note"), ({"note": "", "quantity": 60}, "note"),
                       ({"note": "x", "quantity": -1}, "quantity"), ({"note": "x", "quantity": 1.5}, "quantity"),
                       ({"note": "x", "amount_fen": True}, "amount_fen"),
                       ({"note": "x", "quantity": 60, "amount_fen": 5}, "amount_fen"),
                       ({"note": "x"}, "quantity")):
        refused(call(api, world, "POST", path, "staff", json=bad), 422, field=field)
    assert count(world, Charge) == 1

    first = call(api, world, "POST", path, "staff", "fix-1", json={"note": "Left after an hour", "quantity": 60})
    done = ok(first, 201)
    replay = call(api, world, "POST", path, "staff", "fix-1", json={"note": "Left after an hour", "quantity": 60})
    assert replay.json() == done and replay.headers.get("Idempotent-Replayed") == "true"
    reversal, replacement = done["reversal"], done["replacement"]
    assert (reversal["reverses_id"], reversal["amount_fen"], reversal["note"]) == (
        charge["id"], -20000, "Left after an hour")
    assert reversal["parts"] == {"voucher_fen": -5000, "prepaid_fen": 0, "invoice_fen": -15000}
    assert (replacement["quantity"], replacement["amount_fen"], replacement["seq"]) == (60, 10000, 3)
    assert replacement["parts"] == {"voucher_fen": 5000, "prepaid_fen": 0, "invoice_fen": 5000}
    listed = ok(call(api, world, "GET", f"/accounts/{aid}/charges", "bob"))["items"]
    assert [c["id"] for c in listed] == [replacement["id"], reversal["id"], charge["id"]]
    assert sum(c["amount_fen"] for c in listed) == 10000

    refused(call(api, world, "POST", path, "staff", json={"note": "again", "quantity": 30}), 409, "already_reversed")
    refused(call(api, world, "POST", f"/charges/{reversal['id']}/reversal", "staff", json={"note": "no"}), 409,
            "charge_not_correctable")
    gone = ok(call(api, world, "POST", f"/charges/{replacement['id']}/reversal", "mgr", json={"note": "waived"}),
              201)
    assert gone["amount_fen"] == -10000 and gone["reverses_id"] == replacement["id"]
    summary = ok(call(api, world, "GET", f"/accounts/{aid}/summary", "bob"))
    assert (summary["spent_fen"], summary["voucher_fen"]) == (0, 5000)


def test_a_correction_by_amount(api: TestClient, world: World) -> None:
    _aid, charge = charged(api, world)
    done = ok(call(api, world, "POST", f"/charges/{charge['id']}/correction", "staff",
                   json={"note": "agreed price", "amount_fen": 8000}), 201)
    # A corrected amount is a lump sum (one unit at that price), so a later correction by quantity cannot treat it
    # as the hourly rate.
    replacement = done["replacement"]
    assert (replacement["amount_fen"], replacement["quantity"], replacement["unit"]) == (8000, 1, "project")
    zero = ok(call(api, world, "POST", f"/charges/{done['replacement']['id']}/correction", "staff",
                   json={"note": "waived", "amount_fen": 0}), 201)
    assert zero["replacement"] is None and zero["reversal"]["amount_fen"] == -8000


def test_manual_charges_and_pages(api: TestClient, world: World) -> None:
    aid = open_account(api, world, "bob", "NSFC-1")["id"]
    ok(call(api, world, "POST", f"/accounts/{aid}/members", "bob", json={"email": "carol@example.org"}), 201)
    body = {"facility_id": world.facilities["CQ-LAB"], "account_id": aid, "user_email": "carol@example.org",
            "description": "Consumables: 2 slides", "amount_fen": 1500, "service_date": TODAY.isoformat()}
    refused(call(api, world, "POST", "/charges", "bob", json=body), 403, "forbidden")
    refused(call(api, world, "POST", "/charges", "scmgr", json=body), 403, "forbidden")
    for bad, field in (({"amount_fen": 0}, "amount_fen"), ({"amount_fen": 1.5}, "amount_fen"),
                       ({"user_email": "alice@example.org"}, "account_id"),
                       ({"user_email": "nobody@example.org"}, "email"),
                       ({"item_kind": "catering"}, "item_kind"), ({"description": ""}, "description"),
                       ({"account_id": MAX_ID + 1}, "account_id"), ({"facility_id": MAX_ID}, "facility_id")):
        answer = call(api, world, "POST", "/charges", "staff", json={**body, **bad})
        assert answer.status_code in (404, 422) and answer.json()["field"] == field, answer.text
    assert count(world, Charge) == 0

    first = ok(call(api, world, "POST", "/charges", "staff", "m-1", json=body), 201)
    assert call(api, world, "POST", "/charges", "staff", "m-1", json=body).json() == first
    assert (first["source_kind"], first["user_id"], first["amount_fen"], first["parts"]["invoice_fen"]) == (
        "manual", first["user_id"], 1500, 1500)
    for n in range(2):
        ok(call(api, world, "POST", "/charges", "staff", json={**body, "amount_fen": 100 + n}), 201)
    assert count(world, Charge) == 3

    seen: list[int] = []
    cursor = None
    for _ in range(5):
        page = ok(call(api, world, "GET", f"/accounts/{aid}/charges", "carol",
                       params={"limit": 2, **({"cursor": cursor} if cursor else {})}))
        seen += [c["amount_fen"] for c in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == [101, 100, 1500]
    refused(call(api, world, "GET", f"/accounts/{aid}/charges", "bob", params={"cursor": "garbage"}), 422,
            "invalid_cursor", "cursor")
    refused(call(api, world, "GET", f"/accounts/{aid}/charges", "bob", params={"limit": 0}), 422, field="limit")
    facility = ok(call(api, world, "GET", f"/facilities/{world.facilities['CQ-LAB']}/charges", "staff",
                       params={"limit": 1}))
    assert [c["amount_fen"] for c in facility["items"]] == [101] and facility["next_cursor"]


def test_check_out_charges_a_prepaid_account_from_its_balance(api: TestClient, world: World) -> None:
    charging(api, world)
    aid = open_account(api, world, "bob", "CO-PRE", prepaid=True)["id"]
    start = next_grid_day(3)
    refused(book(api, world, "bob", start), 422, "insufficient_balance", "account_id")
    ok(call(api, world, "POST", f"/accounts/{aid}/deposits", "cqadmin", json={"amount_fen": 15000}), 201)
    booked = ok(book(api, world, "bob", start, hours=1), 201)
    use(world, booked["id"], 60)
    [charge] = ok(call(api, world, "GET", f"/accounts/{aid}/charges", "bob"))["items"]
    assert charge["parts"] == {"voucher_fen": 0, "prepaid_fen": 10000, "invoice_fen": 0}
    assert ok(call(api, world, "GET", f"/accounts/{aid}", "bob"))["balance_fen"] == 5000
