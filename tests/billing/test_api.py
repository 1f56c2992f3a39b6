"""The billing API: facility rules and rate cards, funding accounts and members, deposits, vouchers and their
recognition; permissions, 4xx bodies naming the field, idempotent retries; on both databases."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from labcommons.billing.models import BillingAccount, Rate, Voucher
from labcommons.db import MAX_ID
from labcommons.identity import roles
from labcommons.identity import service as identity
from tests.api_client import client_for
from tests.billing.test_talent import authority
from tests.factories import World

B = "/api/v1/billing"
TODAY = date.today()


def person(world: World, name: str, institution: str, role: str | None = None, **scope: Any) -> None:
    """A new user `name` of `institution` holding `role` over `scope`, with a token in world.tokens."""
    with world.db.unit_of_work() as s:
        user = identity.create_user(s, email=f"{name}@example.org", name=name.title(), institution_code=institution,
                                    password="correct horse")
        if role is not None:
            roles.grant_role(s, None, user, role, **scope)
        world.tokens[name] = identity.create_api_token(s, user, name="test")


@pytest.fixture
def api(world: World) -> TestClient:
    return billing_client(world)


def billing_client(world: World) -> TestClient:
    """A client of the world with a CQ-LAB manager and staff member, an SC-UNI manager, a CQ-UNI administrator and
    both regions' authorities."""
    person(world, "mgr", "CQ-LAB", "facility_manager", facility_id=world.facilities["CQ-LAB"])
    person(world, "staff", "CQ-LAB", "facility_staff", facility_id=world.facilities["CQ-LAB"])
    person(world, "scmgr", "SC-UNI", "facility_manager", facility_id=world.facilities["SC-UNI"])
    person(world, "cqadmin", "CQ-UNI", "institution_admin", institution_id=world.institutions["CQ-UNI"])
    authority(world, "scauth", "SC")
    authority(world, "cqauth", "CQ")
    return client_for(world.db)


def call(api: TestClient, world: World, method: str, path: str, user: str | None, key: str | None = None,
         **kwargs: Any) -> Any:
    headers = world.headers(user) if user else {}
    if key:
        headers["Idempotency-Key"] = key
    return api.request(method, B + path, headers=headers, **kwargs)


