"""A year of demo usage, so the statistics dashboards of a fresh demo show something: past bookings on the demo's
instruments by users of both regions (weekdays busier, 09:00–18:00 peaks, some evenings), about 5 % no-shows,
check-ins for part of them with actual use shorter than booked, a few maintenance blocks, and past service orders
delivered and rated. Deterministic for a seed and a moment.

Rows go in as bulk inserts and the days they touch are marked for the statistics in the same transaction, exactly
as the booking flush listener would; `aggregate.ensure_current` (or `rebuild`) folds them in after the commit.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from labcommons.booking.models import Booking, BookingKind, BookingStatus
from labcommons.catalog.models import Facility, Instrument, InstrumentStatus, OpenTo, Service
from labcommons.db import utcnow
from labcommons.identity.models import Role, RoleGrant, User
from labcommons.orders.models import OrderEvent, OrderRating, OrderStatus, ServiceOrder
from labcommons.reporting import aggregate

DAYS = 365
SEEDED_BEFORE = timedelta(days=70)
# How likely an instrument is booked on a weekday (Monday first), before its own popularity.
WEEKDAY_WEIGHT = (1.0, 1.0, 0.95, 0.95, 0.85, 0.3, 0.15)
# Local start hours and how often bookings start in each: morning and afternoon peaks, some evenings.
START_HOURS = (8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21)
START_WEIGHTS = (2, 9, 9, 6, 2, 5, 9, 7, 4, 2, 2, 1.5, 1, 0.5)
NO_SHOW_SHARE = 0.05
CANCELLED_SHARE = 0.06
CHECKED_IN_SHARE = 0.65
PURPOSES = (
    "小鼠脑切片空间转录组", "Tumour microenvironment imaging", "全基因组重测序 30X", "Cryo-EM grid screening",
    "类器官活细胞成像", "Metabolomics of plasma samples", "单细胞文库质检", "Batch flow sorting of T cells",
    "斑马鱼胚胎光片成像", "Protein structure refinement (HPC)", "材料断口形貌观察", "Routine QC run", "", "",
)
MAINTENANCE_REASONS = ("年度预防性维护 / Annual preventive maintenance", "光路校准 / Optical alignment",
                       "软件升级与验证 / Software upgrade and validation")
ORDER_COMMENTS = ("报告清晰，周期比预期短。", "Clear report, delivered on time.", "数据质量很好。",
                  "Helpful staff; one sample had to be re-run.", "", "")


@dataclass
class HistorySeed:
    """What the year of history added."""

    bookings: int = 0
    no_shows: int = 0
    checked_in: int = 0
    maintenance: int = 0
    orders: int = 0
    ratings: int = 0
    marks: int = 0


def _zone() -> ZoneInfo:
    return aggregate.zone()


def seed_history(session: Session, *, now: datetime | None = None, rng_seed: int = 11,
                 days: int = DAYS) -> HistorySeed:
    """Add `days` days of past bookings and delivered orders before `now` to the demo (does nothing twice)."""
    result = HistorySeed()
    now = (now or utcnow()).astimezone(UTC)
    # The rest of the demo books no further back than last month, so anything older is this history.
    if session.scalar(select(Booking.id).where(Booking.starts_at < now - SEEDED_BEFORE).limit(1)) is not None:
        return result
    rng = random.Random(rng_seed)
    tz = _zone()
    today = now.astimezone(tz).date()
    first_day = today - timedelta(days=days)
    instruments = list(session.scalars(select(Instrument).where(Instrument.status != InstrumentStatus.retired)
                                       .order_by(Instrument.id)))
    users = list(session.scalars(select(User).where(User.institution_id.is_not(None)).order_by(User.id)))
    if not instruments or not users:
        return result
    staff = _staff_by_facility(session)
    taken = _taken(session, [i.id for i in instruments])
    rows: list[dict[str, Any]] = []
    for instrument in instruments:
        pool = _bookers(instrument, users)
        if not pool:
            continue
        rows.extend(_instrument_history(rng, instrument, pool, first_day, today, tz, now,
                                        taken.setdefault(instrument.id, []), result))
        rows.extend(_maintenance(rng, instrument, staff.get(instrument.facility_id) or pool[0][0], first_day, today,
                                 tz, now, taken[instrument.id], result))
    if rows:
        session.execute(insert(Booking), rows)
        keys = sorted({(row["instrument_id"], day) for row in rows
                       for day, _lo, _hi in aggregate.local_days(row["starts_at"], row["ends_at"], tz)})
        aggregate.upsert_dirty(session.connection(), keys)
        result.marks = len(keys)
    result.bookings = sum(1 for row in rows if row["kind"] == BookingKind.use.value)
    _orders(session, rng, first_day, today, tz, now, users, staff, result)
    session.flush()
    return result


def _staff_by_facility(session: Session) -> dict[int, int]:
    """A staff member or manager of each facility that has one (the holder of its maintenance blocks)."""
    out: dict[int, int] = {}
    for facility_id, user_id in session.execute(
        select(RoleGrant.facility_id, RoleGrant.user_id)
        .where(RoleGrant.role.in_([Role.facility_staff, Role.facility_manager]), RoleGrant.facility_id.is_not(None))
        .order_by(RoleGrant.id)
    ):
        if facility_id is not None:
            out.setdefault(int(facility_id), int(user_id))
    return out


def _taken(session: Session, instrument_ids: list[int]) -> dict[int, list[tuple[datetime, datetime]]]:
    """Existing bookings' intervals per instrument (other demo parts book last month and the coming weeks)."""
    spans: dict[int, list[tuple[datetime, datetime]]] = {}
    for instrument_id, starts_at, ends_at in session.execute(
        select(Booking.instrument_id, Booking.starts_at, Booking.ends_at)
        .where(Booking.instrument_id.in_(instrument_ids), Booking.status != BookingStatus.cancelled)
        .order_by(Booking.instrument_id, Booking.starts_at)
    ):
        spans.setdefault(int(instrument_id), []).append((starts_at, ends_at))
    return spans


