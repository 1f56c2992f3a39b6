"""Synthetic benchmark data: right counts, valid bookings, deterministic, indexed like real instruments."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import aliased

from labcommons.booking.models import ACTIVE_STATUSES, Booking
from labcommons.catalog.models import Facility, Institution, Instrument, Region
from labcommons.catalog.service import InstrumentQuery, place_instrument, search_instruments
from labcommons.db import Database
from labcommons.identity.models import User
from labcommons.migrations import upgrade
from labcommons.synthetic import seed_synthetic
from tests.factories import add_instrument

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def _seed(
    db: Database, seed: int = 3, instruments: int = 50, bookings: int = 300
) -> list[tuple[str, int, int]]:
    calls: list[tuple[str, int, int]] = []
    seed_synthetic(
        db, instruments=instruments, bookings=bookings, seed=seed, now=NOW,
        progress=lambda stage, done, total: calls.append((stage, done, total)),
    )
    return calls


def _snapshot(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    with db.session() as s:
        return {
            "instrument": [tuple(r) for r in s.execute(
                select(Instrument.id, Instrument.code, Instrument.name_zh, Instrument.name_en,
                       Instrument.category_code, Instrument.slot_minutes, Instrument.status,
                       Instrument.search_body).order_by(Instrument.id)
            )],
            "booking": [tuple(r) for r in s.execute(
                select(Booking.id, Booking.instrument_id, Booking.starts_at, Booking.ends_at, Booking.status,
                       Booking.checked_in_at, Booking.checked_out_at, Booking.no_show)
                .order_by(Booking.id)
            )],
        }


def test_counts_and_progress(db: Database) -> None:
    calls = _seed(db)
    with db.session() as s:
        assert set(s.scalars(select(Region.code))) == {"CQ", "SC"}
        assert s.scalar(select(func.count()).select_from(Instrument)) == 50
        assert s.scalar(select(func.count()).select_from(Booking)) == 300
        assert s.scalar(select(func.count()).select_from(Institution)) >= 4
        assert s.scalar(select(func.count()).select_from(Facility)) >= 4
    assert ("instruments", 50, 50) in calls
    assert ("bookings", 300, 300) in calls
    assert {stage for stage, _, _ in calls} == {"institutions", "instruments", "bookings"}


def test_bookings_are_valid_and_never_overlap(db: Database) -> None:
    _seed(db)
    with db.session() as s:
        other = aliased(Booking)
        overlapping = s.scalar(
            select(func.count()).select_from(Booking).join(
                other,
                (other.instrument_id == Booking.instrument_id) & (other.id != Booking.id)
                & other.status.in_(ACTIVE_STATUSES) & (other.starts_at < Booking.ends_at)
                & (Booking.starts_at < other.ends_at),
            ).where(Booking.status.in_(ACTIVE_STATUSES))
        )
        assert overlapping == 0
        rows = s.execute(select(Booking, Instrument, User).join(Instrument).join(User)).all()
        statuses = {b.status.value for b, _, _ in rows}
        assert "confirmed" in statuses
        for booking, instrument, user in rows:
            minutes = (booking.ends_at - booking.starts_at) / timedelta(minutes=1)
            assert instrument.min_booking_minutes <= minutes <= instrument.max_booking_minutes
            assert booking.starts_at.timestamp() / 60 % instrument.slot_minutes == 0
            assert NOW - timedelta(days=11) <= booking.starts_at <= NOW + timedelta(days=61)
            if instrument.open_to.value == "institution":
                assert user.institution_id == instrument.institution_id
    confirmed = sum(1 for b, _, _ in rows if b.status.value == "confirmed")
    assert confirmed > len(rows) / 2


def test_deterministic_for_a_seed_on_either_engine(db: Database, tmp_path: Path) -> None:
    _seed(db)
    again = Database.from_url(f"sqlite:///{tmp_path / 'again.db'}")
    upgrade(again.engine)
    _seed(again)
    other = Database.from_url(f"sqlite:///{tmp_path / 'other.db'}")
    upgrade(other.engine)
    _seed(other, seed=4)
    try:
        assert _snapshot(again) == _snapshot(db)
        assert _snapshot(other)["instrument"] != _snapshot(db)["instrument"]
    finally:
        again.dispose()
        other.dispose()


def test_search_text_matches_place_instrument(db: Database) -> None:
    _seed(db)
    with db.session() as s:
        instruments = list(s.scalars(select(Instrument).order_by(Instrument.id)))
        stored = {i.id: (i.search_name, i.search_body) for i in instruments}
        for instrument in instruments:
            place_instrument(s, instrument)
            assert (instrument.search_name, instrument.search_body) == stored[instrument.id]
        s.rollback()


def test_search_finds_synthetic_chinese_names(db: Database) -> None:
    _seed(db)
    with db.session() as s:
        microscopes = set(s.scalars(select(Instrument.id).where(
            Instrument.name_zh.like("%显微镜%"), Instrument.status != "retired"
        )))
        assert microscopes, "the seed should yield at least one microscope"
        page = search_instruments(s, InstrumentQuery(q="显微镜"), limit=50)
        assert {i.id for i in page.items} == microscopes
        first = s.scalars(
            select(Instrument).where(Instrument.status == "active").order_by(Instrument.id)
        ).first()
        assert first is not None
        page = search_instruments(s, InstrumentQuery(q=first.name_zh, region=first.region_code), limit=50)
        assert first.id in {i.id for i in page.items}


@pytest.mark.parametrize("second", [0, 20])
def test_rows_added_later_get_fresh_ids(db: Database, second: int) -> None:
    _seed(db, instruments=10, bookings=30)
    if second:
        _seed(db, instruments=second, bookings=second)
    with db.unit_of_work() as s:
        facility_id = s.scalars(select(Facility.id)).first()
        assert facility_id is not None
        added = add_instrument(s, facility_id, "AFTER-SEED")
        assert added.id == 10 + second + 1
        assert s.scalar(select(func.count()).select_from(Instrument)) == 10 + second + 1


def test_full_text_index_survives_the_bulk_load(db: Database) -> None:
    _seed(db, instruments=20, bookings=0)
    with db.session() as s:
        if db.is_sqlite:
            indexed = s.scalar(text("SELECT count(*) FROM instrument_fts"))
            assert indexed == 20
        else:
            names = set(s.scalars(text("SELECT indexname FROM pg_indexes WHERE tablename = 'instrument'")))
            assert "ix_instrument_search_vector" in names


def test_past_bookings_carry_usage_and_a_few_no_shows(db: Database) -> None:
    _seed(db, instruments=100, bookings=3000)
    with db.session() as s:
        bookings = list(s.scalars(select(Booking)))
    # The seed treats bookings that ended before its day's midnight (UTC) as past.
    day = NOW.replace(hour=0, minute=0)
    past = [b for b in bookings if b.ends_at <= day and b.status.value != "cancelled"]
    later = [b for b in bookings if b.ends_at > day]
    assert len(past) > 200
    # Usage is recorded only for what has happened.
    assert all(b.checked_in_at is None and b.checked_out_at is None and not b.no_show for b in later)
    no_shows = [b for b in past if b.no_show]
    assert 0.02 * len(past) < len(no_shows) < 0.09 * len(past)
    # As booking.usage leaves them: confirmed, never checked in; everything else in the past is completed.
    assert all(b.status.value == "confirmed" and b.checked_in_at is None for b in no_shows)
    assert {b.status.value for b in past if not b.no_show} == {"completed"}
    used = [b for b in past if b.checked_in_at is not None]
    assert 0.4 * len(past) < len(used) < 0.8 * len(past)
    for b in used:
        assert b.checked_out_at is not None
        assert b.starts_at - timedelta(minutes=15) <= b.checked_in_at < b.checked_out_at <= b.ends_at
    # Actual use is mostly shorter than the booking.
    assert sum(b.checked_out_at - b.checked_in_at < b.ends_at - b.starts_at for b in used) > len(used) / 2


def test_cli_seed_synthetic_rebuilds_the_statistics(db: Database, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from labcommons.cli import app
    from labcommons.config import get_settings
    from labcommons.reporting import aggregate
    from labcommons.reporting.models import StatFacilityDay, StatInstrumentDay

    monkeypatch.setenv("LABCOMMONS_DATABASE_URL", db_url)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["seed-synthetic", "--instruments", "30", "--bookings", "400"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    with db.session() as s:
        counted = s.execute(select(Booking.starts_at, Booking.ends_at).where(
            Booking.status.in_(aggregate.COUNTED_STATUSES))).all()
        stored = int(s.scalar(select(func.sum(StatInstrumentDay.booked_min))) or 0)
        assert s.scalar(select(func.count()).select_from(StatFacilityDay))
        assert not aggregate.has_pending(s)
    # The bulk load bypassed the flush listener; the rebuild still counted every confirmed or completed minute.
    assert stored == sum(int((end - start).total_seconds()) // 60 for start, end in counted) > 0
