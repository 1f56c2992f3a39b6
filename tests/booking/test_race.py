"""Many clients race for one slot through several server processes: exactly one wins."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select

from labcommons.booking.models import ACTIVE_STATUSES, Booking
from labcommons.db import Database
from tests.factories import build_world, next_grid_day
from tests.server import running_server

CLIENTS = 32


@pytest.mark.slow
@pytest.mark.xdist_group("servers")
def test_exactly_one_of_32_concurrent_clients_gets_the_slot(db: Database, db_url: str) -> None:
    world = build_world(db)
    start = next_grid_day(days=3)
    # Overlapping, not identical, requests: each client asks for a different window that covers the same hour.
    bodies = [
        {
            "instrument_id": world.instruments["CONF"],
            "starts_at": (start - timedelta(minutes=30 * (i % 3))).isoformat(),
            "ends_at": (start + timedelta(minutes=60 + 30 * (i % 2))).isoformat(),
            "purpose": f"client {i}",
        }
        for i in range(CLIENTS)
    ]
    users = ["alice", "bob", "carol"]
    with running_server(db_url, workers=2) as base:
        barrier = threading.Barrier(CLIENTS)

        def attempt(i: int) -> int:
            with httpx.Client(base_url=base, timeout=60) as client:
                headers = world.headers(users[i % 3])
                barrier.wait()
                return client.post("/api/v1/bookings", json=bodies[i], headers=headers).status_code

        with ThreadPoolExecutor(CLIENTS) as pool:
            statuses = list(pool.map(attempt, range(CLIENTS)))
    assert statuses.count(201) == 1, statuses
    assert statuses.count(409) == CLIENTS - 1, statuses
    with db.unit_of_work(write=False) as s:
        active = s.scalars(select(Booking).where(Booking.status.in_(ACTIVE_STATUSES))).all()
    assert len(active) == 1


@pytest.mark.slow
@pytest.mark.xdist_group("servers")
def test_concurrent_retries_with_one_idempotency_key_make_one_booking(db: Database, db_url: str) -> None:
    world = build_world(db)
    start = next_grid_day(days=4)
    body = {
        "instrument_id": world.instruments["SPATIAL"],
        "starts_at": start.isoformat(),
        "ends_at": (start + timedelta(hours=1)).isoformat(),
    }
    with running_server(db_url, workers=2) as base:
        barrier = threading.Barrier(8)

        def attempt(_: int) -> tuple[int, int]:
            with httpx.Client(base_url=base, timeout=60) as client:
                barrier.wait()
                r = client.post("/api/v1/bookings", json=body,
                                headers=world.headers("alice", **{"Idempotency-Key": "same-key"}))
                return r.status_code, r.json().get("id", -1)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(attempt, range(8)))
    assert {status for status, _ in results} == {201}, results
    assert len({booking_id for _, booking_id in results}) == 1
    with db.unit_of_work(write=False) as s:
        assert len(s.scalars(select(Booking)).all()) == 1
