"""Maintenance blocks: nothing displaced without confirmation, displaced owners told, the block keeps users out."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from labcommons.actor import Actor
from labcommons.booking import maintenance, service
from labcommons.booking.models import Booking, BookingKind, BookingStatus
from labcommons.errors import Forbidden
from labcommons.identity import roles
from labcommons.identity import service as identity
from tests.api_client import client_for
from tests.factories import World, next_grid_day


def staff(world: World, name: str = "bob", role: str = "facility_staff") -> Actor:
    """`name` made staff of the CQ-LAB facility, as an Actor carrying the grant."""
    with world.db.unit_of_work() as s:
        user = identity.find_user(s, f"{name}@example.org")
        roles.grant_role(s, None, user, role, facility_id=world.facilities["CQ-LAB"])
        s.flush()
        return identity.actor_for(user, grants=roles.grants_of(s, user.id))


def book(world: World, who: str, key: str, start_hours: float, hours: float) -> int:
    start = next_grid_day() + timedelta(hours=start_hours)
    with world.db.unit_of_work() as s:
        b = service.reserve_slot(s, world.actors[who], world.instruments[key], start, start + timedelta(hours=hours))
        return b.id


def test_block_over_bookings_needs_confirmation_then_displaces_and_keeps_users_out(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int, dict[str, Any]]] = []
    monkeypatch.setattr(maintenance, "notify", lambda s, event, b, **data: calls.append((event, b.id, data)))
    bob = staff(world)
    alices = book(world, "alice", "CONF", 0, 2)
    carols = book(world, "carol", "CONF", 4, 1)
    start = next_grid_day() + timedelta(hours=1)
    with world.db.unit_of_work() as s, pytest.raises(maintenance.DisplacesBookings) as refused:
        maintenance.create_block(s, bob, world.instruments["CONF"], start, start + timedelta(hours=2), "laser swap")
    assert [b["booking_id"] for b in refused.value.details["bookings"]] == [alices]
    assert refused.value.details["bookings"][0]["user_email"] == "alice@example.org"
    with world.db.unit_of_work(write=False) as s:
        assert s.get(Booking, alices).status == BookingStatus.confirmed  # type: ignore[union-attr]
        assert not s.scalars(select(Booking).where(Booking.kind == BookingKind.maintenance)).all()
        assert [b.id for b in maintenance.preview_block(s, bob, world.instruments["CONF"], start,
                                                         start + timedelta(hours=2))] == [alices]
    assert calls == []

    with world.db.unit_of_work() as s:
        block, displaced = maintenance.create_block(
            s, bob, world.instruments["CONF"], start, start + timedelta(hours=2), "laser swap", True
        )
        block_id = block.id
    assert [b.id for b in displaced] == [alices]
    assert calls == [("maintenance", alices, {"reason": "laser swap"})]
    with world.db.unit_of_work(write=False) as s:
        cancelled = s.get(Booking, alices)
        assert cancelled is not None and cancelled.status == BookingStatus.cancelled
        assert (cancelled.cancel_kind, cancelled.cancel_note, cancelled.cancelled_by_id) == (
            "maintenance", "laser swap", bob.user_id)
        assert s.get(Booking, carols).status == BookingStatus.confirmed  # type: ignore[union-attr]
        block_row = s.get(Booking, block_id)
        assert block_row is not None and block_row.user_id == bob.user_id and block_row.purpose == "laser swap"
    # The database's own constraint keeps users out of the block.
    with world.db.unit_of_work() as s, pytest.raises(service.OverlappingBooking):
        service.reserve_slot(s, world.actors["carol"], world.instruments["CONF"], start + timedelta(hours=1),
                             start + timedelta(hours=2))
    with world.db.unit_of_work() as s, pytest.raises(maintenance.OverlappingBlock):
        maintenance.create_block(s, bob, world.instruments["CONF"], start, start + timedelta(hours=1), "again", True)
    with world.db.unit_of_work() as s:
        maintenance.cancel_block(s, bob, world.instruments["CONF"], block_id)
    book(world, "carol", "CONF", 2, 1)  # free again once lifted


def test_plain_users_may_not_block(world: World) -> None:
    start = next_grid_day()
    with world.db.unit_of_work() as s, pytest.raises(Forbidden):
        maintenance.create_block(s, world.actors["alice"], world.instruments["CONF"], start,
                                 start + timedelta(hours=1), "mine now", True)
    with world.db.unit_of_work() as s, pytest.raises(Forbidden):
        maintenance.preview_block(s, world.actors["alice"], world.instruments["CONF"], start,
                                  start + timedelta(hours=1))
    client = client_for(world.db)
    url = f"/api/v1/instruments/{world.instruments['CONF']}/maintenance"
    assert client.get(url, headers=world.headers("alice")).status_code == 403
    body = {"starts_at": start.isoformat(), "ends_at": (start + timedelta(hours=1)).isoformat(), "reason": "x"}
    assert client.post(url, json=body, headers=world.headers("alice")).status_code == 403


def test_api_lists_conflicts_until_confirmed(world: World) -> None:
    staff(world)
    alices = book(world, "alice", "CONF", 0, 1)
    client = client_for(world.db)
    url = f"/api/v1/instruments/{world.instruments['CONF']}/maintenance"
    start = next_grid_day()
    body = {"starts_at": start.isoformat(), "ends_at": (start + timedelta(hours=3)).isoformat(),
            "reason": "annual service"}
    refused = client.post(url, json=body, headers=world.headers("bob"))
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == "displaces_bookings"
    assert [b["booking_id"] for b in refused.json()["bookings"]] == [alices]
    made = client.post(url, json={**body, "confirm": True}, headers=world.headers("bob"))
    assert made.status_code == 201, made.text
    assert [d["booking_id"] for d in made.json()["displaced"]] == [alices]
    listed = client.get(url, headers=world.headers("bob")).json()["items"]
    assert [b["reason"] for b in listed] == ["annual service"]
    gone = client.delete(f"{url}/{listed[0]['id']}", headers=world.headers("bob"))
    assert gone.status_code == 200 and gone.json()["status"] == "cancelled"
    assert client.get(url, headers=world.headers("bob")).json()["items"] == []
    assert client.delete(f"{url}/{listed[0]['id']}", headers=world.headers("bob")).status_code == 404


def test_maintenance_page_asks_before_displacing(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from zoneinfo import ZoneInfo

    from fastapi.testclient import TestClient

    from labcommons.app import create_app
    from tests.web.conftest import csrf_of, sign_in

    staff(world)
    alices = book(world, "alice", "CONF", 0, 1)
    local = next_grid_day().astimezone(ZoneInfo("Asia/Shanghai"))
    conf = world.instruments["CONF"]
    with TestClient(create_app(db=world.db)) as client:
        sign_in(client, "alice")
        assert client.get(f"/manage/instruments/{conf}/maintenance").status_code == 403
        assert 'href="/manage/instruments' not in client.get(f"/instruments/{conf}").text
        client.post("/logout", data={"csrf_token": csrf_of(client.get("/").text)})
        sign_in(client, "bob")
        assert f'href="/manage/instruments/{conf}/maintenance"' in client.get(f"/instruments/{conf}?lang=en").text
        page = client.get(f"/manage/instruments/{conf}/maintenance")
        assert page.status_code == 200
        form = {"csrf_token": csrf_of(page.text), "start": f"{local:%Y-%m-%dT%H:%M}",
                "end": f"{local + timedelta(hours=2):%Y-%m-%dT%H:%M}", "reason": "vacuum pump"}
        asked = client.post(f"/manage/instruments/{conf}/maintenance", data=form)
        assert asked.status_code == 409
        assert f'data-booking="{alices}"' in asked.text and 'name="confirm" value="yes"' in asked.text
        done = client.post(f"/manage/instruments/{conf}/maintenance", data={**form, "confirm": "yes"},
                           follow_redirects=False)
        assert done.status_code == 303
        listed = client.get(done.headers["location"])
        assert "vacuum pump" in listed.text and "data-block=" in listed.text
    with world.db.unit_of_work(write=False) as s:
        assert s.get(Booking, alices).status == BookingStatus.cancelled  # type: ignore[union-attr]
