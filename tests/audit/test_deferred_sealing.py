"""Deferred sealing (PostgreSQL's default): commits record their audit entries as pending rows with their own
HMAC and never wait on the chain's head; the sealer chains them later, in order, without losing or changing one."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from labcommons.audit import chain, seal
from labcommons.audit.models import AuditEntry, AuditPending
from labcommons.booking.models import Booking
from labcommons.config import get_settings
from labcommons.db import Database
from tests.api_client import client_for
from tests.factories import World, next_grid_day


@pytest.fixture(autouse=True)
def deferred(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("LABCOMMONS_AUDIT_SEALING", "deferred")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def count(db: Database, model: type) -> int:
    with db.unit_of_work(write=False) as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def book(world: World, user: str, key: str, hours: int, length: int = 1) -> int:
    start = next_grid_day(days=3) + timedelta(hours=hours)
    r = client_for(world.db).post("/api/v1/bookings", headers=world.headers(user), json={
        "instrument_id": world.instruments[key], "starts_at": start.isoformat(),
        "ends_at": (start + timedelta(hours=length)).isoformat()})
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def test_commits_leave_pending_records_that_the_sealer_chains_in_order(world: World) -> None:
    db = world.db
    seal.seal_all(db)  # the world's own set-up
    sealed_before = count(db, AuditEntry)
    ids = [book(world, "alice", "CONF", hours) for hours in (0, 2, 4)]
    assert count(db, AuditEntry) == sealed_before, "nothing is chained at commit"
    pending = count(db, AuditPending)
    assert pending >= 3
    assert seal.seal_all(db) == pending
    assert count(db, AuditPending) == 0
    with db.unit_of_work(write=False) as s:
        created = s.scalars(select(AuditEntry.entity_id).where(AuditEntry.action == "booking.created")
                            .where(AuditEntry.seq > sealed_before).order_by(AuditEntry.seq)).all()
        report = chain.verify(s)
    assert created == [str(i) for i in ids]  # commit order is chain order
    assert report.ok, report.problems
    assert report.entries == sealed_before + pending


def test_a_rolled_back_change_leaves_no_pending_record(world: World) -> None:
    seal.seal_all(world.db)
    before = count(world.db, AuditPending)
    with pytest.raises(RuntimeError), world.db.unit_of_work() as s:
        s.add(Booking(instrument_id=world.instruments["CONF"], user_id=world.actors["alice"].user_id,
                      starts_at=next_grid_day(days=3), ends_at=next_grid_day(days=3) + timedelta(hours=1)))
        s.flush()
        raise RuntimeError("abandon")
    assert count(world.db, AuditPending) == before


def test_a_changed_pending_record_is_reported_and_not_chained(world: World) -> None:
    seal.seal_all(world.db)
    book(world, "alice", "CONF", 0)
    with world.db.unit_of_work() as s:
        s.execute(update(AuditPending).values(changes='{"after": {"purpose": "forged"}}'))
    with pytest.raises(seal.PendingRecordTampered), world.db.unit_of_work() as s:
        seal.seal_pending(s)
    seal.bring_current(world.db)  # readers carry on; the record stays where verify finds it
    assert count(world.db, AuditPending) >= 1
    with world.db.unit_of_work(write=False) as s:
        report = chain.verify(s)
    assert not report.ok
    assert {p.kind for p in report.problems} == {"pending_changed"}


def test_the_log_api_seals_before_it_reads(world: World) -> None:
    booking_id = book(world, "alice", "CONF", 0)
    from labcommons.identity import roles
    from labcommons.identity import service as identity

    with world.db.unit_of_work() as s:
        roles.grant_role(s, None, identity.find_user(s, "bob@example.org"), "platform_admin")
    r = client_for(world.db).get("/api/v1/audit", params={"entity_type": "booking", "entity_id": str(booking_id)},
                                 headers=world.headers("bob"))
    assert r.status_code == 200, r.text
    assert [e["action"] for e in r.json()["entries"]] == ["booking.created"]


def test_concurrent_writers_and_sealers_lose_nothing(world: World) -> None:
    """Eight writers book while two sealer threads run: every booking's entry is chained once, no gap."""
    db = world.db
    seal.seal_all(db)
    sealers = [seal.Sealer(db, interval=0.01) for _ in range(2)]
    for sealer in sealers:
        sealer.start()
    keys = ["CONF", "SPATIAL"]
    try:
        def writer(n: int) -> list[int]:
            return [book(world, "alice", keys[n % len(keys)], 2 * (5 * (n // len(keys)) + i), length=2)
                    for i in range(5)]

        with ThreadPoolExecutor(8) as pool:
            booked = [i for ids in pool.map(writer, range(8)) for i in ids]
    finally:
        for sealer in sealers:
            sealer.stop()
    assert count(db, AuditPending) == 0
    with db.unit_of_work(write=False) as s:
        chained = s.scalars(select(AuditEntry.entity_id).where(AuditEntry.action == "booking.created")).all()
        report = chain.verify(s)
    assert sorted(chained, key=int) == [str(i) for i in sorted(booked)]
    assert report.ok, report.problems
