"""A booking's whole life in one test, on both engines, through the API, the job runner and a real SMTP server.

request (pending: the instrument needs approval) → the facility manager approves → the reminder goes out 24 h
before → check-in and check-out at the instrument with its token → the actual usage is recorded.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from labcommons import jobs
from labcommons.booking import usage
from labcommons.booking.models import Booking, BookingPolicy, BookingStatus
from labcommons.catalog.models import Instrument
from labcommons.identity.models import Role, RoleGrant
from tests.api_client import client_for
from tests.factories import World, next_grid_day
from tests.test_mail import SmtpSink, smtp_backend


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    with smtp_backend() as sink:
        yield sink


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    with client_for(world.db) as test_client:
        yield test_client


def _recipients(sink: SmtpSink) -> list[tuple[str, str]]:
    return [(str(m["To"]), str(m["Subject"])) for m in sink.messages]


def test_request_approve_remind_check_in_check_out_and_usage(world: World, client: TestClient, smtp: SmtpSink) -> None:
    conf = world.instruments["CONF"]
    with world.db.unit_of_work() as s:
        s.add(BookingPolicy(instrument_id=conf, requires_approval=True))
        facility = s.get(Instrument, conf).facility_id  # type: ignore[union-attr]
        s.add(RoleGrant(user_id=world.actors["bob"].user_id, role=Role.facility_manager, facility_id=facility,
                        scope_key=f"facility:{facility}"))
    start = next_grid_day(days=3, hour=2)
    end = start + timedelta(hours=2)

    # 1. Alice asks for time: it is held, pending approval, and she is told so (after the runner runs).
    answer = client.post("/api/v1/bookings", headers=world.headers("alice", **{"Idempotency-Key": "life-1"}),
                         json={"instrument_id": conf, "starts_at": start.isoformat(), "ends_at": end.isoformat(),
                               "purpose": "live-cell imaging"})
    assert answer.status_code == 201, answer.text
    booking_id = answer.json()["id"]
    assert answer.json()["status"] == "pending"
    assert smtp.messages == []  # nothing is mailed inside the request
    assert jobs.run_pending(world.db).done == 1
    assert [to for to, _subject in _recipients(smtp)] == ["alice@example.org"]

    # 2. Bob, who manages the facility, approves it; Alice hears, and her 24-hour reminder is scheduled.
    approved = client.post(f"/api/v1/bookings/{booking_id}/approve", headers=world.headers("bob"))
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "confirmed"
    assert jobs.run_pending(world.db).done == 1
    assert len(smtp.wait_for(2)) == 2
    assert jobs.run_pending(world.db).total == 0  # the reminder is not due yet

    # 3. A day before the start the reminder goes out, once.
    day_before = start - timedelta(hours=23)
    assert jobs.run_pending(world.db, now=day_before).done == 1
    assert jobs.run_pending(world.db, now=day_before).total == 0
    subjects = [subject for _to, subject in _recipients(smtp)]
    assert len(subjects) == 3 and len(set(subjects)) == 3

    # 4. At the instrument: its computer checks Alice in and out with the instrument's own token.
    with world.db.unit_of_work() as s:
        _token, secret = usage.create_instrument_token(s, conf, name="confocal PC")
    arrived, left = start + timedelta(minutes=4), start + timedelta(minutes=97)
    with world.db.unit_of_work() as s:
        instrument = usage.authenticate_instrument(s, secret)
        assert instrument.instrument_id == conf
        booking = usage.booking_to_check_in(s, conf, world.actors["alice"].user_id, now=arrived)
        assert booking.id == booking_id
        usage.check_in(s, booking, now=arrived)
    with world.db.unit_of_work() as s:
        booking = usage.booking_to_check_out(s, conf, world.actors["alice"].user_id)
        usage.check_out(s, booking, now=left)

    # 5. What really happened is what statistics and billing will read.
    with world.db.unit_of_work(write=False) as s:
        final = s.get(Booking, booking_id)
        assert final is not None and final.status == BookingStatus.completed and not final.no_show
        records = usage.actual_usage(s, conf, start - timedelta(days=1), end + timedelta(days=1))
    assert [(r.booking_id, r.user_id, r.minutes) for r in records] == [(booking_id, world.actors["alice"].user_id, 93)]
    assert jobs.run_pending(world.db, now=left).total == 0  # checking in and out mails nobody
    assert len(smtp.messages) == 3