def ok(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def refused(response: Any, status: int, error: str | None = None, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    if error is not None:
        assert body["error"] == error, body
    if field is not None:
        assert body["field"] == field, body
    return body


def charging(api: TestClient, world: World, amount_fen: int = 10000, **policy: Any) -> None:
    """CQ-LAB charges (booked time, 15-minute steps) and CONF costs `amount_fen` an hour to every category."""
    ok(call(api, world, "PUT", f"/facilities/{world.facilities['CQ-LAB']}/policy", "mgr", json=policy))
    for category in ("internal", "academic_region", "academic_other", "industry"):
        ok(call(api, world, "POST", "/rates", "mgr", json=rate_body(world, category=category, amount_fen=amount_fen)),
           201)


def rate_body(world: World, **fields: Any) -> dict[str, Any]:
    return {"instrument_id": world.instruments["CONF"], "category": "academic_region", "unit": "hour",
            "amount_fen": 10000, "effective_from": TODAY.isoformat(), **fields}


def open_account(api: TestClient, world: World, user: str, code: str, key: str | None = None,
                 **fields: Any) -> dict[str, Any]:
    answer: dict[str, Any] = ok(call(api, world, "POST", "/accounts", user, key,
                                     json={"code": code, "name": f"Grant {code}", **fields}), 201)
    return answer


def count(world: World, model: Any) -> int:
    with world.db.unit_of_work(write=False) as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


# --- policy and rates -----------------------------------------------------------------------------------------


def test_policy_is_public_and_its_managers_change_it(api: TestClient, world: World) -> None:
    path = f"/facilities/{world.facilities['CQ-LAB']}/policy"
    before = ok(call(api, world, "GET", path, None))
    assert before["charges"] is False and before["basis"] is None
    changed = ok(call(api, world, "PUT", path, "mgr", json={"basis": "actual", "increment_minutes": 30}))
    assert (changed["charges"], changed["basis"], changed["increment_minutes"], changed["rounding"]) == (
        True, "actual", 30, "up")
    partial = ok(call(api, world, "PUT", path, "mgr", json={"rounding": "nearest"}))
    assert (partial["basis"], partial["rounding"]) == ("actual", "nearest")
    assert ok(call(api, world, "GET", path, None))["rounding"] == "nearest"

    refused(call(api, world, "PUT", path, "alice", json={}), 403, "forbidden")
    refused(call(api, world, "PUT", path, "staff", json={}), 403, "forbidden")
    refused(call(api, world, "PUT", path, "scmgr", json={"basis": "booked"}), 403, "forbidden")
    refused(call(api, world, "PUT", path, "mgr", json={"increment_minutes": 0}), 422, field="increment_minutes")
    refused(call(api, world, "PUT", path, "mgr", json={"basis": "sometimes"}), 422, field="basis")
    refused(call(api, world, "PUT", path, "mgr", json={"charge_no_show": 1}), 422, field="charge_no_show")
    refused(call(api, world, "PUT", path, "mgr", json={"colour": "red"}), 422, field="colour")
    refused(call(api, world, "GET", f"/facilities/{MAX_ID}/policy", None), 404, field="facility_id")
    refused(call(api, world, "GET", f"/facilities/{MAX_ID + 1}/policy", None), 422, field="facility_id")
    assert ok(call(api, world, "GET", path, None))["basis"] == "actual"


def test_rates_are_set_by_managers_and_read_by_anyone(api: TestClient, world: World) -> None:
    created = ok(call(api, world, "POST", "/rates", "mgr", json=rate_body(world)), 201)
    assert (created["category"], created["amount_fen"], created["effective_to"]) == ("academic_region", 10000, None)
    later = (TODAY + timedelta(days=30)).isoformat()
    ok(call(api, world, "POST", "/rates", "mgr", json=rate_body(world, amount_fen=12000, effective_from=later)), 201)
    ok(call(api, world, "POST", "/rates", "mgr", json=rate_body(world, category="industry", assisted=True,
                                                                 amount_fen=30000)), 201)

    facility = ok(call(api, world, "GET", f"/facilities/{world.facilities['CQ-LAB']}/rates", None))["items"]
    assert sorted((r["category"], r["amount_fen"], r["effective_to"]) for r in facility) == [
        ("academic_region", 10000, later), ("academic_region", 12000, None), ("industry", 30000, None)]
    on_later = call(api, world, "GET", f"/facilities/{world.facilities['CQ-LAB']}/rates", None,
                    params={"on": later})
    assert sorted(r["amount_fen"] for r in ok(on_later)["items"]) == [12000, 30000]
    card = ok(call(api, world, "GET", f"/instruments/{world.instruments['CONF']}/rates", None))["items"]
    assert sorted(r["amount_fen"] for r in card) == [10000, 30000]
    assert ok(call(api, world, "GET", f"/instruments/{world.instruments['SEQ']}/rates", None))["items"] == []
    refused(call(api, world, "GET", f"/instruments/{MAX_ID}/rates", None), 404, field="instrument_id")
    refused(call(api, world, "GET", f"/services/{MAX_ID}/rates", None), 404, field="service_id")

    again = call(api, world, "POST", "/rates", "mgr", json=rate_body(world))
    refused(again, 409, "rate_exists", "effective_from")
    refused(call(api, world, "POST", "/rates", "alice", json=rate_body(world)), 403, "forbidden")
    refused(call(api, world, "POST", "/rates", "scmgr", json=rate_body(world)), 403, "forbidden")
    assert count(world, Rate) == 3


def test_service_rates(api: TestClient, world: World) -> None:
    from tests.orders.order_support import add_service

    service_id = add_service(world)
    body = {"service_id": service_id, "category": "academic_other", "unit": "sample", "amount_fen": 50000,
            "effective_from": TODAY.isoformat()}
    ok(call(api, world, "POST", "/rates", "mgr", json=body), 201)
    [rate] = ok(call(api, world, "GET", f"/services/{service_id}/rates", None))["items"]
    assert (rate["service_id"], rate["instrument_id"], rate["unit"]) == (service_id, None, "sample")


@pytest.mark.parametrize(("change", "field"), [
    ({"category": "students"}, "category"),
    ({"amount_fen": -1}, "amount_fen"),
    ({"amount_fen": 100.5}, "amount_fen"),
    ({"amount_fen": 100.0}, "amount_fen"),
    ({"amount_fen": "100"}, "amount_fen"),
    ({"amount_fen": True}, "amount_fen"),
    ({"amount_fen": 10**12}, "amount_fen"),
    ({"assisted": 1}, "assisted"),
    ({"instrument_id": MAX_ID + 1}, "instrument_id"),
    ({"instrument_id": 0}, "instrument_id"),
    ({"instrument_id": None}, "instrument_id"),
    ({"service_id": 1}, "instrument_id"),
    ({"unit": "project"}, "unit"),
    ({"unit": "day"}, "unit"),
    ({"effective_from": (TODAY - timedelta(days=5)).isoformat()}, "effective_from"),
    ({"effective_from": "tomorrow"}, "effective_from"),
    ({"price": 5}, "price"),
])
def test_bad_rates_are_refused_naming_the_field(api: TestClient, world: World, change: dict[str, Any],
                                                field: str) -> None:
    answer = call(api, world, "POST", "/rates", "mgr", json=rate_body(world, **change))
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field
    assert count(world, Rate) == 0


def test_a_rate_beyond_the_id_range_is_404_for_a_missing_instrument(api: TestClient, world: World) -> None:
    refused(call(api, world, "POST", "/rates", "mgr", json=rate_body(world, instrument_id=MAX_ID)), 404,
            field="instrument_id")


def test_idempotent_retries_return_the_same_body_and_create_one_row(api: TestClient, world: World) -> None:
    first = call(api, world, "POST", "/rates", "mgr", "rate-1", json=rate_body(world))
    second = call(api, world, "POST", "/rates", "mgr", "rate-1", json=rate_body(world))
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json() and second.headers.get("Idempotent-Replayed") == "true"
    assert count(world, Rate) == 1
    other = call(api, world, "POST", "/rates", "mgr", "rate-1", json=rate_body(world, amount_fen=1))
    refused(other, 422, "idempotency_key_reused")

    one = open_account(api, world, "bob", "NSFC-1", "acc-1")
    assert open_account(api, world, "bob", "NSFC-1", "acc-1") == one
    assert count(world, BillingAccount) == 1


# --- accounts -------------------------------------------------------------------------------------------------


def test_accounts_members_and_limits(api: TestClient, world: World) -> None:
    account = open_account(api, world, "bob", "NSFC-82001", limit_fen=500000)
    aid = account["id"]
    assert (account["owner_id"], account["kind"], account["region_code"], account["can_manage"]) == (
        account["owner_id"], "grant", "CQ", True)
    assert [a["code"] for a in ok(call(api, world, "GET", "/accounts", "bob"))["items"]] == ["NSFC-82001"]
    assert ok(call(api, world, "GET", "/accounts", "carol"))["items"] == []
    refused(call(api, world, "GET", f"/accounts/{aid}", "carol"), 404, field="account_id")

    # Carol asks to join by code; the owner approves her with a personal limit.
    request = ok(call(api, world, "POST", "/accounts/join", "carol", json={"code": "NSFC-82001"}))
    assert request["status"] == "pending" and request["user_name"] == "Carol"
    refused(call(api, world, "GET", f"/accounts/{aid}", "carol"), 404)
    refused(call(api, world, "POST", f"/members/{request['id']}/decision", "carol", json={"status": "approved"}),
            404, field="member_id")
    decided = ok(call(api, world, "POST", f"/members/{request['id']}/decision", "bob",
                      json={"status": "approved", "limit_fen": 1000}))
    assert (decided["status"], decided["limit_fen"]) == ("approved", 1000)
    seen = ok(call(api, world, "GET", f"/accounts/{aid}", "carol"))
    assert seen["code"] == "NSFC-82001" and seen["can_manage"] is False
    assert [a["can_manage"] for a in ok(call(api, world, "GET", "/accounts", "carol"))["items"]] == [False]
    cleared = ok(call(api, world, "POST", f"/members/{request['id']}/decision", "bob",
                      json={"status": "approved", "limit_fen": None}))
    assert cleared["limit_fen"] is None

    # A member reads the account but does not manage it.
    refused(call(api, world, "PATCH", f"/accounts/{aid}", "carol", json={"name": "Mine"}), 403, "forbidden")
    refused(call(api, world, "GET", f"/accounts/{aid}/members", "carol"), 403, "forbidden")
    refused(call(api, world, "POST", f"/accounts/{aid}/members", "carol", json={"email": "alice@example.org"}),
            403, "forbidden")
    refused(call(api, world, "POST", f"/accounts/{aid}/members", "alice", json={"email": "carol@example.org"}),
            404, field="account_id")

    added = ok(call(api, world, "POST", f"/accounts/{aid}/members", "bob", json={"email": "Alice@example.org"}), 201)
    assert (added["user_name"], added["status"]) == ("Alice", "approved")
    refused(call(api, world, "POST", f"/accounts/{aid}/members", "bob", json={"email": "nobody@example.org"}),
            404, field="email")
    listed = ok(call(api, world, "GET", f"/accounts/{aid}/members", "bob"))["items"]
    assert [(m["user_name"], m["status"]) for m in listed] == [
        ("Bob", "approved"), ("Carol", "approved"), ("Alice", "approved")]
    owner_row = listed[0]["id"]
    refused(call(api, world, "POST", f"/members/{owner_row}/decision", "bob", json={"status": "revoked"}),
            409, "owner_member")
    refused(call(api, world, "POST", f"/members/{request['id']}/decision", "bob", json={"status": "maybe"}),
            422, field="status")

    patched = ok(call(api, world, "PATCH", f"/accounts/{aid}", "bob", json={"name": "Renamed", "limit_fen": 700}))
    assert (patched["name"], patched["limit_fen"]) == ("Renamed", 700)
    unlimited = ok(call(api, world, "PATCH", f"/accounts/{aid}", "bob", json={"limit_fen": None}))
    assert (unlimited["name"], unlimited["limit_fen"]) == ("Renamed", None)
    refused(call(api, world, "PATCH", f"/accounts/{aid}", "bob", json={"limit_fen": -5}), 422, field="limit_fen")
    refused(call(api, world, "PATCH", f"/accounts/{aid}", "bob", json={"limit_fen": 5.5}), 422, field="limit_fen")
    refused(call(api, world, "PATCH", f"/accounts/{aid}", "bob", json={"status": "gone"}), 422, field="status")
    assert ok(call(api, world, "GET", f"/accounts/{aid}", "bob"))["limit_fen"] is None

    summary = ok(call(api, world, "GET", f"/accounts/{aid}/summary", "carol"))
    assert summary == {"account_id": aid, "limit_fen": None, "spent_fen": 0, "held_fen": 0, "available_fen": None,
                       "balance_fen": 0, "voucher_fen": 0}
    assert ok(call(api, world, "GET", f"/accounts/{aid}/holds", "carol"))["items"] == []
    page = ok(call(api, world, "GET", f"/accounts/{aid}/charges", "carol"))
    assert page == {"items": [], "next_cursor": None}
    refused(call(api, world, "GET", f"/accounts/{aid}/charges", "cqauth"), 404)

    # The CQ-UNI administrator manages every account of the institution.
    suspended = ok(call(api, world, "PATCH", f"/accounts/{aid}", "cqadmin", json={"status": "suspended"}))
    assert suspended["status"] == "suspended" and suspended["can_manage"] is True
    refused(call(api, world, "POST", "/accounts/join", "alice", json={"code": "NSFC-82001"}), 404, field="code")


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"code": "x", "name": "A"}, 422, "code"),
    ({"code": "has space", "name": "A"}, 422, "code"),
    ({"code": "OK-1", "name": ""}, 422, "name"),
    ({"code": "OK-1", "name": "A", "kind": "company"}, 422, "kind"),
    ({"code": "OK-1", "name": "A", "kind": "bank"}, 422, "kind"),
    ({"code": "OK-1", "name": "A", "limit_fen": -1}, 422, "limit_fen"),
    ({"code": "OK-1", "name": "A", "limit_fen": 1.5}, 422, "limit_fen"),
    ({"code": "OK-1", "name": "A", "prepaid": "yes"}, 422, "prepaid"),
    ({"code": "OK-1", "name": "A", "owner_id": MAX_ID + 1}, 422, "owner_id"),
    ({"code": "OK-1", "name": "A", "institution_id": 1, "owner_id": 1}, 403, "owner_id"),
    ({"code": "OK-1"}, 422, "name"),
])
def test_bad_accounts_are_refused(api: TestClient, world: World, body: dict[str, Any], status: int,
                                  field: str) -> None:
    refused(call(api, world, "POST", "/accounts", "bob", json=body), status, field=field)
    assert count(world, BillingAccount) == 0


