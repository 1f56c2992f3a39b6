"""Keeping the statistics tables current: what each booking contributes, dirty marking, refresh and rebuild.

- A flush that adds, changes or deletes a booking marks the instrument-days it touched (before and after the
  change) in `stat_dirty`, in the same transaction (`mark_changed`, called by reporting/hooks.py).
- `refresh` recomputes the facility-days of dirty marks from the bookings and removes the marks, in one write
  transaction. On PostgreSQL it takes the marks `FOR UPDATE SKIP LOCKED`: a mark still held by an uncommitted
  booking change is left for the next refresh, so no committed change is ever lost. One refresher runs at a time
  (an advisory lock on PostgreSQL; SQLite serialises writers anyway).
- Readers call `ensure_current` first, so a dashboard includes every committed booking change whose mark is not
  held at that moment by another, still open, change of the same instrument-day; the periodic
  `stat_refresh` job keeps the backlog small.
- `rebuild` recomputes everything (after bulk loads that bypass the ORM, such as `seed-synthetic`).

How a booking counts is defined in docs/metrics.md; `contributions` is that definition in code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Date, delete, func, insert, literal, select, text, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased
from sqlalchemy.orm.attributes import get_history

from labcommons import jobs
from labcommons.booking.models import Booking, BookingKind, BookingStatus
from labcommons.catalog.models import Instrument
from labcommons.db import Database, UTCDateTime, utcnow
from labcommons.identity.models import User
from labcommons.reporting.models import (
    HOUR_COLUMNS,
    LEAD_BUCKET_HOURS,
    LEAD_COLUMNS,
    StatDirty,
    StatFacilityDay,
    StatInstrumentDay,
    StatInstrumentMonth,
    StatRegionDay,
)

log = logging.getLogger("labcommons.reporting")

# Bookings in these states count as booked time; pending ones are not yet granted, cancelled ones never were.
COUNTED_STATUSES = (BookingStatus.confirmed.value, BookingStatus.completed.value)
REFRESH_BATCH = 2000
_REFRESH_LOCK = 0x1AB5_7A75  # pg_advisory_xact_lock key: one refresher at a time


def zone() -> ZoneInfo:
    """The zone whose local days the statistics are kept in (the platform's default zone)."""
    from labcommons.config import get_settings

    return ZoneInfo(get_settings().default_timezone)


def today() -> date:
    """Today in the platform's zone: the statistics' days and 'effective up to' follow it, not the machine's date."""
    return utcnow().astimezone(zone()).date()


# --------------------------------------------------------------------------------------------- contributions


@dataclass(frozen=True)
class BookingRow:
    """What the statistics need of one booking, its instrument and its booker."""

    instrument_id: int
    facility_id: int
    institution_id: int
    region_code: str
    user_institution_id: int | None
    user_region_code: str
    starts_at: datetime
    ends_at: datetime
    status: str
    kind: str
    created_at: datetime
    checked_in_at: datetime | None
    checked_out_at: datetime | None
    no_show: bool


def _day_start(day: date, tz: ZoneInfo) -> datetime:
    return datetime.combine(day, time(), tz).astimezone(UTC)


def local_days(start: datetime, end: datetime, tz: ZoneInfo) -> Iterator[tuple[date, datetime, datetime]]:
    """The local days [start, end) touches, each with its UTC bounds clipped to [start, end)."""
    day = start.astimezone(tz).date()
    while True:
        lo, hi = _day_start(day, tz), _day_start(day + timedelta(days=1), tz)
        if lo >= end:
            return
        yield day, max(lo, start), min(hi, end)
        day += timedelta(days=1)


def _hour_pieces(start: datetime, end: datetime, tz: ZoneInfo) -> Iterator[tuple[date, int, int]]:
    """(local day, local hour, whole minutes) for each local hour [start, end) touches."""
    cursor = start
    while cursor < end:
        local = cursor.astimezone(tz)
        hour_start = local.replace(minute=0, second=0, microsecond=0)
        nxt = min((hour_start + timedelta(hours=1)).astimezone(UTC), end)
        if nxt <= cursor:  # a local hour that repeats (not in Asia/Shanghai, but zones may change)
            nxt = min(cursor + timedelta(hours=1), end)
        yield local.date(), local.hour, int((nxt - cursor).total_seconds()) // 60
        cursor = nxt


def lead_bucket(created_at: datetime, starts_at: datetime) -> int:
    """The lead-time bucket of a booking made at `created_at` for `starts_at` (index into LEAD_COLUMNS)."""
    hours = max((starts_at - created_at).total_seconds(), 0) / 3600
    for index, bound in enumerate(LEAD_BUCKET_HOURS):
        if hours < bound:
            return index
    return len(LEAD_BUCKET_HOURS)


def effective_span(row: BookingRow) -> tuple[datetime, datetime] | None:
    """The part of the booked window the instrument was really used, or None (docs/metrics.md, 'effective')."""
    if row.checked_in_at is not None:
        lo = max(row.starts_at, row.checked_in_at)
        hi = min(row.ends_at, row.checked_out_at or row.ends_at)
        return (lo, hi) if hi > lo else None
    if row.no_show:
        return None
    return row.starts_at, row.ends_at


@dataclass
class _Totals:
    values: dict[str, int] = field(default_factory=dict)

    def add(self, column: str, amount: int) -> None:
        if amount:
            self.values[column] = self.values.get(column, 0) + amount


InstrumentKey = tuple[int, date]
FacilityKey = tuple[int, date, str, int]


@dataclass
class Contributions:
    """Summed statistics rows, keyed as the tables are, with their descriptive columns."""

    instrument: dict[InstrumentKey, _Totals] = field(default_factory=dict)
    facility: dict[FacilityKey, _Totals] = field(default_factory=dict)
    instrument_info: dict[int, tuple[int, int, str]] = field(default_factory=dict)
    facility_info: dict[int, tuple[int, str]] = field(default_factory=dict)

    def _inst(self, row: BookingRow, day: date) -> _Totals:
        return self.instrument.setdefault((row.instrument_id, day), _Totals())

    def _fac(self, row: BookingRow, day: date, internal: int) -> _Totals:
        return self.facility.setdefault((row.facility_id, day, row.user_region_code, internal), _Totals())

    def add(self, row: BookingRow, tz: ZoneInfo) -> None:
        """Add what one booking contributes (nothing for cancelled or pending ones)."""
        if row.status not in COUNTED_STATUSES or row.ends_at <= row.starts_at:
            return
        self.instrument_info[row.instrument_id] = (row.facility_id, row.institution_id, row.region_code)
        self.facility_info[row.facility_id] = (row.institution_id, row.region_code)
        if row.kind == BookingKind.maintenance.value:
            for day, lo, hi in local_days(row.starts_at, row.ends_at, tz):
                minutes = int((hi - lo).total_seconds()) // 60
                self._inst(row, day).add("maintenance_min", minutes)
                self._fac(row, day, 1).add("maintenance_min", minutes)
            return
        internal = int(row.user_institution_id == row.institution_id)
        other_region = row.user_region_code != row.region_code
        start_day = row.starts_at.astimezone(tz).date()
        inst, fac = self._inst(row, start_day), self._fac(row, start_day, internal)
        for totals in (inst, fac):
            totals.add("bookings", 1)
            totals.add("no_shows", int(row.no_show))
        fac.add(LEAD_COLUMNS[lead_bucket(row.created_at, row.starts_at)], 1)
        for day, lo, hi in local_days(row.starts_at, row.ends_at, tz):
            minutes = int((hi - lo).total_seconds()) // 60
            self._inst(row, day).add("booked_min", minutes)
            self._fac(row, day, internal).add("booked_min", minutes)
        for day, hour, minutes in _hour_pieces(row.starts_at, row.ends_at, tz):
            self._fac(row, day, internal).add(HOUR_COLUMNS[hour], minutes)
        span = effective_span(row)
        if span is None:
            return
        for day, lo, hi in local_days(span[0], span[1], tz):
            minutes = int((hi - lo).total_seconds()) // 60
            totals = self._inst(row, day)
            totals.add("effective_min", minutes)
            if not internal:
                totals.add("ext_institution_min", minutes)
            if other_region:
                totals.add("ext_region_min", minutes)
            self._fac(row, day, internal).add("effective_min", minutes)

    def instrument_rows(self) -> list[dict[str, Any]]:
        rows = []
        for (instrument_id, day), totals in self.instrument.items():
            facility_id, institution_id, region_code = self.instrument_info[instrument_id]
            rows.append({"instrument_id": instrument_id, "day": day, "facility_id": facility_id,
                         "institution_id": institution_id, "region_code": region_code, **_zeros(_INSTRUMENT_MEASURES),
                         **totals.values})
        return rows

    def facility_rows(self) -> list[dict[str, Any]]:
        rows = []
        for (facility_id, day, user_region, internal), totals in self.facility.items():
            institution_id, region_code = self.facility_info[facility_id]
            rows.append({"facility_id": facility_id, "day": day, "user_region_code": user_region,
                         "internal": internal, "institution_id": institution_id, "region_code": region_code,
                         "weekday": day.weekday(), **_zeros(_FACILITY_MEASURES), **totals.values})
        return rows


_INSTRUMENT_MEASURES = ("bookings", "booked_min", "effective_min", "ext_institution_min", "ext_region_min",
                        "maintenance_min", "no_shows")
_FACILITY_MEASURES = ("bookings", "booked_min", "effective_min", "maintenance_min", "no_shows",
                      *HOUR_COLUMNS, *LEAD_COLUMNS)


def _zeros(columns: Iterable[str]) -> dict[str, int]:
    return dict.fromkeys(columns, 0)


def contributions(rows: Iterable[BookingRow], tz: ZoneInfo | None = None) -> Contributions:
    """Sum what `rows` contribute to the statistics tables."""
    tz = tz or zone()
    result = Contributions()
    for row in rows:
        result.add(row, tz)
    return result


# --------------------------------------------------------------------------------------------- reading bookings

_Booker = aliased(User)


def _booking_rows_query() -> Any:
    return (
        select(
            Booking.instrument_id, Instrument.facility_id, Instrument.institution_id, Instrument.region_code,
            _Booker.institution_id, _Booker.region_code, Booking.starts_at, Booking.ends_at, Booking.status,
            Booking.kind, Booking.created_at, Booking.checked_in_at, Booking.checked_out_at, Booking.no_show,
        )
        .join(Instrument, Instrument.id == Booking.instrument_id)
        .join(_Booker, _Booker.id == Booking.user_id)
        .where(Booking.status.in_(COUNTED_STATUSES))
    )


def _as_rows(result: Iterable[Sequence[Any]]) -> Iterator[BookingRow]:
    for r in result:
        yield BookingRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], str(r[8]), str(r[9]), r[10], r[11],
                         r[12], bool(r[13]))


