"""Demands, subscriptions, the providers' inbox and offers through matching/demands.py, on both databases."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from labcommons.errors import Conflict, DomainError, Forbidden, InvalidInput, NotFound
from labcommons.matching import demands
from labcommons.matching.models import Demand, DemandMatch, DemandOffer, OfferStatus
from labcommons.notifications.models import Job
from labcommons.orders.models import OrderStatus, ServiceOrder
from labcommons.orders.service import facility_today
from tests.factories import World, grant
from tests.matching.h1_support import (
    MS_DEMAND,
    SEQ_DEMAND,
    MatchWorld,
    build_match_world,
    demand_status,
    facility_of_matches,
    offer,
    post,
    subscribe,
)
from tests.orders.order_support import at_once


@pytest.fixture
def mw(world: World) -> MatchWorld:
    return build_match_world(world)


def count(mw: MatchWorld, model: Any) -> int:
    with mw.db.unit_of_work(write=False) as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


# --- posting ----------------------------------------------------------------------------------------------------


def test_a_saved_demand_keeps_its_matches_and_details(mw: MatchWorld) -> None:
    deadline = facility_today() + timedelta(days=30)
    demand_id = post(mw, "  " + SEQ_DEMAND + "  ", budget_fen=1_500_000, deadline=deadline, region="CQ",
                     sample_type="冷冻组织", limit=5)
    with mw.db.unit_of_work(write=False) as s:
        demand = s.get(Demand, demand_id)
        assert demand is not None
        assert (demand.text, demand.budget_fen, demand.deadline, demand.region_code, demand.sample_type) == (
            SEQ_DEMAND, 1_500_000, deadline, "CQ", "冷冻组织")
        assert demand.status == "open" and demand.share_with_providers and demand.mode in ("hybrid", "keyword")
        rows = s.scalars(select(DemandMatch).where(DemandMatch.demand_id == demand_id)
                         .order_by(DemandMatch.rank)).all()
    assert 1 <= len(rows) <= 5
    assert [r.rank for r in rows] == list(range(1, len(rows) + 1))
    assert [r.score for r in rows] == sorted((r.score for r in rows), reverse=True)
    assert (rows[0].kind, rows[0].item_id) in {("service", mw.services["SEQ"]),
                                               ("instrument", mw.world.instruments["SEQ"])}
    assert rows[0].facility_id == mw.world.facilities["CQ-LAB"]
    assert rows[0].explanation["matched_terms"] and "keyword" in rows[0].explanation
    json.dumps([r.explanation for r in rows])  # plain JSON, no numpy numbers left

    with mw.db.unit_of_work(write=False) as s:
        view = demands.get_demand(s, mw.actor("bob"), demand_id)
    assert view.is_owner and len(view.matches) == len(rows)
    top = view.matches[0]
    assert top.name_en and top.facility_name_en == "CQ-LAB Core" and top.available
    assert top.explanation == rows[0].explanation


@pytest.mark.parametrize(("changes", "field"), [
    ({"text": ""}, "text"),
    ({"text": "x" * 2001}, "text"),
    ({"budget_fen": -1}, "budget_fen"),
    ({"budget_fen": 10_000_000_001}, "budget_fen"),
    ({"budget_fen": True}, "budget_fen"),
    ({"budget_fen": 10.5}, "budget_fen"),
    ({"deadline": "yesterday"}, "deadline"),
    ({"region": "XX"}, "region"),
    ({"sample_type": "s" * 201}, "sample_type"),
    ({"limit": 0}, "limit"),
    ({"limit": 51}, "limit"),
    ({"share_with_providers": "yes"}, "share_with_providers"),
])
def test_invalid_demands_name_the_field_and_save_nothing(mw: MatchWorld, changes: dict[str, Any],
                                                         field: str) -> None:
    if changes.get("deadline") == "yesterday":
        changes = {"deadline": facility_today() - timedelta(days=1)}
    values: dict[str, Any] = {"text": SEQ_DEMAND, **changes}
    with pytest.raises(InvalidInput) as caught, mw.db.unit_of_work() as s:
        demands.post_demand(s, mw.actor("bob"), **values)
    assert caught.value.field == field
    assert count(mw, Demand) == 0


def test_subscribed_facilities_staff_are_mailed_once_unless_below_their_minimum(mw: MatchWorld) -> None:
    with mw.db.unit_of_work() as s:
        demands.set_subscription(s, mw.actor("alice"), mw.world.facilities["CQ-LAB"], active=True, min_score=0.5,
                                 notify_email=True)
    grant(mw.world, "bob", "facility_staff", "CQ-LAB")  # the author is staff too: not told of their own demand
    post(mw, SEQ_DEMAND, user="bob")
    post(mw, MS_DEMAND, user="dave")  # matches CQ-LAB only weakly: below 0.5
    post(mw, SEQ_DEMAND, user="dave", share_with_providers=False)
    with mw.db.unit_of_work(write=False) as s:
        jobs = s.scalars(select(Job).where(Job.kind == "send_mail")).all()
    assert [json.loads(j.payload)["to"] for j in jobs] == ["alice@example.org"]
    payload = json.loads(jobs[0].payload)
    assert "CQ-LAB" in payload["subject"] and "/manage/demands/facilities/" in payload["text"]


# --- visibility -------------------------------------------------------------------------------------------------


def test_who_sees_a_demand(mw: MatchWorld) -> None:
    demand_id = post(mw)
    cq, sc = mw.world.facilities["CQ-LAB"], mw.world.facilities["SC-UNI"]
    with mw.db.unit_of_work(write=False) as s:
        owner = demands.get_demand(s, mw.actor("bob"), demand_id)
        staff = demands.get_demand(s, mw.actor("alice"), demand_id)
        for stranger in ("carol", "dave"):  # carol's SC-UNI does not subscribe; dave is nobody
            with pytest.raises(NotFound):
                demands.get_demand(s, mw.actor(stranger), demand_id)
        with pytest.raises(NotFound):
            demands.get_demand(s, mw.actor("bob"), demand_id + 1000)
    assert owner.is_owner and not staff.is_owner
    assert staff.facility_ids == [cq]
    assert staff.matches and {m.facility_id for m in staff.matches} == {cq}
    assert len(owner.matches) >= len(staff.matches)

    matched_sc = sc in {m.facility_id for m in owner.matches}
    subscribe(mw.world, "SC-UNI")
    with mw.db.unit_of_work(write=False) as s:
        if matched_sc:
            assert demands.get_demand(s, mw.actor("carol"), demand_id).facility_ids == [sc]
        else:
            with pytest.raises(NotFound):
                demands.get_demand(s, mw.actor("carol"), demand_id)

    private = post(mw, share_with_providers=False)
    with mw.db.unit_of_work(write=False) as s, pytest.raises(NotFound):
        demands.get_demand(s, mw.actor("alice"), private)


def test_list_shows_own_demands_newest_first_with_counts(mw: MatchWorld) -> None:
    first, second = post(mw), post(mw, MS_DEMAND)
    post(mw, user="dave")
    offer(mw, first)
    with mw.db.unit_of_work(write=False) as s:
        entries = demands.list_demands(s, mw.actor("bob"))
    assert [e.demand.id for e in entries] == [second, first]
    assert entries[1].open_offers == 1 and entries[0].open_offers == 0 and entries[1].match_count > 0


def test_close(mw: MatchWorld) -> None:
    demand_id = post(mw)
    offer_id = offer(mw, demand_id)
    for user, error in (("alice", Forbidden), ("dave", NotFound)):
        with pytest.raises(error), mw.db.unit_of_work() as s:
            demands.close_demand(s, mw.actor(user), demand_id)
    with mw.db.unit_of_work() as s:
        assert demands.close_demand(s, mw.actor("bob"), demand_id).status == "closed"
    with pytest.raises(Conflict) as caught, mw.db.unit_of_work() as s:
        demands.close_demand(s, mw.actor("bob"), demand_id)
    assert caught.value.code == "demand_not_open"
    with mw.db.unit_of_work(write=False) as s:
        closed_offer = s.get(DemandOffer, offer_id)
        assert closed_offer is not None and closed_offer.status == OfferStatus.declined
    with pytest.raises(Conflict), mw.db.unit_of_work() as s:
        demands.make_offer(s, mw.actor("alice"), demand_id, facility_id=mw.world.facilities["CQ-LAB"],
                           service_id=mw.services["SEQ"], message="Still interested?")


# --- subscriptions and the inbox --------------------------------------------------------------------------------


def test_subscription_set_get_and_permissions(mw: MatchWorld) -> None:
    sc, cq = mw.world.facilities["SC-UNI"], mw.world.facilities["CQ-LAB"]
    with mw.db.unit_of_work(write=False) as s:
        assert demands.get_subscription(s, mw.actor("carol"), sc) is None
    with mw.db.unit_of_work() as s:
        created = demands.set_subscription(s, mw.actor("carol"), sc, active=True, min_score=0.4, notify_email=False)
        assert (created.active, created.min_score, created.notify_email) == (True, 0.4, False)
    with mw.db.unit_of_work() as s:
        demands.set_subscription(s, mw.actor("carol"), sc, active=False, min_score=1, notify_email=True)
    with mw.db.unit_of_work(write=False) as s:
        got = demands.get_subscription(s, mw.actor("carol"), sc)
        assert got is not None and (got.active, got.min_score, got.notify_email) == (False, 1.0, True)
    for user, facility in (("dave", sc), ("carol", cq), ("bob", cq)):
        with pytest.raises(Forbidden), mw.db.unit_of_work() as s:
            demands.set_subscription(s, mw.actor(user), facility, active=True)
        with pytest.raises(Forbidden), mw.db.unit_of_work(write=False) as s:
            demands.get_subscription(s, mw.actor(user), facility)
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(InvalidInput) as caught, mw.db.unit_of_work() as s:
            demands.set_subscription(s, mw.actor("carol"), sc, min_score=bad)  # type: ignore[arg-type]
        assert caught.value.field == "min_score"
    with pytest.raises(NotFound), mw.db.unit_of_work() as s:
        demands.set_subscription(s, mw.actor("carol"), 9999)


def test_inbox(mw: MatchWorld) -> None:
    cq = mw.world.facilities["CQ-LAB"]
    with mw.db.unit_of_work() as s:
        demands.set_subscription(s, mw.actor("alice"), cq, min_score=0.5, notify_email=False)
    strong_old = post(mw, SEQ_DEMAND)
    weak = post(mw, MS_DEMAND)  # CQ-LAB's best match is weak
    private = post(mw, SEQ_DEMAND, share_with_providers=False)
    strong_new = post(mw, SEQ_DEMAND, user="dave")
    offer(mw, strong_old)
    with mw.db.unit_of_work() as s:
        demands.close_demand(s, mw.actor("dave"), strong_new)
    with mw.db.unit_of_work(write=False) as s:
        box = demands.inbox(s, mw.actor("alice"), cq)
        with_closed = demands.inbox(s, mw.actor("alice"), cq, include_closed=True)
    assert box.subscribed
    ids = [e.demand.id for e in box.entries]
    assert ids == [strong_old] and weak not in ids and private not in ids
    entry = box.entries[0]
    assert entry.best_score >= 0.5 and entry.offered and entry.offer is not None
    assert entry.matches and {m.facility_id for m in entry.matches} == {cq}
    assert entry.best_score == max(m.score for m in entry.matches)
    assert [e.demand.id for e in with_closed.entries] == [strong_new, strong_old]

    with mw.db.unit_of_work(write=False) as s:
        unsubscribed = demands.inbox(s, mw.actor("carol"), mw.world.facilities["SC-UNI"])
        with pytest.raises(Forbidden):
            demands.inbox(s, mw.actor("carol"), cq)
    assert not unsubscribed.subscribed and unsubscribed.entries == []
    with mw.db.unit_of_work() as s:
        demands.set_subscription(s, mw.actor("alice"), cq, active=False)
    with mw.db.unit_of_work(write=False) as s:
        paused = demands.inbox(s, mw.actor("alice"), cq)
    assert not paused.subscribed and paused.entries == []


# --- offers -----------------------------------------------------------------------------------------------------


def test_offer_rules(mw: MatchWorld) -> None:
    demand_id = post(mw)
    cq = mw.world.facilities["CQ-LAB"]

    def attempt(user: str = "alice", **changes: Any) -> DomainError:
        values: dict[str, Any] = {"facility_id": cq, "service_id": mw.services["SEQ"], "message": "We can do it.",
                                  **changes}
        with pytest.raises(DomainError) as caught, mw.db.unit_of_work() as s:
            demands.make_offer(s, mw.actor(user), values.pop("demand_id", demand_id), **values)
        return caught.value

    assert isinstance(attempt("carol"), Forbidden)  # staff of another facility
    assert isinstance(attempt("dave"), Forbidden)
    assert attempt(service_id=mw.services["MS"]).field == "service_id"  # another facility's service
    assert attempt(message="  ").field == "message"
    assert attempt(message="m" * 5001).field == "message"
    assert attempt(price_fen=-5).field == "price_fen"
    assert attempt(available_from=facility_today() - timedelta(days=1)).field == "available_from"
    assert attempt(expert_id=999).field == "expert_id"
    assert isinstance(attempt(demand_id=demand_id + 999), NotFound)
    grant(mw.world, "dave", "facility_staff", "CQ-UNI")  # CQ-UNI has no items: never matched
    assert isinstance(attempt("dave", facility_id=mw.world.facilities["CQ-UNI"]), NotFound)
    private = post(mw, share_with_providers=False)
    assert isinstance(attempt(demand_id=private), NotFound)

    offer_id = offer(mw, demand_id, price_fen=120_000, available_from=facility_today(),
                     expert_id=mw.experts["LUO"])
    duplicate = attempt()
    assert isinstance(duplicate, Conflict) and duplicate.code == "offer_exists"
    with mw.db.unit_of_work(write=False) as s:
        view = demands.get_demand(s, mw.actor("bob"), demand_id)
    assert [(o.offer.id, o.offer.price_fen, o.expert_name_en) for o in view.offers] == [
        (offer_id, 120_000, "Luo Xiaolan")]


def test_withdraw_then_offer_again(mw: MatchWorld) -> None:
    demand_id = post(mw)
    offer_id = offer(mw, demand_id)
    for user in ("bob", "carol"):  # the author and other facilities' staff cannot withdraw it
        with pytest.raises(NotFound), mw.db.unit_of_work() as s:
            demands.withdraw_offer(s, mw.actor(user), offer_id)
    with mw.db.unit_of_work() as s:
        assert demands.withdraw_offer(s, mw.actor("alice"), offer_id).status == OfferStatus.withdrawn
    with pytest.raises(Conflict), mw.db.unit_of_work() as s:
        demands.withdraw_offer(s, mw.actor("alice"), offer_id)
    second = offer(mw, demand_id, message="A better offer")
    with mw.db.unit_of_work(write=False) as s:
        box = demands.inbox(s, mw.actor("alice"), mw.world.facilities["CQ-LAB"])
    assert box.entries[0].offer is not None and box.entries[0].offer.id == second


def test_decline(mw: MatchWorld) -> None:
    demand_id = post(mw)
    offer_id = offer(mw, demand_id)
    with pytest.raises(Forbidden), mw.db.unit_of_work() as s:
        demands.decline_offer(s, mw.actor("alice"), offer_id)
    with pytest.raises(NotFound), mw.db.unit_of_work() as s:
        demands.decline_offer(s, mw.actor("dave"), offer_id)
    with mw.db.unit_of_work() as s:
        assert demands.decline_offer(s, mw.actor("bob"), offer_id).status == OfferStatus.declined
    with pytest.raises(Conflict), mw.db.unit_of_work() as s:
        demands.accept_offer(s, mw.actor("bob"), offer_id)
    assert demand_status(mw, demand_id) == "open"


def test_accepting_an_offer_makes_an_order_and_fulfils_the_demand(mw: MatchWorld) -> None:
    deadline = facility_today() + timedelta(days=20)
    text = "spatial transcriptomics consultation for embryo sections " * 3
    demand_id = post(mw, text, deadline=deadline)
    offer_id = offer(mw, demand_id, service="CONSULT", message="Dr Luo will advise.", expert_id=mw.experts["LUO"])
    with mw.db.unit_of_work() as s:
        order = demands.accept_offer(s, mw.actor("bob"), offer_id)
        order_id = order.id
    with mw.db.unit_of_work(write=False) as s:
        order = s.get(ServiceOrder, order_id)
        accepted = s.get(DemandOffer, offer_id)
        assert order is not None and accepted is not None
        assert order.status == OrderStatus.submitted and order.user_id == mw.world.actors["bob"].user_id
        assert order.service_id == mw.services["CONSULT"] and order.expert_id == mw.experts["LUO"]
        assert order.title == " ".join(text.split())[:80] and order.wanted_by == deadline
        assert order.description.endswith("\n\nDr Luo will advise.")
        assert accepted.status == OfferStatus.accepted and accepted.order_id == order_id
        assert accepted.decided_at is not None
    assert demand_status(mw, demand_id) == "fulfilled"
    with pytest.raises(Conflict), mw.db.unit_of_work() as s:
        demands.accept_offer(s, mw.actor("bob"), offer_id)
    for user, error in (("alice", Forbidden), ("dave", NotFound)):
        with pytest.raises(error), mw.db.unit_of_work() as s:
            demands.accept_offer(s, mw.actor(user), offer_id)
    assert count(mw, ServiceOrder) == 1


def test_accepting_one_offer_declines_the_others(mw: MatchWorld) -> None:
    subscribe(mw.world, "SC-UNI")
    demand_id = post(mw, "single-cell RNA sequencing and mass spectrometry proteomics of the same tissue")
    assert {mw.world.facilities["CQ-LAB"], mw.world.facilities["SC-UNI"]} <= facility_of_matches(mw, demand_id)
    first = offer(mw, demand_id)
    second = offer(mw, demand_id, user="carol", facility="SC-UNI", service="MS")
    with mw.db.unit_of_work() as s:
        demands.accept_offer(s, mw.actor("bob"), first)
    with mw.db.unit_of_work(write=False) as s:
        declined = s.get(DemandOffer, second)
        assert declined is not None and declined.status == OfferStatus.declined
        assert [e.open_offers for e in demands.list_demands(s, mw.actor("bob")) if e.demand.id == demand_id] == [0]
    with pytest.raises(Conflict) as caught, mw.db.unit_of_work() as s:
        demands.accept_offer(s, mw.actor("bob"), second)
    assert caught.value.code == "offer_not_open"
    assert count(mw, ServiceOrder) == 1


def _matches(mw: MatchWorld, demand_id: int) -> list[demands.MatchView]:
    with mw.db.unit_of_work(write=False) as s:
        return demands.get_demand(s, mw.actor("bob"), demand_id).matches


def test_concurrent_acceptances_make_one_order(mw: MatchWorld) -> None:
    if mw.db.is_sqlite:
        pytest.skip("SQLite serialises write transactions; the race needs PostgreSQL")
    bob = mw.actor("bob")
    for _round in range(5):
        demand_id = post(mw)
        offer_id = offer(mw, demand_id)

        def accept(offer_id: int = offer_id) -> int:
            with mw.db.unit_of_work() as s:
                return demands.accept_offer(s, bob, offer_id).id

        results = at_once(accept, accept)
        orders = [r for r in results if isinstance(r, int)]
        refused = [r for r in results if isinstance(r, Conflict)]
        assert len(orders) == 1 and len(refused) == 1, results
        with mw.db.unit_of_work(write=False) as s:
            made = s.scalars(select(ServiceOrder.id).where(ServiceOrder.user_id == bob.user_id)).all()
            accepted = s.get(DemandOffer, offer_id)
            assert accepted is not None and accepted.order_id == orders[0]
        assert orders[0] in made
    assert count(mw, ServiceOrder) == 5


def test_concurrent_offers_of_one_facility_leave_one_open(mw: MatchWorld) -> None:
    if mw.db.is_sqlite:
        pytest.skip("SQLite serialises write transactions; the race needs PostgreSQL")
    alice = mw.actor("alice")
    for _round in range(5):
        demand_id = post(mw)

        def make(demand_id: int = demand_id) -> int:
            with mw.db.unit_of_work() as s:
                return demands.make_offer(s, alice, demand_id, facility_id=mw.world.facilities["CQ-LAB"],
                                          service_id=mw.services["SEQ"], message="We can.").id

        results = at_once(make, make)
        assert sorted(type(r).__name__ for r in results) == ["Conflict", "int"], results
        with mw.db.unit_of_work(write=False) as s:
            assert s.scalar(select(func.count()).select_from(DemandOffer)
                            .where(DemandOffer.demand_id == demand_id)) == 1
