"""Fixtures of the reporting tests: clean databases on demand, actors with roles, and raw-row builders."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import delete, func, insert, select, text

from labcommons.actor import Actor, Grant
from labcommons.booking.models import Booking
from labcommons.db import Base, Database
from labcommons.reporting.models import (
    StatDirty,
    StatFacilityDay,
    StatInstrumentDay,
    StatInstrumentMonth,
    StatRegionDay,
)

TZ = ZoneInfo("Asia/Shanghai")
# A fixed "today" for the figures (a Monday); the tests never depend on the machine's date.
TODAY = date(2026, 3, 16)

CleanDb = Callable[[], Database]
# Reference data the migrations load (as in tests/conftest.py): kept when a database is emptied.
REFERENCE_TABLES = {"category", "alembic_version", "voucher_recognition"}


def local(day: date, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    """A wall-clock time in Asia/Shanghai as an aware UTC datetime."""
    return datetime.combine(day, time(hour, minute, second), TZ).astimezone(UTC)


@pytest.fixture
def clean_db(db: Database, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CleanDb]:
    """Calls return an empty migrated database on the engine of `db` (for hypothesis examples).

    SQLite gets a fresh copy of the migrated template (the ledger's append-only triggers forbid deleting
    charges); PostgreSQL truncates, which fires no row triggers.
    """
    opened: list[Database] = []
    counter = itertools.count()

    def make() -> Database:
        if db.is_sqlite:
            for old in opened:
                old.dispose()
            opened.clear()
            template: Path = request.getfixturevalue("sqlite_template")
            path = tmp_path / f"example-{next(counter)}.db"
            shutil.copy(template, path)
            fresh = Database.from_url(f"sqlite:///{path}")
            opened.append(fresh)
            return fresh
        names = [t.name for t in Base.metadata.sorted_tables if t.name not in REFERENCE_TABLES]
        with db.engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {', '.join(names)} RESTART IDENTITY CASCADE"))
        return db

    yield make
    for old in opened:
        old.dispose()


def stat_tables(database: Database) -> dict[str, list[tuple[Any, ...]]]:
    """The statistics tables as sorted lists of rows (every column), for comparing two ways of computing them."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with database.session() as s:
        for model in (StatInstrumentDay, StatFacilityDay, StatInstrumentMonth, StatRegionDay):
            columns = list(model.__table__.columns)
            rows = s.execute(select(*columns)).all()
            out[model.__tablename__] = sorted(tuple(r) for r in rows)
    return out


def dirty_keys(database: Database) -> set[tuple[int, date]]:
    """The instrument-days marked for recomputation."""
    with database.session() as s:
        return {(int(i), d) for i, d in s.execute(select(StatDirty.instrument_id, StatDirty.day))}


def dirty_count(database: Database) -> int:
    with database.session() as s:
        return int(s.scalar(select(func.count()).select_from(StatDirty)) or 0)


def clear_dirty(database: Database) -> None:
    """Forget every mark (to observe what one change marks)."""
    with database.engine.begin() as conn:
        conn.execute(delete(StatDirty))


def core_insert_bookings(database: Database, rows: list[dict[str, Any]]) -> None:
    """Insert bookings with Core, bypassing the ORM flush listener (as bulk loads do)."""
    if rows:
        with database.unit_of_work() as s:
            s.execute(insert(Booking), rows)


def actor(*grants: Grant, institution_id: int | None = None, region_code: str = "CQ", user_id: int = 1) -> Actor:
    """An actor holding `grants` (resolve_scope and visible_scopes read nothing else of it)."""
    return Actor(user_id=user_id, email=f"u{user_id}@example.org", name="U", institution_id=institution_id,
                 region_code=region_code, grants=grants)


def day_range(first: date, last: date) -> Iterator[date]:
    day = first
    while day <= last:
        yield day
        day += timedelta(days=1)