def bookings_of_facility_days(session: Session, facility_id: int, first: date, last: date,
                              tz: ZoneInfo) -> list[BookingRow]:
    """The counted bookings of a facility's instruments that touch local days first … last."""
    lo, hi = _day_start(first, tz), _day_start(last + timedelta(days=1), tz)
    stmt = _booking_rows_query().where(
        Instrument.facility_id == facility_id, Booking.starts_at < hi, Booking.ends_at > lo
    )
    return list(_as_rows(session.execute(stmt)))


# --------------------------------------------------------------------------------------------- dirty marking


def _days_of(start: Any, end: Any, tz: ZoneInfo) -> list[date]:
    if not isinstance(start, datetime) or not isinstance(end, datetime) or end <= start:
        return []
    start, end = start.astimezone(UTC) if start.tzinfo else start.replace(tzinfo=UTC), (
        end.astimezone(UTC) if end.tzinfo else end.replace(tzinfo=UTC))
    return [day for day, _lo, _hi in local_days(start, end, tz)]


def _old(booking: Booking, attribute: str) -> Any:
    history = get_history(booking, attribute)
    if history.deleted:
        return history.deleted[0]
    return getattr(booking, attribute)


def mark_changed(session: Session) -> None:
    """After a flush: mark the instrument-days of the bookings it wrote dirty (before and after the change)."""
    keys: set[tuple[int, date]] = set()
    moved: list[int] = []
    tz: ZoneInfo | None = None
    for obj in (*session.new, *session.dirty, *session.deleted):
        if isinstance(obj, Instrument) and obj in session.dirty and obj.id is not None and any(
                get_history(obj, name).has_changes() for name in _PLACEMENT):
            moved.append(obj.id)
            continue
        if not isinstance(obj, Booking):
            continue
        if obj in session.dirty and not session.is_modified(obj, include_collections=False):
            continue
        tz = tz or zone()
        spans = [(obj.instrument_id, obj.starts_at, obj.ends_at)]
        if obj not in session.new:
            spans.append((_old(obj, "instrument_id"), _old(obj, "starts_at"), _old(obj, "ends_at")))
        for instrument_id, start, end in spans:
            if instrument_id is None:
                continue
            keys.update((int(instrument_id), day) for day in _days_of(start, end, tz))
    if keys:
        upsert_dirty(session.connection(), sorted(keys))
    if moved:
        _mark_every_day_of(session.connection(), sorted(moved))