def test_an_account_code_is_taken_once(api: TestClient, world: World) -> None:
    open_account(api, world, "bob", "NSFC-1")
    refused(call(api, world, "POST", "/accounts", "carol", json={"code": "NSFC-1", "name": "Other"}), 409,
            "code_taken", "code")


def test_deposits_are_recorded_by_the_institution_administrator(api: TestClient, world: World) -> None:
    prepaid = open_account(api, world, "bob", "CO-PRE", prepaid=True)["id"]
    invoiced = open_account(api, world, "bob", "CO-INV")["id"]
    path = f"/accounts/{prepaid}/deposits"
    refused(call(api, world, "POST", path, "bob", json={"amount_fen": 100}), 403, "forbidden")
    refused(call(api, world, "POST", path, "scmgr", json={"amount_fen": 100}), 403, "forbidden")
    first = ok(call(api, world, "POST", path, "cqadmin", "dep-1", json={"amount_fen": 50000, "reference": "TT-1"}),
               201)
    replay = call(api, world, "POST", path, "cqadmin", "dep-1", json={"amount_fen": 50000, "reference": "TT-1"})
    assert replay.json() == first and replay.headers.get("Idempotent-Replayed") == "true"
    for bad in ({"amount_fen": 0}, {"amount_fen": -5}, {"amount_fen": 10.0}, {"amount_fen": False},
                {"amount_fen": 1, "reference": "x" * 101}):
        assert call(api, world, "POST", path, "cqadmin", json=bad).status_code == 422
    refused(call(api, world, "POST", f"/accounts/{invoiced}/deposits", "cqadmin", json={"amount_fen": 1}), 409,
            "not_prepaid")
    refused(call(api, world, "POST", f"/accounts/{MAX_ID}/deposits", "cqadmin", json={"amount_fen": 1}), 404)

    listed = ok(call(api, world, "GET", path, "bob"))["items"]
    assert [(d["amount_fen"], d["reference"]) for d in listed] == [(50000, "TT-1")]
    refused(call(api, world, "GET", path, "carol"), 404)
    summary = ok(call(api, world, "GET", f"/accounts/{prepaid}/summary", "bob"))
    assert (summary["balance_fen"], summary["available_fen"]) == (50000, 50000)


