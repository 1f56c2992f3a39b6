"""The talent card API: public schemes, submitting (idempotent), the authority's queue and decisions, entitlement
editing, scopes, and 4xx bodies naming the field; on both databases."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from labcommons.identity import service as identity
from tests.api_client import client_for
from tests.billing.test_talent import add_card, add_schemes, authority
from tests.factories import World

CARDS = "/api/v1/billing/talent-cards"


@pytest.fixture
def api(world: World) -> TestClient:
    add_schemes(world)
    authority(world, "scauth", "SC")
    authority(world, "cqauth", "CQ")
    return client_for(world.db)


def token(world: World, name: str, *scopes: str) -> dict[str, str]:
    with world.db.unit_of_work() as s:
        secret = identity.create_api_token(s, identity.find_user(s, f"{name}@example.org"), name="t",
                                           scopes=list(scopes))
    return {"Authorization": f"Bearer {secret}"}


def card_body(**fields: object) -> dict[str, object]:
    return {"scheme_code": "tianfu", "card_number": "TF-0001", "holder_name": "Bob", **fields}


def test_schemes_are_public_with_entitlements_per_region(api: TestClient) -> None:
    answer = api.get("/api/v1/billing/talent-schemes")
    assert answer.status_code == 200
    schemes = {s["code"]: s for s in answer.json()["items"]}
    assert schemes["tianfu"]["region_code"] == "SC" and schemes["tianfu"]["name_zh"] == "天府人才卡"
    assert sorted(schemes["tianfu"]["entitlements"]) == ["CQ", "SC"]
    cq = {e["kind"]: e["value"] for e in schemes["tianfu"]["entitlements"]["CQ"]}
    assert cq == {"priority_window": 20, "fee_discount": 500, "fast_track": 0}


def test_submit_list_verify_revoke(api: TestClient, world: World) -> None:
    headers = world.headers("bob", **{"Idempotency-Key": "card-1"})
    submitted = api.post(CARDS, json=card_body(valid_until="2099-12-31"), headers=headers)
    assert submitted.status_code == 201, submitted.text
    card = submitted.json()
    assert (card["status"], card["card_number"], card["valid_until"]) == ("pending", "TF-0001", "2099-12-31")
    replay = api.post(CARDS, json=card_body(valid_until="2099-12-31"), headers=headers)
    assert replay.status_code == 201 and replay.json()["id"] == card["id"]
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert [c["id"] for c in api.get(CARDS, headers=world.headers("bob")).json()["items"]] == [card["id"]]
    assert api.get(CARDS, headers=world.headers("carol")).json()["items"] == []

    queue = api.get(f"{CARDS}/queue", headers=world.headers("scauth"))
    assert queue.status_code == 200
    [item] = queue.json()["items"]
    assert (item["id"], item["user_name"], item["name_matches"]) == (card["id"], "Bob", True)
    assert api.get(f"{CARDS}/queue", headers=world.headers("cqauth")).json()["items"] == []

    # The other region's authority does not see it; a plain user is refused before anything else.
    assert api.post(f"{CARDS}/{card['id']}/verify", headers=world.headers("cqauth")).status_code == 404
    refused = api.post(f"{CARDS}/{card['id']}/verify", headers=world.headers("alice"))
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    verified = api.post(f"{CARDS}/{card['id']}/verify", json={"note": "ok"}, headers=world.headers("scauth"))
    assert verified.status_code == 200 and verified.json()["status"] == "verified"
    again = api.post(f"{CARDS}/{card['id']}/verify", headers=world.headers("scauth"))
    assert again.status_code == 409 and again.json()["error"] == "card_not_pending"
    assert again.json()["field"] == "status"

    no_note = api.post(f"{CARDS}/{card['id']}/revoke", json={}, headers=world.headers("scauth"))
    assert no_note.status_code == 422 and no_note.json()["field"] == "note"
    revoked = api.post(f"{CARDS}/{card['id']}/revoke", json={"note": "withdrawn"}, headers=world.headers("scauth"))
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    listed = api.get(f"{CARDS}/queue", params={"status": "revoked"}, headers=world.headers("scauth")).json()
    assert [c["note"] for c in listed["items"]] == ["withdrawn"]


def test_error_bodies_name_the_field(api: TestClient, world: World) -> None:
    bob = world.headers("bob")
    add_card(world, "carol", number="TF-0001")
    taken = api.post(CARDS, json=card_body(), headers=bob)
    assert taken.status_code == 409
    assert (taken.json()["error"], taken.json()["field"]) == ("card_number_taken", "card_number")
    cases = [
        (card_body(scheme_code="nope", card_number="X1"), "scheme_code", "unknown_scheme"),
        (card_body(card_number="A B"), "card_number", "invalid_card_number"),
        (card_body(card_number="X2", valid_until="2001-01-01"), "valid_until", "card_expired"),
        (card_body(card_number="X3", valid_until="not a date"), "valid_until", "invalid_input"),
        ({"scheme_code": "tianfu", "card_number": "X4"}, "holder_name", "missing_field"),
        (card_body(card_number="X5", colour="red"), "colour", "invalid_input"),
    ]
    for body, field, code in cases:
        answer = api.post(CARDS, json=body, headers=bob)
        assert answer.status_code == 422, (body, answer.text)
        assert (answer.json()["field"], answer.json()["error"]) == (field, code), body

    mismatch = api.post(CARDS, json=card_body(card_number="TF-7", holder_name="Robert Roe"), headers=bob).json()
    refused = api.post(f"{CARDS}/{mismatch['id']}/verify", json={}, headers=world.headers("scauth"))
    assert refused.status_code == 422
    assert (refused.json()["error"], refused.json()["field"]) == ("holder_name_mismatch", "confirm_holder")
    confirmed = api.post(f"{CARDS}/{mismatch['id']}/verify", json={"confirm_holder": True},
                         headers=world.headers("scauth"))
    assert confirmed.status_code == 200
    missing = api.post(f"{CARDS}/999999/reject", json={"note": "x"}, headers=world.headers("scauth"))
    assert missing.status_code == 404 and missing.json()["field"] == "card_id"


def test_scopes_and_authentication(api: TestClient, world: World) -> None:
    assert api.get(CARDS).status_code == 401
    reader = token(world, "bob", "billing:read")
    assert api.get(CARDS, headers=reader).status_code == 200
    refused = api.post(CARDS, json=card_body(), headers=reader)
    assert refused.status_code == 403 and refused.json()["error"] == "insufficient_scope"
    assert api.get(CARDS, headers=token(world, "bob", "orders:read")).status_code == 403
    writer = token(world, "bob", "billing:write")
    assert api.post(CARDS, json=card_body(), headers=writer).status_code == 201


def test_each_region_decides_what_its_providers_grant(api: TestClient, world: World) -> None:
    path = "/api/v1/billing/talent-entitlements"
    # Tianfu (Sichuan) holders at Chongqing providers: Chongqing's authority decides, not Sichuan's.
    body = {"scheme_code": "tianfu", "provider_region_code": "CQ", "kind": "fee_discount", "value": 1200}
    assert api.post(path, json=body, headers=world.headers("bob")).status_code == 403
    refused = api.post(path, json=body, headers=world.headers("scauth"))
    assert refused.status_code == 403 and refused.json()["field"] == "provider_region_code"
    saved = api.post(path, json=body, headers=world.headers("cqauth"))
    assert saved.status_code == 200 and saved.json()["value"] == 1200
    too_much = api.post(path, json={**body, "kind": "priority_window", "value": 400},
                        headers=world.headers("cqauth"))
    assert too_much.status_code == 422 and too_much.json()["field"] == "value"
    bad_kind = api.post(path, json={**body, "kind": "free_lunch"}, headers=world.headers("cqauth"))
    assert bad_kind.status_code == 422 and bad_kind.json()["field"] == "kind"
    entitlement_id = saved.json()["id"]
    assert api.delete(f"{path}/{entitlement_id}", headers=world.headers("scauth")).status_code == 404
    assert api.delete(f"{path}/{entitlement_id}", headers=world.headers("cqauth")).status_code == 204
    schemes = {s["code"]: s for s in api.get("/api/v1/billing/talent-schemes").json()["items"]}
    assert "fee_discount" not in {e["kind"] for e in schemes["tianfu"]["entitlements"]["CQ"]}