# An instrument moved to another facility, institution or region: all its days are attributed anew.
_PLACEMENT = ("facility_id", "institution_id", "region_code")


def _mark_every_day_of(connection: Connection, instrument_ids: Sequence[int]) -> None:
    """Mark every day the instruments have statistics for (after a move, each must be attributed anew)."""
    dialect: Any = postgresql if connection.dialect.name == "postgresql" else sqlite
    days = select(StatInstrumentDay.instrument_id, StatInstrumentDay.day, literal(utcnow(), UTCDateTime())).where(
        StatInstrumentDay.instrument_id.in_(instrument_ids))
    stmt = dialect.insert(StatDirty).from_select(["instrument_id", "day", "marked_at"], days)
    connection.execute(stmt.on_conflict_do_update(
        index_elements=["instrument_id", "day"], set_={"marked_at": stmt.excluded.marked_at}))


def upsert_dirty(connection: Connection, keys: Sequence[tuple[int, date]]) -> None:
    """Mark instrument-days dirty (re-marking one moves its time forward)."""
    now = utcnow()
    rows = [{"instrument_id": i, "day": d, "marked_at": now} for i, d in keys]
    dialect: Any = postgresql if connection.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(StatDirty)
    stmt = stmt.on_conflict_do_update(
        index_elements=["instrument_id", "day"], set_={"marked_at": stmt.excluded.marked_at}
    )
    connection.execute(stmt, rows)