def _bookers(instrument: Instrument, users: list[User]) -> list[tuple[int, float]]:
    """Who may book the instrument, with weights: its own institution most, its region next, then the other one."""
    out = []
    for user in users:
        internal = user.institution_id == instrument.institution_id
        same_region = user.region_code == instrument.region_code
        if instrument.open_to == OpenTo.institution and not internal:
            continue
        if instrument.open_to == OpenTo.region and not same_region:
            continue
        out.append((user.id, 3.0 if internal else 1.5 if same_region else 1.0))
    return out


def _free(spans: list[tuple[datetime, datetime]], start: datetime, end: datetime) -> bool:
    index = bisect.bisect_left(spans, (end, end))
    # Spans are sorted and never overlap each other, so only the one starting just before `end` can reach in.
    return index == 0 or spans[index - 1][1] <= start


def _instrument_history(
    rng: random.Random, instrument: Instrument, pool: list[tuple[int, float]], first_day: Any, today: Any,
    tz: ZoneInfo, now: datetime, spans: list[tuple[datetime, datetime]], result: HistorySeed,
) -> list[dict[str, Any]]:
    slot = instrument.slot_minutes
    shortest = max(instrument.min_booking_minutes, slot)
    longest = max(shortest, min(instrument.max_booking_minutes, 480 if shortest < 480 else shortest * 2))
    popularity = 0.2 + rng.random() * 0.7
    # Day-long runs (HPC partitions, animal rooms) come a few times a week, not several times a day.
    per_day = 0.35 if shortest >= 1440 else 1.6 if shortest <= 60 else 1.0
    user_ids = [u for u, _w in pool]
    weights = [w for _u, w in pool]
    rows: list[dict[str, Any]] = []
    day = first_day
    while day < today:
        midnight = datetime.combine(day, time(), tz)
        expected = per_day * popularity * WEEKDAY_WEIGHT[day.weekday()]
        count = int(expected) + (1 if rng.random() < expected - int(expected) else 0)
        hours = sorted(rng.choices(START_HOURS, START_WEIGHTS, k=count))
        for hour in hours:
            minute = hour * 60 + rng.choice((0, 0, 15, 30, 45))
            minute -= minute % slot
            length = shortest + slot * int(rng.random() * ((longest - shortest) // slot + 1))
            starts_at = (midnight + timedelta(minutes=minute)).astimezone(UTC)
            ends_at = starts_at + timedelta(minutes=length)
            if ends_at > now or not _free(spans, starts_at, ends_at):
                continue
            bisect.insort(spans, (starts_at, ends_at))
            rows.append(_use_row(rng, instrument.id, rng.choices(user_ids, weights)[0], starts_at, ends_at, result))
        day += timedelta(days=1)
    return rows


def _use_row(rng: random.Random, instrument_id: int, user_id: int, starts_at: datetime, ends_at: datetime,
             result: HistorySeed) -> dict[str, Any]:
    lead_hours = rng.choice((2, 6, 20, 30, 50, 80, 120, 200, 400))
    created_at = starts_at - timedelta(hours=lead_hours * (0.5 + rng.random()))
    row: dict[str, Any] = {
        "instrument_id": instrument_id, "user_id": user_id, "starts_at": starts_at, "ends_at": ends_at,
        "status": BookingStatus.completed.value, "purpose": rng.choice(PURPOSES), "created_at": created_at,
        "cancelled_at": None, "cancel_kind": None, "kind": BookingKind.use.value, "checked_in_at": None,
        "checked_out_at": None, "no_show": False,
    }
    roll = rng.random()
    if roll < CANCELLED_SHARE:
        row.update(status=BookingStatus.cancelled.value, cancel_kind="user",
                   cancelled_at=created_at + (starts_at - created_at) * rng.random())
    elif roll < CANCELLED_SHARE + NO_SHOW_SHARE:
        # As booking.usage records a no-show: the booking stays confirmed, flagged, never checked in.
        row.update(status=BookingStatus.confirmed.value, no_show=True)
        result.no_shows += 1
    elif roll < CANCELLED_SHARE + NO_SHOW_SHARE + CHECKED_IN_SHARE:
        length = int((ends_at - starts_at).total_seconds()) // 60
        # Up to 10 minutes early or a quarter of the booking late; up to a third left unused at the end.
        checked_in_at = starts_at + timedelta(minutes=rng.randint(-10, min(15, length // 4)))
        unused = int(rng.random() * min(length // 3, 120))
        row.update(checked_in_at=checked_in_at, checked_out_at=ends_at - timedelta(minutes=unused))
        result.checked_in += 1
    return row


def _maintenance(
    rng: random.Random, instrument: Instrument, holder: int, first_day: Any, today: Any, tz: ZoneInfo,
    now: datetime, spans: list[tuple[datetime, datetime]], result: HistorySeed,
) -> list[dict[str, Any]]:
    """One or two blocks a year on about half the instruments, placed where nothing else was booked."""
    rows: list[dict[str, Any]] = []
    if rng.random() < 0.5:
        return rows
    for _ in range(rng.randint(1, 2)):
        for _attempt in range(30):
            day = first_day + timedelta(days=rng.randrange((today - first_day).days))
            starts_at = datetime.combine(day, time(9), tz).astimezone(UTC)
            ends_at = starts_at + timedelta(hours=8 * rng.choice((1, 1, 2)) + (16 if rng.random() < 0.3 else 0))
            if ends_at <= now and _free(spans, starts_at, ends_at):
                bisect.insort(spans, (starts_at, ends_at))
                rows.append({
                    "instrument_id": instrument.id, "user_id": holder, "starts_at": starts_at, "ends_at": ends_at,
                    "status": BookingStatus.completed.value, "purpose": rng.choice(MAINTENANCE_REASONS),
                    "created_at": starts_at - timedelta(days=14), "cancelled_at": None, "cancel_kind": None,
                    "kind": BookingKind.maintenance.value, "checked_in_at": None, "checked_out_at": None,
                    "no_show": False,
                })
                result.maintenance += 1
                break
    return rows


def _orders(session: Session, rng: random.Random, first_day: Any, today: Any, tz: ZoneInfo, now: datetime,
            users: list[User], staff: dict[int, int], result: HistorySeed) -> None:
    """Orders submitted over the year, each delivered after a few days to weeks, most of them rated."""
    services = list(session.execute(
        select(Service.id, Service.facility_id, Service.turnaround_days, Service.name_zh, Service.name_en,
               Facility.institution_id)
        .join(Facility, Facility.id == Service.facility_id)
        .where(Service.is_active.is_(True)).order_by(Service.id)))
    if not services:
        return
    span_days = (today - first_day).days
    for _ in range(max(24, span_days // 5)):
        service_id, facility_id, turnaround, name_zh, name_en, institution_id = rng.choice(services)
        customers = [u for u in users if u.institution_id != institution_id] or users
        customer = rng.choice(customers)
        day = first_day + timedelta(days=rng.randrange(span_days))
        submitted = datetime.combine(day, time(9 + rng.randrange(8), rng.choice((0, 15, 30, 45))), tz).astimezone(UTC)
        days = max(1.0, (turnaround or 10) * (0.6 + rng.random() * 0.9))
        delivered = submitted + timedelta(days=days)
        closed = delivered + timedelta(days=rng.random() * 4)
        if closed > now:
            continue
        title = name_zh if customer.region_code == "CQ" else name_en
        order = ServiceOrder(
            service_id=service_id, facility_id=facility_id, user_id=customer.id, status=OrderStatus.closed,
            version=8, title=title[:200], description="Demo history order.", sample_count=rng.randint(1, 12),
            created_at=submitted - timedelta(hours=2), updated_at=closed, submitted_at=submitted, closed_at=closed,
        )
        session.add(order)
        session.flush()
        order.number = f"SO-{order.created_at.year}-{order.id:06d}"
        worker = staff.get(facility_id)
        steps = (
            (None, OrderStatus.draft, order.created_at, customer.id),
            (OrderStatus.draft, OrderStatus.submitted, submitted, customer.id),
            (OrderStatus.submitted, OrderStatus.quoted, submitted + (delivered - submitted) * 0.1, worker),
            (OrderStatus.quoted, OrderStatus.accepted, submitted + (delivered - submitted) * 0.15, customer.id),
            (OrderStatus.accepted, OrderStatus.samples_received, submitted + (delivered - submitted) * 0.25, worker),
            (OrderStatus.samples_received, OrderStatus.in_progress, submitted + (delivered - submitted) * 0.3, worker),
            (OrderStatus.in_progress, OrderStatus.results_delivered, delivered, worker),
            (OrderStatus.results_delivered, OrderStatus.closed, closed, customer.id),
        )
        for version, (before, after, at, actor_id) in enumerate(steps, 1):
            session.add(OrderEvent(order_id=order.id, version=version, from_status=before, to_status=after,
                                   actor_id=actor_id, at=at))
        result.orders += 1
        if rng.random() < 0.8:
            score = rng.choices((5, 4, 3, 2), (6, 3, 1, 0.3))[0]
            session.add(OrderRating(order_id=order.id, service_id=service_id, user_id=customer.id, score=score,
                                    comment=rng.choice(ORDER_COMMENTS), created_at=closed))
            result.ratings += 1
