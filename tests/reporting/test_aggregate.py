"""The pre-aggregates stay current: what the flush listener marks, refresh and rebuild agree, the periodic job, the
migration's marks for existing bookings, and (PostgreSQL) refreshes racing booking changes and each other."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, insert, select, text
from sqlalchemy.engine import make_url

from labcommons import jobs
from labcommons.booking.models import Booking, BookingStatus
from labcommons.catalog.models import Facility, Institution, InstitutionKind, Instrument, Region
from labcommons.catalog.service import place_instrument
from labcommons.db import Database, utcnow
from labcommons.identity.models import User
from labcommons.migrations import upgrade
from labcommons.notifications.models import Job, JobStatus
from labcommons.reporting import aggregate
from labcommons.reporting.models import StatInstrumentDay
from tests.conftest import POSTGRES_ADMIN_URL
from tests.factories import World
from tests.reporting.conftest import (
    TODAY,
    clear_dirty,
    core_insert_bookings,
    dirty_count,
    dirty_keys,
    local,
    stat_tables,
)

D = TODAY - timedelta(days=5)


def book(world: World, instrument: str = "CONF", user: str = "bob", *, start: datetime, minutes: int = 120,
         **fields: Any) -> int:
    """A booking written through the ORM (so the flush listener sees it); its id."""
    with world.db.unit_of_work() as s:
        booking = Booking(instrument_id=world.instruments[instrument], user_id=world.actors[user].user_id,
                          starts_at=start, ends_at=start + timedelta(minutes=minutes),
                          status=fields.pop("status", BookingStatus.confirmed), **fields)
        s.add(booking)
        s.flush()
        return booking.id


def change(world: World, booking_id: int, **fields: Any) -> None:
    with world.db.unit_of_work() as s:
        booking = s.get(Booking, booking_id)
        assert booking is not None
        for key, value in fields.items():
            setattr(booking, key, value)


def rebuilt(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    aggregate.rebuild(db)
    return stat_tables(db)


# ------------------------------------------------------------------------------------------------ marking


def test_a_new_booking_marks_its_local_days_even_across_midnight_in_shanghai(world: World) -> None:
    conf = world.instruments["CONF"]
    # 22:00–02:00 in Shanghai is 14:00–18:00 UTC: one UTC day, two local days.
    book(world, start=local(D, 22), minutes=240)
    assert dirty_keys(world.db) == {(conf, D), (conf, D + timedelta(days=1))}
    clear_dirty(world.db)
    # Ending exactly at local midnight touches no second day (the interval is half-open).
    book(world, start=local(D, 20), minutes=120)
    assert dirty_keys(world.db) == {(conf, D)}


def test_a_moved_booking_marks_the_days_it_left_and_the_days_it_reaches(world: World) -> None:
    conf, seq = world.instruments["CONF"], world.instruments["SEQ"]
    booking = book(world, start=local(D, 9))
    clear_dirty(world.db)
    change(world, booking, starts_at=local(D + timedelta(days=3), 9), ends_at=local(D + timedelta(days=3), 11))
    assert dirty_keys(world.db) == {(conf, D), (conf, D + timedelta(days=3))}
    clear_dirty(world.db)
    change(world, booking, instrument_id=seq)  # to another instrument: both instruments' day
    assert dirty_keys(world.db) == {(conf, D + timedelta(days=3)), (seq, D + timedelta(days=3))}


@pytest.mark.parametrize("fields", [
    {"status": BookingStatus.cancelled},
    {"checked_in_at": local(D, 9, 5)},
    {"checked_out_at": local(D, 10)},
    {"no_show": True},
    {"status": BookingStatus.completed},
])
def test_a_change_of_status_or_usage_marks_the_booking_days(world: World, fields: dict[str, Any]) -> None:
    booking = book(world, start=local(D, 9))
    clear_dirty(world.db)
    change(world, booking, **fields)
    assert dirty_keys(world.db) == {(world.instruments["CONF"], D)}


def test_a_deleted_booking_marks_its_days_and_other_writes_mark_nothing(world: World) -> None:
    booking = book(world, "SPATIAL", start=local(D, 23), minutes=90)
    clear_dirty(world.db)
    with world.db.unit_of_work() as s:  # a flush without bookings
        user = s.get(User, world.actors["bob"].user_id)
        assert user is not None
        user.name = "Robert"
    assert dirty_count(world.db) == 0
    with world.db.unit_of_work() as s:
        s.delete(s.get(Booking, booking))
    spatial = world.instruments["SPATIAL"]
    assert dirty_keys(world.db) == {(spatial, D), (spatial, D + timedelta(days=1))}


# ------------------------------------------------------------------------------------------------ refresh


def test_refresh_removes_the_marks_and_leaves_what_a_rebuild_computes(world: World) -> None:
    book(world, start=local(D, 22), minutes=300, checked_in_at=local(D, 22, 10))
    book(world, "SC-MS", "carol", start=local(D, 8))
    assert aggregate.refresh(world.db) == 3
    assert dirty_count(world.db) == 0
    refreshed = stat_tables(world.db)
    assert refreshed["stat_instrument_day"], "the refresh wrote nothing"
    with world.db.session() as s:
        row = s.get(StatInstrumentDay, (world.instruments["CONF"], D))
        assert row is not None and (row.bookings, row.booked_min, row.effective_min) == (1, 120, 110)
    assert rebuilt(world.db) == refreshed


def test_a_refresh_after_many_changes_equals_a_full_rebuild(world: World) -> None:
    ids = []
    for n in range(12):
        start = local(D - timedelta(days=2 * n), (3 * n) % 24, 30 * (n % 2))  # some run past midnight
        instrument = ("CONF", "SEQ", "SPATIAL", "SC-MS")[n % 4]
        user = ("alice", "bob", "carol")[n % 3]
        ids.append(book(world, instrument, user, start=start, minutes=45 + 37 * n,
                        status=BookingStatus.completed if n % 5 == 0 else BookingStatus.confirmed))
    aggregate.refresh(world.db)
    change(world, ids[0], starts_at=local(D + timedelta(days=2), 1), ends_at=local(D + timedelta(days=2), 3))
    change(world, ids[1], status=BookingStatus.cancelled)
    change(world, ids[2], no_show=True)
    change(world, ids[3], checked_in_at=local(D - timedelta(days=6), 9, 0, 30))
    change(world, ids[4], instrument_id=world.instruments["LOCAL"])
    with world.db.unit_of_work() as s:
        s.delete(s.get(Booking, ids[5]))
    book(world, "SEQ", "carol", start=local(D + timedelta(days=1), 23, 45), minutes=600, kind="maintenance")
    assert dirty_count(world.db) > 0
    aggregate.refresh(world.db)
    assert dirty_count(world.db) == 0
    assert stat_tables(world.db) == rebuilt(world.db)


def test_a_refresh_in_small_batches_equals_one_refresh(world: World) -> None:
    for n in range(6):
        book(world, ("CONF", "SC-MS")[n % 2], start=local(D - timedelta(days=n), 10))
    assert aggregate.refresh(world.db, limit=2) == 2
    assert dirty_count(world.db) == 4
    aggregate.refresh(world.db)
    assert stat_tables(world.db) == rebuilt(world.db)


def test_ensure_current_is_a_no_op_when_nothing_is_dirty(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    book(world, start=local(D, 9))
    assert aggregate.ensure_current(world.db) == 1
    before = stat_tables(world.db)

    def no_refresh(*_args: Any, **_kw: Any) -> int:
        raise AssertionError("refresh ran although nothing was dirty")

    monkeypatch.setattr(aggregate, "refresh", no_refresh)
    assert aggregate.ensure_current(world.db) == 0
    assert stat_tables(world.db) == before


def test_core_inserts_are_seen_after_a_rebuild(world: World) -> None:
    core_insert_bookings(world.db, [dict(
        instrument_id=world.instruments["CONF"], user_id=world.actors["carol"].user_id, starts_at=local(D, 9),
        ends_at=local(D, 12), status="confirmed", kind="use", created_at=local(D - timedelta(days=1), 9),
        no_show=False)])
    assert dirty_count(world.db) == 0 and not stat_tables(world.db)["stat_instrument_day"]
    aggregate.rebuild(world.db)
    with world.db.session() as s:
        row = s.get(StatInstrumentDay, (world.instruments["CONF"], D))
        assert row is not None
        assert (row.booked_min, row.effective_min, row.ext_institution_min, row.ext_region_min) == (180,) * 4


def test_the_stat_refresh_job_runs_through_the_job_runner(world: World) -> None:
    book(world, start=local(D, 9))
    book(world, "SC-MS", "alice", start=local(D, 9))
    assert dirty_count(world.db) == 2
    with world.db.unit_of_work() as s:
        jobs.enqueue(s, "stat_refresh", {})
    stats = jobs.run_pending(world.db, "test-worker")
    assert stats.failed == 0 and stats.retried == 0
    with world.db.session() as s:
        states = {k: st for k, st in s.execute(select(Job.kind, Job.status))}
    assert states["stat_refresh"] == JobStatus.done
    assert dirty_count(world.db) == 0
    assert len(stat_tables(world.db)["stat_instrument_day"]) == 2


# ------------------------------------------------------------------------------------------------ the migration


@pytest.fixture
def empty_database(db: Database, tmp_path: Path) -> Iterator[Database]:
    """A database with no tables at all, on the engine of `db` (to run the migrations from the start)."""
    if db.is_sqlite:
        fresh = Database.from_url(f"sqlite:///{tmp_path / 'old.db'}")
        yield fresh
        fresh.dispose()
        return
    name = f"lc_mig_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    fresh = Database.from_url(make_url(db.engine.url).set(database=name).render_as_string(hide_password=False))
    try:
        yield fresh
    finally:
        fresh.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_the_migration_marks_the_days_of_existing_bookings(empty_database: Database) -> None:
    db = empty_database
    upgrade(db.engine, "0006")
    now = utcnow()
    with db.engine.begin() as conn:  # bookings that predate the statistics (Core: no listener involved)
        conn.execute(insert(Region).values(code="CQ", name_zh="重庆", name_en="Chongqing"))
        conn.execute(insert(Institution).values(id=1, code="I", region_code="CQ", kind=InstitutionKind.laboratory,
                                                name_zh="所", name_en="Institute"))
        conn.execute(insert(Facility).values(id=1, code="F", institution_id=1, name_zh="平台", name_en="Core",
                                             description_zh="", description_en=""))
        conn.execute(insert(Instrument).values(
            id=1, code="NMR", facility_id=1, institution_id=1, region_code="CQ", name_zh="核磁共振波谱仪",
            name_en="NMR spectrometer", category_code="ANA.NMR", created_at=now, updated_at=now))
        conn.execute(insert(User).values(id=1, email="u@example.org", name="U", institution_id=1, region_code="CQ",
                                         created_at=now))
        rows = [(local(D, 23), 120, "confirmed"), (local(D, 9), 60, "completed"), (local(D + timedelta(days=4), 9),
                60, "cancelled"), (local(D + timedelta(days=6), 9), 60, "pending")]
        for start, minutes, status in rows:
            conn.execute(insert(Booking).values(instrument_id=1, user_id=1, starts_at=start,
                                                ends_at=start + timedelta(minutes=minutes), status=status,
                                                created_at=now))
    upgrade(db.engine)
    # Counted bookings only; the night booking reaches into the next local day.
    assert dirty_keys(db) == {(1, D), (1, D + timedelta(days=1))}
    aggregate.refresh(db)
    refreshed = stat_tables(db)
    with db.session() as s:
        day = s.get(StatInstrumentDay, (1, D))
        assert day is not None and (day.bookings, day.booked_min) == (2, 60 + 60)
    assert rebuilt(db) == refreshed


# ------------------------------------------------------------------------------------------------ PostgreSQL races


def _in_thread(target: Any, timeout: float = 30) -> list[BaseException]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # handed back to the test
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the thread is stuck (a refresh waited for a lock it should have skipped)"
    return errors


def _booked(db: Database, instrument_id: int, day: date) -> int:
    with db.session() as s:
        row = s.get(StatInstrumentDay, (instrument_id, day))
        return row.booked_min if row else 0


def test_a_change_held_uncommitted_during_a_refresh_is_not_lost(world: World) -> None:
    if world.db.is_sqlite:
        pytest.skip("PostgreSQL only: SQLite serialises writers, so a refresh never runs beside an open change")
    conf = world.instruments["CONF"]
    first = book(world, start=local(D, 9))
    other = book(world, start=local(D, 14))
    aggregate.refresh(world.db)
    change(world, first, ends_at=local(D, 12))  # committed and marked, not refreshed yet
    assert dirty_keys(world.db) == {(conf, D)}
    held = world.db.session(write=True)
    try:
        booking = held.get(Booking, other)
        assert booking is not None
        booking.ends_at = local(D, 18)  # 2 h longer, and the mark of (CONF, D) is now locked by this transaction
        held.flush()
        errors = _in_thread(lambda: aggregate.refresh(world.db))
        assert not errors
        # The refresh skipped the held mark: the committed change is not in the figures yet, nor the held one.
        assert dirty_keys(world.db) == {(conf, D)}
        held.commit()
    finally:
        held.close()
    aggregate.refresh(world.db)
    assert dirty_count(world.db) == 0
    assert _booked(world.db, conf, D) == 180 + 240
    assert stat_tables(world.db) == rebuilt(world.db)


def test_a_change_made_while_a_refresh_holds_its_mark_is_not_lost(world: World) -> None:
    if world.db.is_sqlite:
        pytest.skip("PostgreSQL only: SQLite serialises writers")
    conf = world.instruments["CONF"]
    booking_id = book(world, start=local(D, 9))
    refresher = world.db.session(write=True)
    try:
        # A refresh that has read the booking and holds the mark, not yet committed.
        assert aggregate._refresh_batch(refresher, 100) == 1
        started = threading.Event()

        def move() -> None:
            started.set()
            change(world, booking_id, ends_at=local(D, 15))  # waits for the refresher's mark, then marks again

        thread = threading.Thread(target=move)
        thread.start()
        started.wait(5)
        thread.join(1)
        assert thread.is_alive(), "the change should wait for the mark the refresh holds"
        refresher.commit()
        thread.join(30)
        assert not thread.is_alive()
    finally:
        refresher.close()
    assert _booked(world.db, conf, D) == 120
    assert dirty_keys(world.db) == {(conf, D)}
    aggregate.refresh(world.db)
    assert _booked(world.db, conf, D) == 360


def test_two_refreshers_at_once_both_finish_and_agree_with_a_rebuild(world: World) -> None:
    if world.db.is_sqlite:
        pytest.skip("PostgreSQL only: the advisory lock")
    for n in range(20):
        book(world, ("CONF", "SEQ", "SC-MS", "SPATIAL")[n % 4], ("alice", "bob", "carol")[n % 3],
             start=local(D - timedelta(days=n // 4), 8 + n % 4 * 3))
    barrier = threading.Barrier(2)
    done: list[int] = []

    def refresher() -> None:
        barrier.wait(10)
        done.append(aggregate.refresh(world.db))

    threads = [threading.Thread(target=refresher) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert len(done) == 2 and sum(done) == 20  # both finished; every mark was done once
    assert dirty_count(world.db) == 0
    assert stat_tables(world.db) == rebuilt(world.db)


def test_a_refresh_after_an_instrument_moved_to_another_facility_does_not_fail(world: World) -> None:
    conf = world.instruments["CONF"]
    booking = book(world, start=local(D, 9))
    aggregate.refresh(world.db)
    with world.db.unit_of_work() as s:  # as a catalogue import may do
        instrument = s.get(Instrument, conf)
        assert instrument is not None
        instrument.facility_id = world.facilities["CQ-UNI"]
        place_instrument(s, instrument)
    change(world, booking, ends_at=local(D, 13))
    aggregate.refresh(world.db)  # used to collide with the instrument's row under its old facility
    assert dirty_count(world.db) == 0
    with world.db.session() as s:
        row = s.get(StatInstrumentDay, (conf, D))
        assert row is not None and (row.facility_id, row.booked_min) == (world.facilities["CQ-UNI"], 240)
    assert stat_tables(world.db) == rebuilt(world.db)  # the old facility no longer counts it either


def test_moving_an_instrument_marks_all_its_days_and_attributes_them_anew(world: World) -> None:
    conf = world.instruments["CONF"]
    book(world, start=local(D, 9))
    book(world, start=local(D + timedelta(days=3), 9), minutes=60)
    aggregate.refresh(world.db)
    with world.db.unit_of_work() as s:  # only the instrument moves; no booking changes
        instrument = s.get(Instrument, conf)
        assert instrument is not None
        old_facility = instrument.facility_id
        instrument.facility_id = world.facilities["CQ-UNI"]
        place_instrument(s, instrument)
    assert dirty_count(world.db) == 2  # both of its days
    aggregate.ensure_current(world.db)
    with world.db.session() as s:
        facilities = set(s.scalars(
            select(StatInstrumentDay.facility_id).where(StatInstrumentDay.instrument_id == conf)))
    assert facilities == {world.facilities["CQ-UNI"]} != {old_facility}
    assert stat_tables(world.db) == rebuilt(world.db)


def test_a_move_of_expired_times_still_marks_the_old_day(world: World) -> None:
    booking = book(world, start=local(D, 9))
    aggregate.refresh(world.db)
    with world.db.unit_of_work() as s:
        row = s.get(Booking, booking)
        assert row is not None
        s.expire(row)  # the old values are not loaded when the new ones are set
        row.starts_at, row.ends_at = local(D + timedelta(days=2), 9), local(D + timedelta(days=2), 11)
    assert dirty_count(world.db) == 2  # the old day and the new one
    aggregate.ensure_current(world.db)
    assert stat_tables(world.db) == rebuilt(world.db)