# --------------------------------------------------------------------------------------------- refresh


def pending(session: Session) -> int:
    """How many instrument-days wait to be recomputed."""
    return int(session.scalar(select(func.count()).select_from(StatDirty)) or 0)


@dataclass(frozen=True)
class TableStatus:
    """How current the statistics tables are."""

    pending_marks: int
    oldest_mark_at: datetime | None
    instrument_day_rows: int
    facility_day_rows: int
    first_day: date | None
    last_day: date | None
    last_refresh_job_at: datetime | None


def table_status(session: Session) -> TableStatus:
    """Pending dirty marks, rows in each table, the days covered, and when the periodic refresh last finished."""
    from labcommons.notifications.models import Job, JobStatus

    pending_marks, oldest = session.execute(select(func.count(), func.min(StatDirty.marked_at))).one()
    inst_rows, first_day, last_day = session.execute(
        select(func.count(), func.min(StatInstrumentDay.day), func.max(StatInstrumentDay.day))).one()
    fac_rows = session.scalar(select(func.count()).select_from(StatFacilityDay)) or 0
    last_job = session.scalar(select(func.max(Job.finished_at)).where(
        Job.kind == "stat_refresh", Job.status == JobStatus.done))
    return TableStatus(int(pending_marks or 0), oldest, int(inst_rows or 0), int(fac_rows), first_day, last_day,
                       last_job)


def has_pending(session: Session) -> bool:
    """Whether any instrument-day waits to be recomputed (one indexed read)."""
    return session.scalar(select(StatDirty.instrument_id).limit(1)) is not None


def _facility_ranges(days: dict[int, set[date]]) -> Iterator[tuple[int, date, date, set[date]]]:
    """Per facility, runs of days close enough together to read in one query."""
    for facility_id, wanted in sorted(days.items()):
        ordered = sorted(wanted)
        run = [ordered[0]]
        for day in ordered[1:]:
            if (day - run[-1]).days > 7:
                yield facility_id, run[0], run[-1], set(run)
                run = []
            run.append(day)
        yield facility_id, run[0], run[-1], set(run)