# --- vouchers and recognition ---------------------------------------------------------------------------------


def voucher_body(account_id: int, **fields: Any) -> dict[str, Any]:
    return {"issuer_region_code": "CQ", "account_id": account_id, "amount_fen": 200000,
            "valid_from": (TODAY - timedelta(days=1)).isoformat(),
            "valid_until": (TODAY + timedelta(days=90)).isoformat(), "share_bp": 5000, "name": "Innovation voucher",
            "eligible_kinds": ["instrument", "testing"], **fields}


def test_vouchers_are_issued_by_their_region_and_seen_by_the_account(api: TestClient, world: World) -> None:
    aid = open_account(api, world, "bob", "CO-1")["id"]
    issued = ok(call(api, world, "POST", "/vouchers", "cqauth", "v-1", json=voucher_body(aid)), 201)
    assert (issued["balance_fen"], issued["eligible_kinds"], issued["status"]) == (
        200000, ["instrument", "testing"], "active")
    replay = call(api, world, "POST", "/vouchers", "cqauth", "v-1", json=voucher_body(aid))
    assert replay.json() == issued and count(world, Voucher) == 1

    refused(call(api, world, "POST", "/vouchers", "scauth", json=voucher_body(aid)), 403, "forbidden",
            "issuer_region_code")
    refused(call(api, world, "POST", "/vouchers", "bob", json=voucher_body(aid)), 403, "forbidden")
    refused(call(api, world, "POST", "/vouchers", "cqauth", json=voucher_body(MAX_ID)), 404, field="account_id")
    assert count(world, Voucher) == 1

    assert [v["id"] for v in ok(call(api, world, "GET", "/vouchers", "cqauth"))["items"]] == [issued["id"]]
    assert ok(call(api, world, "GET", "/vouchers", "scauth"))["items"] == []
    refused(call(api, world, "GET", "/vouchers", "scauth", params={"region": "CQ"}), 403, field="region")
    refused(call(api, world, "GET", "/vouchers", "bob"), 403, "forbidden")

    mine = ok(call(api, world, "GET", f"/accounts/{aid}/vouchers", "bob"))["items"]
    assert [v["code"] for v in mine] == [issued["code"]]
    detail = ok(call(api, world, "GET", f"/vouchers/{issued['id']}", "bob"))
    assert detail["redemptions"] == [] and detail["amount_fen"] == 200000
    assert ok(call(api, world, "GET", f"/vouchers/{issued['id']}", "cqauth"))["id"] == issued["id"]
    refused(call(api, world, "GET", f"/vouchers/{issued['id']}", "carol"), 404, field="voucher_id")
    refused(call(api, world, "GET", f"/vouchers/{issued['id']}", "scauth"), 404, field="voucher_id")
    assert ok(call(api, world, "GET", f"/accounts/{aid}/summary", "bob"))["voucher_fen"] == 200000

    refused(call(api, world, "POST", f"/vouchers/{issued['id']}/revoke", "scauth"), 404)
    refused(call(api, world, "POST", f"/vouchers/{issued['id']}/revoke", "bob"), 403)
    revoked = ok(call(api, world, "POST", f"/vouchers/{issued['id']}/revoke", "cqauth"))
    assert revoked["status"] == "revoked"
    assert ok(call(api, world, "GET", f"/accounts/{aid}/summary", "bob"))["voucher_fen"] == 0


