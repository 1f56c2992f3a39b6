"""The waitlist: join only taken time, offers go to the first eligible waiter, run out and pass on."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from labcommons.booking import service, waitlist
from labcommons.booking.models import BookingPolicy, WaitlistEntry, WaitlistStatus
from labcommons.catalog.models import Instrument, OpenTo
from labcommons.db import utcnow
from labcommons.identity import roles
from labcommons.identity import service as identity
from tests.api_client import client_for
from tests.factories import World, next_grid_day

START = next_grid_day()
END = START + timedelta(hours=2)


@pytest.fixture
def offers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, dict[str, Any]]]:
    calls: list[tuple[str, int, dict[str, Any]]] = []
    monkeypatch.setattr(waitlist, "notify", lambda s, event, b, **data: calls.append((event, b.id, data)))
    return calls


def taken_by_bob(world: World) -> int:
    with world.db.unit_of_work() as s:
        return service.reserve_slot(s, world.actors["bob"], world.instruments["CONF"], START, END).id


def join(world: World, who: str, now: datetime | None = None) -> int:
    with world.db.unit_of_work() as s:
        return waitlist.join(s, world.actors[who], world.instruments["CONF"], START, END, now=now).id


def entry(world: World, entry_id: int) -> WaitlistEntry:
    with world.db.unit_of_work(write=False) as s:
        row = s.get(WaitlistEntry, entry_id)
        assert row is not None
        return row


def test_join_only_taken_time(world: World) -> None:
    with world.db.unit_of_work() as s, pytest.raises(waitlist.SlotIsFree):
        waitlist.join(s, world.actors["alice"], world.instruments["CONF"], START, END)
    taken_by_bob(world)
    first = join(world, "alice")
    assert entry(world, first).status == WaitlistStatus.waiting
    with world.db.unit_of_work() as s, pytest.raises(waitlist.AlreadyWaiting):
        waitlist.join(s, world.actors["alice"], world.instruments["CONF"], START, END)


def test_cancellation_offers_the_first_eligible_waiter(world: World, offers: list[Any]) -> None:
    bobs = taken_by_bob(world)
    carols, alices = join(world, "carol"), join(world, "alice")
    # Carol waited first but may no longer book: the instrument became institution-only (alice's institution).
    with world.db.unit_of_work() as s:
        s.get_one(Instrument, world.instruments["CONF"]).open_to = OpenTo.institution
    now = utcnow()
    with world.db.unit_of_work() as s:
        service.cancel_booking(s, world.actors["bob"], bobs, now=now)
    assert entry(world, carols).status == WaitlistStatus.waiting
    offered = entry(world, alices)
    assert offered.status == WaitlistStatus.offered
    assert offered.offer_expires_at == now + timedelta(minutes=60)  # no policy row: the default
    assert offers == [("waitlist_offer", bobs, {"entry_id": alices, "user_id": world.actors["alice"].user_id})]
    with world.db.unit_of_work() as s:
        booking = waitlist.accept(s, world.actors["alice"], alices)
        assert (booking.starts_at, booking.ends_at, booking.user_id) == (START, END, world.actors["alice"].user_id)
    accepted = entry(world, alices)
    assert accepted.status == WaitlistStatus.accepted and accepted.booking_id == booking.id


def test_an_expired_offer_passes_to_the_next_waiter(world: World, offers: list[Any]) -> None:
    with world.db.unit_of_work() as s:
        s.add(BookingPolicy(instrument_id=world.instruments["CONF"], waitlist_offer_minutes=15))
    bobs = taken_by_bob(world)
    alices, carols = join(world, "alice"), join(world, "carol")
    now = utcnow()
    with world.db.unit_of_work() as s:
        service.cancel_booking(s, world.actors["bob"], bobs, now=now)
    assert entry(world, alices).offer_expires_at == now + timedelta(minutes=15)
    assert entry(world, carols).status == WaitlistStatus.waiting
    with world.db.unit_of_work() as s:
        assert waitlist.expire_offers(s, now + timedelta(minutes=10)) == 0
        assert waitlist.expire_offers(s, now + timedelta(minutes=16)) == 1
    assert entry(world, alices).status == WaitlistStatus.expired
    assert entry(world, carols).status == WaitlistStatus.offered
    assert [o[2]["entry_id"] for o in offers] == [alices, carols]
    with world.db.unit_of_work() as s, pytest.raises(waitlist.OfferNotLive):
        waitlist.accept(s, world.actors["alice"], alices)


def test_accepting_after_someone_else_booked_is_refused_clearly(world: World, offers: list[Any]) -> None:
    bobs = taken_by_bob(world)
    alices = join(world, "alice")
    with world.db.unit_of_work() as s:
        service.cancel_booking(s, world.actors["bob"], bobs)
    assert entry(world, alices).status == WaitlistStatus.offered
    # The offer does not hold the time: carol books it first.
    with world.db.unit_of_work() as s:
        service.reserve_slot(s, world.actors["carol"], world.instruments["CONF"], START, END)
    with world.db.unit_of_work() as s, pytest.raises(waitlist.SlotTakenMeanwhile) as refused:
        waitlist.accept(s, world.actors["alice"], alices)
    assert "Someone else booked" in refused.value.message


def test_withdrawing_an_offer_passes_it_on(world: World, offers: list[Any]) -> None:
    bobs = taken_by_bob(world)
    alices, carols = join(world, "alice"), join(world, "carol")
    with world.db.unit_of_work() as s:
        service.cancel_booking(s, world.actors["bob"], bobs)
    with world.db.unit_of_work() as s:
        waitlist.withdraw(s, world.actors["alice"], alices)
    assert entry(world, alices).status == WaitlistStatus.withdrawn
    assert entry(world, carols).status == WaitlistStatus.offered


def test_waitlist_api(world: World) -> None:
    client = client_for(world.db)
    body = {"instrument_id": world.instruments["CONF"], "starts_at": START.isoformat(), "ends_at": END.isoformat()}
    free = client.post("/api/v1/waitlist", json=body, headers=world.headers("alice"))
    assert free.status_code == 409 and free.json()["error"] == "slot_is_free"
    bobs = taken_by_bob(world)
    joined = client.post("/api/v1/waitlist", json=body, headers=world.headers("alice"))
    assert joined.status_code == 201, joined.text
    entry_id = joined.json()["id"]
    early = client.post(f"/api/v1/waitlist/{entry_id}/accept", headers=world.headers("alice"))
    assert early.status_code == 409 and early.json()["error"] == "offer_not_live"
    assert client.post(f"/api/v1/bookings/{bobs}/cancel", headers=world.headers("bob")).status_code == 200
    listed = client.get("/api/v1/waitlist", headers=world.headers("alice")).json()["items"]
    assert [(e["id"], e["status"]) for e in listed] == [(entry_id, "offered")]
    assert client.post(f"/api/v1/waitlist/{entry_id}/accept", headers=world.headers("bob")).status_code == 404
    accepted = client.post(f"/api/v1/waitlist/{entry_id}/accept", headers=world.headers("alice"))
    assert accepted.status_code == 201, accepted.text
    assert client.delete(f"/api/v1/waitlist/{entry_id}", headers=world.headers("alice")).status_code == 409


def test_waitlist_pages(world: World, offers: list[Any]) -> None:
    from zoneinfo import ZoneInfo

    from fastapi.testclient import TestClient

    from labcommons.app import create_app
    from tests.web.conftest import csrf_of, sign_in

    bobs = taken_by_bob(world)
    local = START.astimezone(ZoneInfo("Asia/Shanghai"))
    conf = world.instruments["CONF"]
    with TestClient(create_app(db=world.db)) as client:
        sign_in(client, "alice")
        page = client.get(f"/instruments/{conf}")
        form = {"csrf_token": csrf_of(page.text), "date": f"{local:%Y-%m-%d}", "start": f"{local:%H:%M}",
                "duration": "120"}
        refused = client.post(f"/instruments/{conf}/book", data=form)
        assert refused.status_code == 409 and '<details class="waitlist-join" id="waitlist" open>' in refused.text
        joined = client.post(f"/instruments/{conf}/waitlist", data=form, follow_redirects=False)
        assert joined.status_code == 303 and joined.headers["location"] == "/waitlist"
        listing = client.get("/waitlist")
        assert "data-entry=" in listing.text and "/accept" not in listing.text
        with world.db.unit_of_work() as s:
            service.cancel_booking(s, world.actors["bob"], bobs)
        listing = client.get("/waitlist")
        entry_id = int(listing.text.split('data-entry="')[1].split('"')[0])
        assert f'action="/waitlist/{entry_id}/accept"' in listing.text
        accepted = client.post(f"/waitlist/{entry_id}/accept", data={"csrf_token": csrf_of(listing.text)},
                               follow_redirects=False)
        assert accepted.status_code == 303 and accepted.headers["location"] == "/bookings"
    assert entry(world, entry_id).status == WaitlistStatus.accepted


def test_a_live_offer_blocks_overlapping_waiters_beyond_the_freed_time(world: World, offers: list[Any]) -> None:
    conf, hour, half = world.instruments["CONF"], timedelta(hours=1), timedelta(minutes=30)
    with world.db.unit_of_work() as s:
        first = service.reserve_slot(s, world.actors["bob"], conf, START, START + hour).id
        second = service.reserve_slot(s, world.actors["bob"], conf, START + hour, START + 2 * hour).id
    with world.db.unit_of_work() as s:
        alices = waitlist.join(s, world.actors["alice"], conf, START, START + hour).id
        carols = waitlist.join(s, world.actors["carol"], conf, START + half, START + hour + half).id
    with world.db.unit_of_work() as s:
        service.cancel_booking(s, world.actors["bob"], first)
    assert entry(world, alices).status == WaitlistStatus.offered
    # Alice's live offer overlaps carol's interval, though not the time the second cancellation frees.
    with world.db.unit_of_work() as s:
        service.cancel_booking(s, world.actors["bob"], second)
    assert entry(world, carols).status == WaitlistStatus.waiting
    assert [o[2]["entry_id"] for o in offers] == [alices]


def test_facility_staff_waiting_keep_their_policy_exemptions(world: World, offers: list[Any]) -> None:
    with world.db.unit_of_work() as s:
        carols = service.reserve_slot(s, world.actors["carol"], world.instruments["CONF"], START, END).id
    # Training is now required; bob has none but is staff of the facility, who are exempt.
    with world.db.unit_of_work() as s:
        s.add(BookingPolicy(instrument_id=world.instruments["CONF"], requires_qualification=True))
        roles.grant_role(s, None, identity.find_user(s, "bob@example.org"), "facility_staff",
                         facility_id=world.facilities["CQ-LAB"])
    bobs = join(world, "bob")
    with world.db.unit_of_work() as s:
        service.cancel_booking(s, world.actors["carol"], carols)
    assert entry(world, bobs).status == WaitlistStatus.offered
