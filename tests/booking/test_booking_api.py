"""Booking through the REST API: rules, errors, idempotency, ownership, cancellation, pagination."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from labcommons.booking import approvals, service
from labcommons.booking.models import Booking, BookingStatus
from labcommons.db import Database
from labcommons.identity import roles
from labcommons.identity import service as identity
from tests.api_client import client_for
from tests.booking.test_usage import add_booking
from tests.factories import World, next_grid_day


def booking_count(db: Database) -> int:
    with db.unit_of_work(write=False) as s:
        return int(s.scalar(select(func.count()).select_from(Booking)) or 0)


def body(world: World, key: str = "CONF", start_hours: float = 0, hours: float = 1, **extra: Any) -> dict[str, Any]:
    start = next_grid_day() + timedelta(hours=start_hours)
    return {
        "instrument_id": world.instruments[key],
        "starts_at": start.isoformat(),
        "ends_at": (start + timedelta(hours=hours)).isoformat(),
        "purpose": "imaging organoids",
        **extra,
    }


def test_book_then_read_back(world: World) -> None:
    client = client_for(world.db)
    r = client.post("/api/v1/bookings", json=body(world), headers=world.headers("alice"))
    assert r.status_code == 201, r.text
    booking = r.json()
    assert booking["status"] == "confirmed"
    assert booking["instrument_name_en"] == "Confocal microscope"
    got = client.get(f"/api/v1/bookings/{booking['id']}", headers=world.headers("alice"))
    assert got.status_code == 200 and got.json()["starts_at"] == booking["starts_at"]
    mine = client.get("/api/v1/bookings", headers=world.headers("alice")).json()["items"]
    assert [b["id"] for b in mine] == [booking["id"]]


def test_overlap_is_409_and_back_to_back_is_allowed(world: World) -> None:
    client = client_for(world.db)
    first = client.post("/api/v1/bookings", json=body(world, hours=2), headers=world.headers("alice"))
    assert first.status_code == 201
    clash = client.post("/api/v1/bookings", json=body(world, start_hours=1, hours=2), headers=world.headers("bob"))
    assert clash.status_code == 409
    assert clash.json()["error"] == "overlapping_booking"
    assert clash.json()["conflicts"], "the conflicting interval is reported"
    after = client.post("/api/v1/bookings", json=body(world, start_hours=2, hours=1), headers=world.headers("bob"))
    assert after.status_code == 201, "half-open intervals: a booking may start when the previous ends"
    before = client.post("/api/v1/bookings", json=body(world, start_hours=-1, hours=1), headers=world.headers("bob"))
    assert before.status_code == 201
    other = client.post("/api/v1/bookings", json=body(world, key="SPATIAL", hours=2), headers=world.headers("bob"))
    assert other.status_code == 201, "another instrument at the same time is fine"
    assert booking_count(world.db) == 4


@pytest.mark.parametrize(
    ("change", "field", "code"),
    [
        (dict(hours=-1), "ends_at", "ends_before_start"),
        (dict(hours=0), "ends_at", "ends_before_start"),
        (dict(start_hours=0.25), "starts_at", "off_slot_grid"),
        (dict(hours=0.75), "ends_at", "off_slot_grid"),
        (dict(hours=9), "ends_at", "booking_too_long"),
        (dict(key="SEQ", hours=1), "ends_at", "booking_too_short"),
        (dict(key="EM"), "instrument_id", "instrument_not_active"),
        (dict(key="SC-MS"), "instrument_id", "not_open_to_user"),
        (dict(key="LOCAL", user="bob"), "instrument_id", "not_open_to_user"),
        (dict(start_hours=-24 * 10), "starts_at", "starts_in_past"),
        (dict(purpose="x" * 2001), "purpose", None),
        (dict(instrument_id=0), "instrument_id", None),
        (dict(starts_at="2030-01-01T10:00:00"), "starts_at", None),
        (dict(starts_at="tomorrow"), "starts_at", None),
        (dict(surprise=1), "surprise", None),
    ],
)
def test_invalid_requests_are_422_naming_the_field_and_change_nothing(
    world: World, change: dict[str, Any], field: str, code: str | None
) -> None:
    change = dict(change)  # the parameter dict is shared by both engines' runs
    user = change.pop("user", "alice")
    shape = {k: change.pop(k) for k in ("key", "start_hours", "hours") if k in change}
    payload = body(world, **shape) | change
    r = client_for(world.db).post("/api/v1/bookings", json=payload, headers=world.headers(user))
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["field"] == field
    assert err["message"]
    if code:
        assert err["error"] == code
    assert booking_count(world.db) == 0


def test_local_instrument_is_open_to_its_own_institution(world: World) -> None:
    r = client_for(world.db).post("/api/v1/bookings", json=body(world, key="LOCAL"), headers=world.headers("alice"))
    assert r.status_code == 201


def test_region_instrument_is_open_within_its_region(world: World) -> None:
    r = client_for(world.db).post("/api/v1/bookings", json=body(world, key="SC-MS"), headers=world.headers("carol"))
    assert r.status_code == 201


def test_unknown_instrument_is_404(world: World) -> None:
    r = client_for(world.db).post("/api/v1/bookings", json=body(world) | {"instrument_id": 9999},
                                  headers=world.headers("alice"))
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_malformed_json_is_422(world: World) -> None:
    r = client_for(world.db).post("/api/v1/bookings", content=b"{not json",
                                  headers=world.headers("alice", **{"Content-Type": "application/json"}))
    assert r.status_code == 422 and r.json()["error"] == "invalid_json"


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic abc", "Bearer "])
def test_without_a_valid_token_is_401(world: World, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    r = client_for(world.db).post("/api/v1/bookings", json=body(world), headers=headers)
    assert r.status_code == 401 and r.json()["error"] == "unauthenticated"
    assert booking_count(world.db) == 0


def test_idempotency_key_replays_the_first_answer(world: World) -> None:
    client = client_for(world.db)
    headers = world.headers("alice", **{"Idempotency-Key": "retry-1"})
    first = client.post("/api/v1/bookings", json=body(world), headers=headers)
    second = client.post("/api/v1/bookings", json=body(world), headers=headers)
    assert first.status_code == second.status_code == 201
    assert second.json() == first.json()
    assert second.headers.get("idempotent-replayed") == "true"
    assert booking_count(world.db) == 1
    reused = client.post("/api/v1/bookings", json=body(world, start_hours=3), headers=headers)
    assert reused.status_code == 422 and reused.json()["error"] == "idempotency_key_reused"
    # Keys belong to their user: bob's identical key is a separate request (and here a conflict).
    bob_headers = world.headers("bob", **{"Idempotency-Key": "retry-1"})
    bob = client.post("/api/v1/bookings", json=body(world), headers=bob_headers)
    assert bob.status_code == 409
    assert booking_count(world.db) == 1


def test_a_rejected_request_with_a_key_can_be_retried(world: World) -> None:
    client = client_for(world.db)
    headers = world.headers("alice", **{"Idempotency-Key": "k"})
    assert client.post("/api/v1/bookings", json=body(world, hours=9), headers=headers).status_code == 422
    assert client.post("/api/v1/bookings", json=body(world, hours=9), headers=headers).status_code == 422
    assert booking_count(world.db) == 0


def test_other_users_booking_is_404_not_403(world: World) -> None:
    client = client_for(world.db)
    booking = client.post("/api/v1/bookings", json=body(world), headers=world.headers("alice")).json()
    for path in (f"/api/v1/bookings/{booking['id']}",):
        r = client.get(path, headers=world.headers("bob"))
        assert r.status_code == 404
    r = client.post(f"/api/v1/bookings/{booking['id']}/cancel", headers=world.headers("bob"))
    assert r.status_code == 404
    mine = client.get(f"/api/v1/bookings/{booking['id']}", headers=world.headers("alice"))
    assert mine.json()["status"] == "confirmed"


def test_cancel_frees_the_slot_and_cannot_repeat(world: World) -> None:
    client = client_for(world.db)
    booking = client.post("/api/v1/bookings", json=body(world), headers=world.headers("alice")).json()
    r = client.post(f"/api/v1/bookings/{booking['id']}/cancel", headers=world.headers("alice"))
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["cancelled_at"]
    again = client.post(f"/api/v1/bookings/{booking['id']}/cancel", headers=world.headers("alice"))
    assert again.status_code == 409 and again.json()["error"] == "booking_not_cancellable"
    rebook = client.post("/api/v1/bookings", json=body(world), headers=world.headers("bob"))
    assert rebook.status_code == 201


def test_my_bookings_paginate_with_a_cursor(world: World) -> None:
    client = client_for(world.db)
    created = []
    for i in range(7):
        r = client.post("/api/v1/bookings", json=body(world, start_hours=i), headers=world.headers("alice"))
        created.append(r.json()["id"])
    seen: list[int] = []
    cursor = None
    pages = 0
    while pages < 10:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/api/v1/bookings", params=params, headers=world.headers("alice")).json()
        seen += [b["id"] for b in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == created and pages == 3
    bad = client.get("/api/v1/bookings", params={"cursor": "garbage!"}, headers=world.headers("alice"))
    assert bad.status_code == 422 and bad.json()["field"] == "cursor"


def test_availability_lists_free_and_busy(world: World) -> None:
    client = client_for(world.db)
    client.post("/api/v1/bookings", json=body(world, start_hours=2, hours=1), headers=world.headers("alice"))
    start = next_grid_day()
    r = client.get(
        f"/api/v1/instruments/{world.instruments['CONF']}/availability",
        params={"from": start.isoformat(), "to": (start + timedelta(hours=6)).isoformat()},
    )
    assert r.status_code == 200
    data = r.json()
    assert len(data["busy"]) == 1
    assert len(data["free"]) == 2
    assert data["free"][0]["ends_at"] == data["busy"][0]["starts_at"]
    wrong = client.get(
        f"/api/v1/instruments/{world.instruments['CONF']}/availability",
        params={"from": start.isoformat(), "to": start.isoformat()},
    )
    assert wrong.status_code == 422 and wrong.json()["field"] == "to"


def test_openapi_is_published(world: World) -> None:
    client = client_for(world.db)
    spec = client.get("/api/v1/openapi.json").json()
    assert "/api/v1/bookings" in spec["paths"] and "/api/v1/slots/earliest" in spec["paths"]
    assert client.get("/api/v1/docs").status_code == 200


def test_a_maintenance_blocks_creator_cannot_lift_it_as_a_booking(world: World) -> None:
    client = client_for(world.db)
    # Bob created the block while he was staff; without the role the bookings API must not find it.
    block = add_booking(world, "bob", starts_at=next_grid_day(days=3), kind="maintenance")
    r = client.post(f"/api/v1/bookings/{block}/cancel", headers=world.headers("bob"))
    assert r.status_code == 404
    assert client.get(f"/api/v1/bookings/{block}", headers=world.headers("bob")).status_code == 404
    with world.db.unit_of_work(write=False) as s:
        assert s.get(Booking, block).status == BookingStatus.confirmed  # type: ignore[union-attr]


def _lock_order(world: World, change: Callable[[Session], object]) -> list[str]:
    """Which tables the change locked FOR UPDATE, in order (PostgreSQL only)."""
    locked: list[str] = []

    def watch(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FOR UPDATE" in statement:
            table = re.search(r"\bFROM (\w+)", statement)
            locked.append(table.group(1) if table else "?")

    event.listen(world.db.engine, "before_cursor_execute", watch)
    try:
        with world.db.unit_of_work() as s:
            change(s)
    finally:
        event.remove(world.db.engine, "before_cursor_execute", watch)
    return locked


def test_cancel_approve_and_decline_lock_the_instrument_before_the_booking(world: World) -> None:
    if world.db.is_sqlite:
        pytest.skip("SQLite serialises writers with BEGIN IMMEDIATE; there are no row locks")
    start = next_grid_day(days=3)
    mine = add_booking(world, "alice", starts_at=start)
    pending = [add_booking(world, "alice", starts_at=start + timedelta(hours=h), status=BookingStatus.pending)
               for h in (2, 4)]
    with world.db.unit_of_work() as s:
        carol = identity.find_user(s, "carol@example.org")
        roles.grant_role(s, None, carol, "facility_staff", facility_id=world.facilities["CQ-LAB"])
        staff = identity.actor_for(carol, grants=roles.grants_of(s, carol.id))
    changes: list[Callable[[Session], object]] = [
        lambda s: service.cancel_booking(s, world.actors["alice"], mine),
        lambda s: approvals.approve(s, staff, pending[0]),
        lambda s: approvals.decline(s, staff, pending[1], "the laser is out"),
    ]
    for change in changes:
        locked = _lock_order(world, change)
        assert "booking" in locked and locked.index("instrument") < locked.index("booking"), locked