@pytest.mark.parametrize(("change", "field"), [
    ({"amount_fen": 0}, "amount_fen"),
    ({"amount_fen": 12.5}, "amount_fen"),
    ({"amount_fen": True}, "amount_fen"),
    ({"share_bp": 0}, "share_bp"),
    ({"share_bp": 10001}, "share_bp"),
    ({"valid_until": (TODAY - timedelta(days=3)).isoformat()}, "valid_until"),
    ({"eligible_kinds": ["catering"]}, "eligible_kinds"),
    ({"eligible_categories": ["NOPE.X"]}, "eligible_categories"),
    ({"issuer_region_code": "XX"}, "issuer_region_code"),
    ({"account_id": MAX_ID + 1}, "account_id"),
    ({"account_id": "1"}, "account_id"),
])
def test_bad_vouchers_are_refused(api: TestClient, world: World, change: dict[str, Any], field: str) -> None:
    aid = open_account(api, world, "bob", "CO-1")["id"]
    answer = call(api, world, "POST", "/vouchers", "cqauth", json={**voucher_body(aid), **change})
    assert answer.status_code in (403, 422), answer.text
    assert answer.json()["field"] == field
    assert count(world, Voucher) == 0


def test_recognition_is_public_and_set_by_the_providers_authority(api: TestClient, world: World) -> None:
    def pairs() -> set[tuple[str, str]]:
        items = ok(call(api, world, "GET", "/voucher-recognition", None))["items"]
        return {(r["issuer_region_code"], r["provider_region_code"]) for r in items}

    every = {("CQ", "CQ"), ("CQ", "SC"), ("SC", "CQ"), ("SC", "SC")}
    assert pairs() == every
    body = {"issuer_region_code": "CQ", "provider_region_code": "SC", "accepted": False}
    refused(call(api, world, "PUT", "/voucher-recognition", "cqauth", json=body), 403, "forbidden")
    refused(call(api, world, "PUT", "/voucher-recognition", "bob", json=body), 403, "forbidden")
    refused(call(api, world, "PUT", "/voucher-recognition", "scauth", json={**body, "accepted": "no"}), 422,
            field="accepted")
    refused(call(api, world, "PUT", "/voucher-recognition", "scauth", json={**body, "issuer_region_code": "XX"}),
            404, field="issuer_region_code")
    assert pairs() == every
    try:
        ok(call(api, world, "PUT", "/voucher-recognition", "scauth", json=body))
        assert pairs() == every - {("CQ", "SC")}
    finally:
        # voucher_recognition is reference data kept between PostgreSQL tests: put it back.
        ok(call(api, world, "PUT", "/voucher-recognition", "scauth", json={**body, "accepted": True}))
    assert pairs() == every