def recompute_facility_days(session: Session, days: dict[int, set[date]], tz: ZoneInfo | None = None) -> int:
    """Replace the statistics of the given days of the given facilities with what their bookings say now."""
    tz = tz or zone()
    written = 0
    touched: set[date] = set()
    for facility_id, first, last, wanted in _facility_ranges(days):
        sums = contributions(bookings_of_facility_days(session, facility_id, first, last, tz), tz)
        day_list = sorted(wanted)
        session.execute(delete(StatFacilityDay).where(
            StatFacilityDay.facility_id == facility_id, StatFacilityDay.day.in_(day_list)))
        # Also the rows an instrument of this facility left under a facility it was moved from (a catalogue import
        # may move it): the insert below would collide with them.
        # (Two statements, not one with OR: each then uses its index instead of scanning the table.)
        moved_in = select(Instrument.id).where(Instrument.facility_id == facility_id)
        session.execute(delete(StatInstrumentDay).where(
            StatInstrumentDay.facility_id == facility_id, StatInstrumentDay.day.in_(day_list)))
        session.execute(delete(StatInstrumentDay).where(
            StatInstrumentDay.instrument_id.in_(moved_in), StatInstrumentDay.day.in_(day_list)))
        inst_rows = [r for r in sums.instrument_rows() if r["day"] in wanted]
        fac_rows = [r for r in sums.facility_rows() if r["day"] in wanted]
        if inst_rows:
            session.execute(insert(StatInstrumentDay), inst_rows)
        if fac_rows:
            session.execute(insert(StatFacilityDay), fac_rows)
        recompute_months(session, facility_id, {d.replace(day=1) for d in wanted})
        written += len(wanted)
        touched.update(wanted)
    recompute_region_days(session, touched)
    return written


_DAY_KEY = ("region_code", "day", "user_region_code", "internal")
_DAY_MEASURES = ("bookings", "booked_min", "effective_min", "maintenance_min", "no_shows", *HOUR_COLUMNS,
                 *LEAD_COLUMNS)


def recompute_region_days(session: Session, days: Iterable[date] | None = None) -> None:
    """Replace the `stat_region_day` rows of `days` (every day when None) with sums of the facility-days. Every
    region's: a facility moved to another region leaves both regions' days to recompute."""
    f = StatFacilityDay
    sums = select(*(getattr(f, k) for k in _DAY_KEY), func.min(f.weekday),
                  *(func.sum(getattr(f, m)) for m in _DAY_MEASURES)).group_by(*(getattr(f, k) for k in _DAY_KEY))
    target = ["region_code", "day", "user_region_code", "internal", "weekday", *_DAY_MEASURES]
    if days is None:
        session.execute(delete(StatRegionDay))
        session.execute(insert(StatRegionDay).from_select(target, sums))
        return
    for chunk in _chunks(sorted(set(days)), 500):
        session.execute(delete(StatRegionDay).where(StatRegionDay.day.in_(chunk)))
        session.execute(insert(StatRegionDay).from_select(target, sums.where(f.day.in_(chunk))))


def month_end(month: date) -> date:
    """The last day of the month that `month` lies in."""
    return (month.replace(day=28) + timedelta(days=4)).replace(day=1) - timedelta(days=1)


_MONTH_MEASURES = ("bookings", "booked_min", "effective_min", "ext_institution_min", "ext_region_min",
                   "maintenance_min", "no_shows")


def recompute_months(session: Session, facility_id: int, months: Iterable[date]) -> None:
    """Replace the facility's `stat_instrument_month` rows of `months` (first days) with sums of its day rows."""
    i = StatInstrumentDay
    moved_in = select(Instrument.id).where(Instrument.facility_id == facility_id)
    for month in sorted(months):
        session.execute(delete(StatInstrumentMonth).where(
            StatInstrumentMonth.facility_id == facility_id, StatInstrumentMonth.month == month))
        session.execute(delete(StatInstrumentMonth).where(
            StatInstrumentMonth.instrument_id.in_(moved_in), StatInstrumentMonth.month == month))
        sums = select(
            i.instrument_id, literal(month, Date()), func.max(i.facility_id), func.max(i.institution_id),
            func.max(i.region_code), *(func.sum(getattr(i, m)) for m in _MONTH_MEASURES),
        ).where(i.facility_id == facility_id, i.day.between(month, month_end(month))).group_by(i.instrument_id)
        session.execute(insert(StatInstrumentMonth).from_select(
            ["instrument_id", "month", "facility_id", "institution_id", "region_code", *_MONTH_MEASURES], sums))


