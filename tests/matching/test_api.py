"""The matching REST API under /api/v1: matching, demands, offers, subscriptions, the inbox, experts, status."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from labcommons.actor import Actor, Grant
from labcommons.catalog.models import Facility
from labcommons.db import Database
from labcommons.identity import service as identity
from labcommons.identity.models import User
from labcommons.matching import demands
from labcommons.matching.models import Demand
from labcommons.orders.service import facility_today
from tests.api_client import client_for
from tests.factories import World
from tests.matching.h1_support import MS_DEMAND, SEQ_DEMAND, MatchWorld, build_match_world


@pytest.fixture
def mw(world: World) -> MatchWorld:
    return build_match_world(world)


@pytest.fixture
def client(mw: MatchWorld) -> TestClient:
    return client_for(mw.db)


def demands_saved(db: Database) -> int:
    with db.unit_of_work(write=False) as s:
        return int(s.scalar(select(func.count()).select_from(Demand)) or 0)


def token_with(mw: MatchWorld, user: str, scopes: list[str]) -> dict[str, str]:
    with mw.db.unit_of_work() as s:
        token = identity.create_api_token(s, identity.find_user(s, f"{user}@example.org"), name="narrow",
                                          scopes=scopes)
    return {"Authorization": f"Bearer {token}"}


# --- matching ---------------------------------------------------------------------------------------------------


def test_match_works_anonymously_and_saves_nothing(client: TestClient, mw: MatchWorld) -> None:
    r = client.post("/api/v1/demands/match", json={"text": SEQ_DEMAND, "region": "CQ", "limit": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] in ("hybrid", "keyword") and body["index_size"] >= 9
    assert body["took_ms"] >= 0 and isinstance(body["corrections"], dict)
    results = body["results"]
    assert 1 <= len(results) <= 5
    top = results[0]
    assert top["type"] in ("service", "instrument") and top["facility_id"] == mw.world.facilities["CQ-LAB"]
    assert set(top) >= {"type", "id", "code", "name", "score", "category", "region", "explanation", "provider"}
    assert top["explanation"]["matched_terms"] and top["region"] == "CQ"
    assert demands_saved(mw.db) == 0

    experts_only = client.post("/api/v1/demands/match", json={"text": "spatial transcriptomics study design",
                                                              "types": ["expert"]}).json()["results"]
    assert [r["code"] for r in experts_only] == ["EXP-LUO"]
    assert experts_only[0]["explanation"]["languages"] == ["zh", "en"]


def test_match_shows_institution_only_instruments_to_insiders(client: TestClient, mw: MatchWorld) -> None:
    body = {"text": "flow cytometer 流式细胞仪", "types": ["instrument"]}
    anonymous = client.post("/api/v1/demands/match", json=body).json()["results"]
    insider = client.post("/api/v1/demands/match", json=body, headers=mw.headers("alice")).json()["results"]
    outsider = client.post("/api/v1/demands/match", json=body, headers=mw.headers("bob")).json()["results"]
    assert "CQ-LOCAL" not in [r["code"] for r in anonymous + outsider]
    assert "CQ-LOCAL" in [r["code"] for r in insider]
    narrow = client.post("/api/v1/demands/match", json=body, headers=token_with(mw, "alice", ["catalog:read"]))
    assert narrow.status_code == 200 and "CQ-LOCAL" not in [r["code"] for r in narrow.json()["results"]]
    bad = client.post("/api/v1/demands/match", json=body, headers={"Authorization": "Bearer nonsense"})
    assert bad.status_code == 401


@pytest.mark.parametrize(("body", "field"), [
    ({}, "text"),
    ({"text": ""}, "text"),
    ({"text": "   "}, "text"),
    ({"text": 123}, "text"),
    ({"text": ["cryo-EM"]}, "text"),
    ({"text": "x" * 2001}, "text"),
    ({"text": "sequencing", "region": "XX"}, "region"),
    ({"text": "sequencing", "region": 5}, "region"),
    ({"text": "sequencing", "limit": 0}, "limit"),
    ({"text": "sequencing", "limit": 51}, "limit"),
    ({"text": "sequencing", "limit": "5"}, "limit"),
    ({"text": "sequencing", "limit": 2.5}, "limit"),
    ({"text": "sequencing", "limit": True}, "limit"),
    ({"text": "sequencing", "types": ["robot"]}, "types.0"),
    ({"text": "sequencing", "types": "expert"}, "types"),
    ({"text": "sequencing", "colour": "red"}, "colour"),
])
def test_match_validation(db: Database, body: dict[str, Any], field: str) -> None:
    r = client_for(db).post("/api/v1/demands/match", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field


def test_match_refuses_bad_json_and_nul(db: Database) -> None:
    client = client_for(db)
    r = client.post("/api/v1/demands/match", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_json"
    r = client.post("/api/v1/demands/match", json=["text"])
    assert r.status_code == 422
    r = client.post("/api/v1/demands/match", json={"text": "seq\x00uencing"})
    assert r.status_code == 422 and r.json()["field"] == "text"


def test_status(client: TestClient, mw: MatchWorld) -> None:
    client.post("/api/v1/demands/match", json={"text": "sequencing"})
    body = client.get("/api/v1/matching/status").json()
    assert set(body) == {"documents", "dirty", "mode", "model", "notice"}
    assert body["documents"] >= 9 and body["mode"] in ("hybrid", "keyword")
    assert (body["model"] is None) == (body["mode"] == "keyword") == (body["notice"] is not None)


# --- demands ----------------------------------------------------------------------------------------------------


def test_post_demand_is_idempotent(client: TestClient, mw: MatchWorld) -> None:
    deadline = (facility_today() + timedelta(days=10)).isoformat()
    body = {"text": SEQ_DEMAND, "budget_fen": 500_000, "deadline": deadline, "region": "CQ",
            "sample_type": "mouse brain", "limit": 4}
    headers = mw.headers("bob", **{"Idempotency-Key": "demand-1"})
    first = client.post("/api/v1/demands", json=body, headers=headers)
    assert first.status_code == 201, first.text
    saved = first.json()
    assert saved["mine"] and saved["status"] == "open" and saved["budget_fen"] == 500_000
    assert saved["deadline"] == deadline and saved["region"] == "CQ" and saved["sample_type"] == "mouse brain"
    assert 1 <= len(saved["matches"]) <= 4 and saved["matches"][0]["rank"] == 1
    assert saved["matches"][0]["explanation"]["matched_terms"] and saved["offers"] == []
    again = client.post("/api/v1/demands", json=body, headers=headers)
    assert again.status_code == 201 and again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == saved
    assert demands_saved(mw.db) == 1
    reused = client.post("/api/v1/demands", json={**body, "text": MS_DEMAND}, headers=headers)
    assert reused.status_code == 422 and reused.json()["error"] == "idempotency_key_reused"

    listed = client.get("/api/v1/demands", headers=mw.headers("bob")).json()["items"]
    assert [d["id"] for d in listed] == [saved["id"]] and listed[0]["match_count"] == len(saved["matches"])
    assert client.get("/api/v1/demands", headers=mw.headers("dave")).json()["items"] == []
    got = client.get(f"/api/v1/demands/{saved['id']}", headers=mw.headers("bob"))
    assert got.status_code == 200 and got.json()["matches"] == saved["matches"]


@pytest.mark.parametrize(("changes", "field"), [
    ({"budget_fen": -1}, "budget_fen"),
    ({"budget_fen": 1.5}, "budget_fen"),
    ({"budget_fen": True}, "budget_fen"),
    ({"budget_fen": 10_000_000_001}, "budget_fen"),
    ({"budget_fen": 10**30}, "budget_fen"),
    ({"deadline": "2020-01-01"}, "deadline"),
    ({"deadline": "tomorrow"}, "deadline"),
    ({"region": "XX"}, "region"),
    ({"sample_type": "s" * 201}, "sample_type"),
    ({"share_with_providers": "yes"}, "share_with_providers"),
    ({"limit": 51}, "limit"),
    ({"text": "x" * 100_000}, "text"),
    ({"text": "NUL\x00"}, "text"),
])
def test_post_demand_validation(world: World, changes: dict[str, Any], field: str) -> None:
    r = client_for(world.db).post("/api/v1/demands", json={"text": SEQ_DEMAND, **changes},
                                  headers=world.headers("bob"))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field
    assert demands_saved(world.db) == 0


def test_demand_access(client: TestClient, mw: MatchWorld) -> None:
    assert client.post("/api/v1/demands", json={"text": SEQ_DEMAND}).status_code == 401
    assert client.get("/api/v1/demands").status_code == 401
    narrow = token_with(mw, "bob", ["demands:read"])
    refused = client.post("/api/v1/demands", json={"text": SEQ_DEMAND}, headers=narrow)
    assert refused.status_code == 403 and refused.json()["error"] == "insufficient_scope"
    demand_id = client.post("/api/v1/demands", json={"text": SEQ_DEMAND},
                            headers=mw.headers("bob")).json()["id"]
    assert client.get(f"/api/v1/demands/{demand_id}", headers=narrow).status_code == 200
    staff_view = client.get(f"/api/v1/demands/{demand_id}", headers=mw.headers("alice")).json()
    assert not staff_view["mine"] and staff_view["facility_ids"] == [mw.world.facilities["CQ-LAB"]]
    for user in ("carol", "dave"):
        r = client.get(f"/api/v1/demands/{demand_id}", headers=mw.headers(user))
        assert r.status_code == 404 and r.json()["field"] == "demand_id"
    assert client.get("/api/v1/demands/99999", headers=mw.headers("bob")).status_code == 404
    assert client.get(f"/api/v1/demands/{2**40}", headers=mw.headers("bob")).status_code == 422
    assert client.post(f"/api/v1/demands/{demand_id}/close", headers=mw.headers("dave")).status_code == 404
    assert client.post(f"/api/v1/demands/{demand_id}/close", headers=mw.headers("alice")).status_code == 403
    closed = client.post(f"/api/v1/demands/{demand_id}/close", headers=mw.headers("bob"))
    assert closed.status_code == 200 and closed.json()["status"] == "closed"
    again = client.post(f"/api/v1/demands/{demand_id}/close", headers=mw.headers("bob"))
    assert again.status_code == 409 and again.json()["error"] == "demand_not_open"


# --- providers --------------------------------------------------------------------------------------------------


def test_subscription_inbox_offer_accept(client: TestClient, mw: MatchWorld) -> None:
    cq, sc = mw.world.facilities["CQ-LAB"], mw.world.facilities["SC-UNI"]
    alice, bob, carol = mw.headers("alice"), mw.headers("bob"), mw.headers("carol")
    # Subscriptions: read, change, permissions, validation.
    assert client.get(f"/api/v1/facilities/{sc}/demand-subscription", headers=carol).json() == {
        "facility_id": sc, "subscribed": False, "active": False, "min_score": 0.3, "notify_email": True,
        "updated_at": None}
    put = client.put(f"/api/v1/facilities/{cq}/demand-subscription", headers=alice,
                     json={"active": True, "min_score": 0.5, "notify_email": False})
    assert put.status_code == 200 and put.json()["min_score"] == 0.5 and put.json()["subscribed"]
    assert client.put(f"/api/v1/facilities/{cq}/demand-subscription", headers=carol, json={}).status_code == 403
    assert client.get(f"/api/v1/facilities/{cq}/demand-inbox", headers=mw.headers("dave")).status_code == 403
    assert client.get("/api/v1/facilities/99999/demand-inbox", headers=alice).status_code == 404
    for bad in ({"min_score": 2}, {"min_score": "0.5"}, {"active": "yes"}, {"extra": 1}):
        r = client.put(f"/api/v1/facilities/{cq}/demand-subscription", headers=alice, json=bad)
        assert r.status_code == 422 and r.json()["field"] == next(iter(bad)), r.text

    # A demand reaches the inbox; the facility answers it.
    demand_id = client.post("/api/v1/demands", json={"text": SEQ_DEMAND}, headers=bob).json()["id"]
    client.post("/api/v1/demands", json={"text": MS_DEMAND}, headers=bob)  # weak at CQ-LAB: not in its inbox
    inbox = client.get(f"/api/v1/facilities/{cq}/demand-inbox", headers=alice).json()
    assert inbox["subscribed"] and inbox["min_score"] == 0.5
    assert [i["demand"]["id"] for i in inbox["items"]] == [demand_id]
    assert inbox["items"][0]["best_score"] >= 0.5 and not inbox["items"][0]["offered"]
    assert client.get(f"/api/v1/facilities/{sc}/demand-inbox", headers=carol).json()["subscribed"] is False

    offer_body = {"facility_id": cq, "service_id": mw.services["SEQ"], "message": "Next week, 10x v3.",
                  "price_fen": 250_000, "available_from": facility_today().isoformat()}
    bad_offers: list[tuple[dict[str, Any], int, str | None]] = [
        ({"service_id": mw.services["MS"]}, 422, "service_id"),
        ({"message": ""}, 422, "message"),
        ({"price_fen": -1}, 422, "price_fen"),
        ({"expert_id": 0}, 422, "expert_id"),
        ({"facility_id": sc}, 403, None),
    ]
    for changes, status, field in bad_offers:
        r = client.post(f"/api/v1/demands/{demand_id}/offers", headers=alice, json={**offer_body, **changes})
        assert r.status_code == status, (changes, r.text)
        if field:
            assert r.json()["field"] == field
    made = client.post(f"/api/v1/demands/{demand_id}/offers", headers=alice, json=offer_body)
    assert made.status_code == 201, made.text
    offer = made.json()
    assert offer["status"] == "open" and offer["service_name"]["en"] == "Single-cell RNA sequencing service"
    duplicate = client.post(f"/api/v1/demands/{demand_id}/offers", headers=alice, json=offer_body)
    assert duplicate.status_code == 409 and duplicate.json()["error"] == "offer_exists"
    assert client.post(f"/api/v1/demands/{demand_id}/offers", headers=bob, json=offer_body).status_code == 403
    assert client.get(f"/api/v1/facilities/{cq}/demand-inbox", headers=alice).json()["items"][0]["offered"]

    # The author sees the offer and accepts it: an order of the offered service, submitted to the provider.
    seen = client.get(f"/api/v1/demands/{demand_id}", headers=bob).json()
    assert [o["id"] for o in seen["offers"]] == [offer["id"]]
    assert client.post(f"/api/v1/offers/{offer['id']}/accept", headers=alice).status_code == 403
    assert client.post(f"/api/v1/offers/{offer['id']}/accept", headers=mw.headers("dave")).status_code == 404
    accepted = client.post(f"/api/v1/offers/{offer['id']}/accept", headers=bob, json={})
    assert accepted.status_code == 200, accepted.text
    result = accepted.json()
    assert result["offer"]["status"] == "accepted" and result["offer"]["order_id"] == result["order"]["id"]
    # Quoted at the offer's price, for the author to accept as any quote.
    assert result["order"]["status"] == "quoted" and result["order"]["number"].startswith("SO-")
    quotes = client.get(f"/api/v1/orders/{result['order']['id']}/quotes", headers=bob).json()
    assert [q["total_fen"] for q in quotes["items"] if q["status"] == "offered"] == [250_000]
    order = client.get(f"/api/v1/orders/{result['order']['id']}", headers=bob).json()
    # The provider's staff see it in their queue straight away.
    assert client.get(f"/api/v1/orders/{result['order']['id']}", headers=alice).status_code == 200
    assert order["service_id"] == mw.services["SEQ"] and order["description"].endswith("Next week, 10x v3.")
    assert client.get(f"/api/v1/demands/{demand_id}", headers=bob).json()["status"] == "fulfilled"
    twice = client.post(f"/api/v1/offers/{offer['id']}/accept", headers=bob)
    assert twice.status_code == 409 and twice.json()["error"] == "offer_not_open"
    assert client.post(f"/api/v1/offers/{offer['id']}/withdraw", headers=alice).status_code == 409


def test_withdraw_and_decline(client: TestClient, mw: MatchWorld) -> None:
    cq = mw.world.facilities["CQ-LAB"]
    demand_id = client.post("/api/v1/demands", json={"text": SEQ_DEMAND}, headers=mw.headers("bob")).json()["id"]
    body = {"facility_id": cq, "service_id": mw.services["SEQ"], "message": "We can."}
    first = client.post(f"/api/v1/demands/{demand_id}/offers", headers=mw.headers("alice"), json=body).json()
    assert client.post(f"/api/v1/offers/{first['id']}/withdraw", headers=mw.headers("carol")).status_code == 404
    assert client.post(f"/api/v1/offers/{first['id']}/withdraw", headers=mw.headers("bob")).status_code == 403
    withdrawn = client.post(f"/api/v1/offers/{first['id']}/withdraw", headers=mw.headers("alice"))
    assert withdrawn.status_code == 200 and withdrawn.json()["status"] == "withdrawn"
    second = client.post(f"/api/v1/demands/{demand_id}/offers", headers=mw.headers("alice"), json=body).json()
    assert client.post(f"/api/v1/offers/{second['id']}/decline", headers=mw.headers("alice")).status_code == 403
    declined = client.post(f"/api/v1/offers/{second['id']}/decline", headers=mw.headers("bob"))
    assert declined.status_code == 200 and declined.json()["status"] == "declined"
    assert client.post("/api/v1/offers/99999/decline", headers=mw.headers("bob")).status_code == 404


# --- experts ----------------------------------------------------------------------------------------------------


def test_expert_api(client: TestClient, mw: MatchWorld) -> None:
    listed = client.get("/api/v1/experts").json()
    assert listed["total"] == 1 and listed["items"][0]["code"] == "EXP-LUO"
    luo = listed["items"][0]
    assert luo["name"] == {"zh": "罗晓岚", "en": "Luo Xiaolan"} and luo["facility_name"]["en"] == "CQ-LAB Core"
    assert client.get("/api/v1/experts", params={"field": "GEN", "region": "CQ", "available": "true",
                                                 "q": "spatial"}).json()["total"] == 1
    assert client.get("/api/v1/experts", params={"region": "SC"}).json()["items"] == []
    for params, field in (({"limit": 0}, "limit"), ({"region": "XX"}, "region"), ({"offset": -1}, "offset")):
        r = client.get("/api/v1/experts", params=params)
        assert r.status_code == 422 and r.json()["field"] == field
    assert client.get(f"/api/v1/experts/{luo['id']}").json()["code"] == "EXP-LUO"
    assert client.get("/api/v1/experts/99999").status_code == 404

    body = {"facility_id": mw.world.facilities["CQ-LAB"], "code": "EXP-DAVE", "name_zh": "戴夫",
            "name_en": "Dave", "fields": ["MIC.CONF"], "skills_en": ["confocal imaging"], "languages": ["en"],
            "availability": "limited", "user_id": mw.world.actors["dave"].user_id}
    assert client.post("/api/v1/experts", json=body, headers=mw.headers("carol")).status_code == 403
    assert client.post("/api/v1/experts", json=body, headers=mw.headers("dave")).status_code == 403
    for changes, field in (({"fields": ["NOPE"]}, "fields"), ({"availability": "never"}, "availability"),
                           ({"code": ""}, "code"), ({"skills_en": "imaging"}, "skills_en"),
                           ({"consultation_service_id": mw.services["SEQ"]}, "consultation_service_id")):
        r = client.post("/api/v1/experts", json={**body, **changes}, headers=mw.headers("alice"))
        assert r.status_code == 422 and r.json()["field"] == field, (changes, r.text)
    created = client.post("/api/v1/experts", json=body, headers=mw.headers("alice", **{"Idempotency-Key": "e1"}))
    assert created.status_code == 201, created.text
    expert = created.json()
    assert expert["region"] == "CQ" and expert["availability"] == "limited" and expert["is_active"]
    taken = client.post("/api/v1/experts", json=body, headers=mw.headers("alice"))
    assert taken.status_code == 409 and taken.json()["field"] == "code"

    # Dave edits his own profile, but not what only managers may change.
    patched = client.patch(f"/api/v1/experts/{expert['id']}", json={"title_en": "Imaging scientist",
                                                                     "availability": "available"},
                           headers=mw.headers("dave"))
    assert patched.status_code == 200 and patched.json()["title"]["en"] == "Imaging scientist"
    refused = client.patch(f"/api/v1/experts/{expert['id']}", json={"is_active": False}, headers=mw.headers("dave"))
    assert refused.status_code == 403 and refused.json()["field"] == "is_active"
    assert client.patch(f"/api/v1/experts/{expert['id']}", json={"title_en": "x"},
                        headers=mw.headers("carol")).status_code == 403
    assert client.patch(f"/api/v1/experts/{expert['id']}", json={"title_en": "x"}).status_code == 401
    for bad, field in (({"hobby": "chess"}, "hobby"), ({"availability": None}, "availability"),
                       ({"name_en": ""}, "name_en"), ({"languages": [1]}, "languages.0")):
        r = client.patch(f"/api/v1/experts/{expert['id']}", json=bad, headers=mw.headers("alice"))
        assert r.status_code == 422 and r.json()["field"] == field, (bad, r.text)
    off = client.patch(f"/api/v1/experts/{expert['id']}", json={"is_active": False}, headers=mw.headers("alice"))
    assert off.status_code == 200 and not off.json()["is_active"]
    assert client.get(f"/api/v1/experts/{expert['id']}").status_code == 404


# --- the demo catalogue -----------------------------------------------------------------------------------------


def test_demo_catalogue_answers_in_both_languages(db: Database) -> None:
    from labcommons.catalog import demo
    from labcommons.matching.demo import seed_experts, seed_subscriptions

    with db.unit_of_work() as s:
        demo.seed_demo(s, bookings=0)
        seed_experts(s)
        seed_subscriptions(s)
    client = client_for(db)
    for text, category in (("想做小鼠脑组织的空间转录组，需要亚细胞分辨率", "GEN.SPATIAL"),
                           ("spatial transcriptomics of mouse brain sections at subcellular resolution",
                            "GEN.SPATIAL"),
                           ("need whole genome sequencing for 50 human DNA samples", "GEN.SEQ"),
                           ("全基因组测序 50个人类DNA样本", "GEN.SEQ")):
        r = client.post("/api/v1/demands/match", json={"text": text})
        assert r.status_code == 200, r.text
        top = [res["category"] for res in r.json()["results"][:5]]
        assert any(c and c.startswith(category) for c in top), (text, top)
    # A saved Chinese demand reaches the demo's subscribed spatial-omics centre.
    with db.unit_of_work() as s:
        user = s.scalars(select(User).where(User.is_active.is_(True)).order_by(User.id).limit(1)).one()
        author = identity.actor_for(user)
        facility = s.scalars(select(Facility).where(Facility.code == "CQ-LAKE-STO")).one()
        demand = demands.post_demand(s, author, text="想做小鼠脑组织的空间转录组，需要亚细胞分辨率")
        demand_id, facility_id = demand.id, facility.id
    admin = Actor(user_id=0, email="root@example.org", name="Root", institution_id=None, region_code="CQ",
                  grants=(Grant(role="platform_admin"),))
    with db.unit_of_work(write=False) as s:
        box = demands.inbox(s, admin, facility_id)
    assert box.subscribed and demand_id in [e.demand.id for e in box.entries]