def refresh(db: Database, *, limit: int | None = None) -> int:
    """Recompute the facility-days of dirty marks until none is left (or `limit` marks); how many were done."""
    done = 0
    while limit is None or done < limit:
        batch = REFRESH_BATCH if limit is None else min(REFRESH_BATCH, limit - done)
        with db.unit_of_work() as session:
            count = _refresh_batch(session, batch)
        done += count
        if count < batch:
            break
    return done


def _refresh_batch(session: Session, batch: int) -> int:
    is_pg = session.get_bind().dialect.name == "postgresql"
    if is_pg:
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _REFRESH_LOCK})
    stmt = select(StatDirty.instrument_id, StatDirty.day).order_by(StatDirty.instrument_id, StatDirty.day).limit(batch)
    if is_pg:
        stmt = stmt.with_for_update(skip_locked=True)
    keys = [(int(i), d) for i, d in session.execute(stmt)]
    if not keys:
        return 0
    instrument_ids = sorted({i for i, _d in keys})
    facility_of = {int(i): int(f) for i, f in session.execute(
        select(Instrument.id, Instrument.facility_id).where(Instrument.id.in_(instrument_ids)))}
    days: dict[int, set[date]] = {}
    for instrument_id, day in keys:
        facility_id = facility_of.get(instrument_id)
        if facility_id is not None:
            days.setdefault(facility_id, set()).add(day)
    # The facility an instrument was moved away from still counts it on these days: recompute that one too.
    for chunk in _chunks(keys, 500):
        for instrument_id, day, facility_id in session.execute(
                select(StatInstrumentDay.instrument_id, StatInstrumentDay.day, StatInstrumentDay.facility_id)
                .where(tuple_(StatInstrumentDay.instrument_id, StatInstrumentDay.day).in_(chunk))):
            if facility_of.get(int(instrument_id)) != facility_id:
                days.setdefault(int(facility_id), set()).add(day)
    recompute_facility_days(session, days)
    for chunk in _chunks(keys, 500):
        session.execute(delete(StatDirty).where(tuple_(StatDirty.instrument_id, StatDirty.day).in_(chunk)))
    return len(keys)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def ensure_current(db: Database) -> int:
    """Fold every committed booking change into the statistics before they are read; how many marks were done."""
    with db.session() as session:
        if not has_pending(session):
            return 0
    return refresh(db)


@jobs.handler("stat_refresh")
def _refresh_job(session: Session, _payload: dict[str, Any]) -> None:
    refresh(Database(session.get_bind()))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- rebuild

Progress = Callable[[int, int], None]


def rebuild(db: Database, *, progress: Progress | None = None) -> tuple[int, int]:
    """Recompute both tables from every booking; (instrument-day rows, facility-day rows) written."""
    tz = zone()
    notify = progress or (lambda _done, _total: None)
    with db.session() as session:
        facilities = list(session.scalars(select(Instrument.facility_id).distinct().order_by(Instrument.facility_id)))
    written = [0, 0]
    with db.unit_of_work() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _REFRESH_LOCK})
        session.execute(delete(StatDirty))
        session.execute(delete(StatInstrumentDay))
        session.execute(delete(StatFacilityDay))
        session.execute(delete(StatInstrumentMonth))
        for done, facility_id in enumerate(facilities, 1):
            stmt = _booking_rows_query().where(Instrument.facility_id == facility_id)
            sums = contributions(_as_rows(session.execute(stmt)), tz)
            inst_rows, fac_rows = sums.instrument_rows(), sums.facility_rows()
            for chunk in _chunks(inst_rows, 5000):
                session.execute(insert(StatInstrumentDay), list(chunk))
            for chunk in _chunks(fac_rows, 5000):
                session.execute(insert(StatFacilityDay), list(chunk))
            recompute_months(session, facility_id, {r["day"].replace(day=1) for r in inst_rows})
            written[0] += len(inst_rows)
            written[1] += len(fac_rows)
            notify(done, len(facilities))
        recompute_region_days(session)
    return written[0], written[1]


def period_bounds(first: date, last: date, tz: ZoneInfo | None = None) -> tuple[datetime, datetime]:
    """UTC bounds of local days first … last."""
    tz = tz or zone()
    return _day_start(first, tz), _day_start(last + timedelta(days=1), tz)

