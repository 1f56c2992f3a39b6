"""Booking rules: reserving and cancelling time, availability and the earliest free slot.

The no-overlap invariant is enforced by the database (see the first migration); this module turns the
database's refusal into `OverlappingBooking` and checks every other rule before it writes.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, literal_column, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from labcommons.actor import Actor
from labcommons.booking import policy, waitlist
from labcommons.booking.models import ACTIVE_STATUSES, Booking, BookingKind, BookingStatus
from labcommons.catalog import service as catalog
from labcommons.catalog.models import Instrument, InstrumentStatus
from labcommons.db import add_minutes, utcnow
from labcommons.errors import Conflict, InvalidInput, NotFound
from labcommons.notifications.service import notify
from labcommons.pagination import decode_cursor, encode_cursor

MAX_PURPOSE_LENGTH = 2000
# Availability and calendars are asked for at most this far in one call.
MAX_WINDOW = timedelta(days=62)


class OverlappingBooking(Conflict):
    """The requested time overlaps an active booking of the same instrument."""

    code = "overlapping_booking"


class BookingNotCancellable(Conflict):
    code = "booking_not_cancellable"


@dataclass(frozen=True)
class Interval:
    starts_at: datetime
    ends_at: datetime


@dataclass(frozen=True)
class Availability:
    instrument_id: int
    window: Interval
    free: list[Interval]
    busy: list[Interval]


@dataclass(frozen=True)
class Slot:
    instrument: Instrument
    starts_at: datetime
    ends_at: datetime


def busy_during(instrument_id: Any, start: datetime, end: datetime) -> ColumnElement[bool]:
    """SQL: the instrument has an active booking overlapping [start, end)."""
    return exists().where(
        Booking.instrument_id == instrument_id,
        Booking.status.in_(ACTIVE_STATUSES),
        Booking.starts_at < end,
        Booking.ends_at > start,
    )


def _minutes_since_epoch(moment: datetime) -> float:
    return moment.timestamp() / 60


def on_grid(moment: datetime, slot_minutes: int) -> bool:
    """Whether a time falls on an instrument's slot grid, counted in whole minutes from 1970-01-01 UTC.

    For grids that divide eight hours this is the same as counting from midnight in Asia/Shanghai.
    """
    minutes = _minutes_since_epoch(moment)
    return minutes == int(minutes) and int(minutes) % slot_minutes == 0


def align_up(moment: datetime, slot_minutes: int) -> datetime:
    """The first grid point at or after `moment`."""
    step = slot_minutes * 60
    seconds = moment.timestamp()
    aligned = -(-seconds // step) * step
    return datetime.fromtimestamp(aligned, UTC)


def check_booking_request(
    instrument: Instrument, actor: Actor, starts_at: datetime, ends_at: datetime, purpose: str,
    *, now: datetime,
) -> None:
    """Every rule a new booking must satisfy short of overlap; raises InvalidInput naming the field."""
    if ends_at <= starts_at:
        raise InvalidInput("The end must be after the start.", field="ends_at", code="ends_before_start")
    if starts_at < now:
        raise InvalidInput("The start is in the past.", field="starts_at", code="starts_in_past")
    if instrument.status != InstrumentStatus.active:
        raise InvalidInput(
            f"The instrument is not bookable: it is {instrument.status.value}.", field="instrument_id",
            code="instrument_not_active",
        )
    if not catalog.instrument_is_open_to(instrument, actor.institution_id, actor.region_code):
        scope = {"institution": "its own institution", "region": "its own region"}[instrument.open_to.value]
        raise InvalidInput(
            f"The instrument is open only to users of {scope}.", field="instrument_id",
            code="not_open_to_user",
        )
    slot = instrument.slot_minutes
    for name, moment in (("starts_at", starts_at), ("ends_at", ends_at)):
        if not on_grid(moment, slot):
            raise InvalidInput(
                f"{name} must fall on the instrument's {slot}-minute slot grid.", field=name,
                code="off_slot_grid", slot_minutes=slot,
            )
    minutes = int((ends_at - starts_at).total_seconds() // 60)
    if minutes < instrument.min_booking_minutes:
        raise InvalidInput(
            f"A booking must last at least {instrument.min_booking_minutes} minutes.", field="ends_at",
            code="booking_too_short", min_booking_minutes=instrument.min_booking_minutes,
        )
    if minutes > instrument.max_booking_minutes:
        raise InvalidInput(
            f"A booking may last at most {instrument.max_booking_minutes} minutes.", field="ends_at",
            code="booking_too_long", max_booking_minutes=instrument.max_booking_minutes,
        )
    if len(purpose) > MAX_PURPOSE_LENGTH:
        raise InvalidInput(
            f"The purpose is limited to {MAX_PURPOSE_LENGTH} characters.", field="purpose", code="too_long"
        )


def _is_overlap_violation(exc: IntegrityError) -> bool:
    orig = exc.orig
    if getattr(orig, "sqlstate", None) == "23P01":  # PostgreSQL exclusion_violation
        return True
    return "overlapping_booking" in str(orig)  # the SQLite trigger's RAISE(ABORT, ...)


def reserve_slot(
    session: Session,
    actor: Actor,
    instrument_id: int,
    starts_at: datetime,
    ends_at: datetime,
    purpose: str = "",
    *,
    now: datetime | None = None,
    account_id: int | None = None,
) -> Booking:
    """Book [starts_at, ends_at) on an instrument for the actor; OverlappingBooking if the time is taken.

    A booking of an instrument that needs approval is created pending; it holds its time all the same. When the
    facility charges, the booking holds its estimated cost on the funding account (`account_id`, or the actor's
    only account), within the account's and the member's limits.
    """
    from labcommons.billing import ledger  # billing prices bookings, so it imports this module
    now = now or utcnow()
    # Loaded and locked in one statement: the lock serialises this instrument's writers for the rules below.
    instrument = catalog.get_instrument(session, instrument_id, lock=True, related=False)
    check_booking_request(instrument, actor, starts_at, ends_at, purpose, now=now)
    rules = policy.policy_for(session, instrument.id)
    policy.check_policy(session, actor, instrument, starts_at, ends_at, now=now, rules=rules)
    status = policy.initial_status(session, actor, instrument, rules=rules)
    # Under the instrument's lock (SQLite: the serialised writer) this read sees every committed booking, so a
    # clash is found here with its details and no savepoint is needed around the insert; the database's exclusion
    # constraint (trigger on SQLite) stays the guarantee for writers that skip the lock.
    taken = _active_bookings(session, instrument.id, starts_at, ends_at)
    if taken:
        raise OverlappingBooking(
            "This time overlaps another booking of the instrument.", field="starts_at",
            conflicts=[{"starts_at": b.starts_at.isoformat(), "ends_at": b.ends_at.isoformat()} for b in taken],
        )
    booking = Booking(
        instrument_id=instrument.id,
        user_id=actor.user_id,
        starts_at=starts_at,
        ends_at=ends_at,
        status=status,
        purpose=purpose,
        kind=BookingKind.use,
    )
    booking.instrument = instrument
    session.add(booking)
    try:
        session.flush()
    except IntegrityError as exc:
        if not _is_overlap_violation(exc):
            raise
        # The transaction is spoilt on PostgreSQL: the caller's unit of work (or savepoint) rolls it back.
        raise OverlappingBooking(
            "This time overlaps another booking of the instrument.", field="starts_at", conflicts=[]
        ) from exc
    ledger.booking_created(session, actor, booking, account_id, now=now)
    notify(session, "requested" if status == BookingStatus.pending else "created", booking)
    return booking


def lock_instrument(session: Session, instrument_id: int) -> None:
    """Serialise writers of one instrument's calendar for the rest of the transaction.

    Overlap is the database's own guarantee; rules that look at neighbouring bookings (buffers, weekly quotas,
    maintenance) are checked under this lock so two app processes cannot both pass them. SQLite writers are
    already serialised by BEGIN IMMEDIATE.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(Instrument.id).where(Instrument.id == instrument_id).with_for_update())


def booking_instrument_id(session: Session, booking_id: int) -> int | None:
    """The instrument of a booking, read without a lock (to lock the instrument before the booking)."""
    return session.scalar(select(Booking.instrument_id).where(Booking.id == booking_id))


def _owned_booking(session: Session, actor: Actor, booking_id: int, *, lock: bool = False) -> Booking:
    # Only the actor's own use: a maintenance block is lifted through the maintenance API, which checks roles.
    stmt = (
        select(Booking)
        .where(Booking.id == booking_id, Booking.user_id == actor.user_id, Booking.kind == BookingKind.use)
        .options(joinedload(Booking.instrument).joinedload(Instrument.institution))
    )
    if lock:
        # Every writer locks the instrument before its bookings (as maintenance blocks do), so none deadlock.
        instrument_id = booking_instrument_id(session, booking_id)
        if instrument_id is not None:
            lock_instrument(session, instrument_id)
        stmt = stmt.with_for_update(of=Booking)
    booking = session.scalars(stmt).first()
    if booking is None:
        # Someone else's booking is reported exactly like a missing one.
        raise NotFound(f"Booking {booking_id} does not exist.", field="booking_id")
    return booking


def get_booking(session: Session, actor: Actor, booking_id: int) -> Booking:
    """The actor's booking, with its instrument; NotFound for anyone else's."""
    return _owned_booking(session, actor, booking_id)


def cancel_booking(
    session: Session, actor: Actor, booking_id: int, *, now: datetime | None = None
) -> Booking:
    """Cancel the actor's own pending or confirmed booking that has not ended; its time becomes free."""
    booking = _owned_booking(session, actor, booking_id, lock=True)
    now = now or utcnow()
    if booking.status not in ACTIVE_STATUSES:
        raise BookingNotCancellable(
            f"The booking is already {booking.status.value}.", field="booking_id", status=booking.status.value
        )
    if booking.ends_at <= now:
        raise BookingNotCancellable("The booking has already ended.", field="booking_id")
    if booking.checked_in_at is not None:
        raise BookingNotCancellable(
            "The booking is checked in and in use; check out instead of cancelling.", field="booking_id"
        )
    policy.check_cancellation(session, actor, booking, now=now)
    booking.status = BookingStatus.cancelled
    booking.cancelled_at = now
    booking.cancel_kind = "user"
    booking.cancelled_by_id = actor.user_id
    session.flush()
    notify(session, "cancelled", booking)
    waitlist.slot_freed(session, booking, now=now)
    return booking


class BookingPeriod(enum.StrEnum):
    """Which of a user's bookings to list: all by start, upcoming soonest first, past newest first."""

    all = "all"
    upcoming = "upcoming"
    past = "past"


def list_bookings(
    session: Session,
    actor: Actor,
    *,
    status: BookingStatus | None = None,
    period: BookingPeriod = BookingPeriod.all,
    limit: int = 50,
    cursor: str | None = None,
    now: datetime | None = None,
) -> tuple[list[Booking], str | None]:
    """The actor's bookings, one page and the cursor of the next; past bookings come newest first."""
    now = now or utcnow()
    stmt = (
        select(Booking)
        .where(Booking.user_id == actor.user_id, Booking.kind == BookingKind.use)
        .options(joinedload(Booking.instrument).joinedload(Instrument.institution))
    )
    if status is not None:
        stmt = stmt.where(Booking.status == status)
    if period == BookingPeriod.upcoming:
        stmt = stmt.where(Booking.ends_at > now)
    elif period == BookingPeriod.past:
        stmt = stmt.where(Booking.ends_at <= now)
    newest_first = period == BookingPeriod.past
    if cursor:
        last_start, last_id = decode_cursor(cursor, 2)
        try:
            last_start_at = datetime.fromisoformat(last_start)
            last_id = int(last_id)
        except (TypeError, ValueError) as exc:
            raise InvalidInput("The cursor is not valid.", field="cursor", code="invalid_cursor") from exc
        if newest_first:
            stmt = stmt.where(or_(Booking.starts_at < last_start_at,
                                  and_(Booking.starts_at == last_start_at, Booking.id < last_id)))
        else:
            stmt = stmt.where(or_(Booking.starts_at > last_start_at,
                                  and_(Booking.starts_at == last_start_at, Booking.id > last_id)))
    order = [Booking.starts_at.desc(), Booking.id.desc()] if newest_first else [Booking.starts_at, Booking.id]
    rows = list(session.scalars(stmt.order_by(*order).limit(limit + 1)))
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor([rows[-1].starts_at.isoformat(), rows[-1].id])
    return rows, next_cursor


def busy_intervals(session: Session, instrument_ids: Sequence[int], start: datetime,
                   end: datetime) -> dict[int, list[tuple[datetime, datetime]]]:
    """Active bookings of several instruments overlapping [start, end), as (start, end) in start order, in one query
    (result lists show each instrument's earliest free slot)."""
    out: dict[int, list[tuple[datetime, datetime]]] = {}
    if not instrument_ids:
        return out
    rows = session.execute(
        select(Booking.instrument_id, Booking.starts_at, Booking.ends_at)
        .where(Booking.instrument_id.in_(list(instrument_ids)), Booking.status.in_(ACTIVE_STATUSES),
               Booking.starts_at < end, Booking.ends_at > start)
        .order_by(Booking.instrument_id, Booking.starts_at)
    ).all()
    for instrument_id, starts_at, ends_at in rows:
        out.setdefault(instrument_id, []).append((starts_at, ends_at))
    return out


def _active_bookings(session: Session, instrument_id: int, start: datetime, end: datetime) -> Sequence[Booking]:
    return session.scalars(
        select(Booking)
        .where(
            Booking.instrument_id == instrument_id,
            Booking.status.in_(ACTIVE_STATUSES),
            Booking.starts_at < end,
            Booking.ends_at > start,
        )
        .order_by(Booking.starts_at)
    ).all()


def _check_window(start: datetime, end: datetime, *, start_field: str = "from", end_field: str = "to") -> None:
    if end <= start:
        raise InvalidInput(f"'{end_field}' must be after '{start_field}'.", field=end_field, code="invalid_window")
    if end - start > MAX_WINDOW:
        raise InvalidInput(
            f"The window is limited to {MAX_WINDOW.days} days.", field=end_field, code="window_too_long"
        )


def availability(session: Session, instrument_id: int, start: datetime, end: datetime) -> Availability:
    """Free and busy intervals of one instrument within [start, end); an inactive instrument has none free."""
    _check_window(start, end)
    instrument = catalog.get_instrument(session, instrument_id)
    busy = [
        Interval(max(b.starts_at, start), min(b.ends_at, end))
        for b in _active_bookings(session, instrument_id, start, end)
    ]
    free: list[Interval] = []
    if instrument.status == InstrumentStatus.active:
        cursor = start
        for interval in busy:
            if interval.starts_at > cursor:
                free.append(Interval(cursor, interval.starts_at))
            cursor = max(cursor, interval.ends_at)
        if cursor < end:
            free.append(Interval(cursor, end))
    return Availability(instrument_id, Interval(start, end), free, busy)


def week_bookings(session: Session, instrument_id: int, start: datetime, end: datetime) -> Sequence[Booking]:
    """Active bookings of an instrument overlapping a window, for calendars."""
    _check_window(start, end)
    return _active_bookings(session, instrument_id, start, end)


def earliest_slots(
    session: Session,
    query: catalog.InstrumentQuery,
    duration_minutes: int,
    after: datetime,
    *,
    limit: int = 5,
    horizon: timedelta = timedelta(days=90),
) -> list[Slot]:
    """The earliest free slots of `duration_minutes`, at or after `after`, one per matching instrument.

    A gap can only open at the first grid point after `after` or where an active booking ends (bookings lie
    on the grid), so indexed queries find it without walking every instrument's timeline: one per slot grid in
    use that divides the duration, each stopping at `limit` instruments, and one over booking ends.
    """
    if duration_minutes <= 0 or duration_minutes > 60 * 24 * 31:
        raise InvalidInput(
            "duration_minutes must be between 1 and 44640.", field="duration_minutes", code="invalid_duration"
        )
    query = catalog.InstrumentQuery(
        q=query.q, region=query.region, institution=query.institution, category=query.category,
        status=InstrumentStatus.active,
    )
    matches_text = catalog.text_condition(session, query.q)
    text_fits = [] if matches_text is None else [matches_text]
    fenced = matches_text is not None and catalog.has_several_terms(query.q)
    fits = [
        Instrument.min_booking_minutes <= duration_minutes,
        Instrument.max_booking_minutes >= duration_minutes,
        *catalog.instrument_filters(query),
    ]
    until = after + horizon
    found: dict[int, datetime] = {}
    grids = _grids_in_use(session, duration_minutes)
    if not grids:
        return []  # no instrument's grid divides this duration
    # 1. Instruments free right at the first grid point after `after`, soonest grid first. Each grid is asked
    # by equality: `slot_minutes = 30` is estimated well, where the planner guessed 0.5 % for
    # `duration % slot_minutes = 0`, and ix_instrument_slot_id lets a LIMIT stop early in id order.
    for grid in sorted(grids, key=lambda g: align_up(after, g)):
        start = align_up(after, grid)
        if len(found) >= limit and start > max(found.values()):
            break  # every later grid starts after the slots already found
        end = start + timedelta(minutes=duration_minutes)
        candidate = [Instrument.slot_minutes == grid, *fits, *text_fits]
        for instrument_id in _first_free(session, candidate, start, end, limit, fenced=fenced):
            found.setdefault(instrument_id, start)
    # 2. Instruments free from the end of one of their bookings, earliest end first.
    later = Booking.__table__.alias("later")
    gap_end = add_minutes(Booking.ends_at, duration_minutes)
    free_after = ~exists().where(
        later.c.instrument_id == Booking.instrument_id,
        _holds_time(later.c.status),
        later.c.starts_at < gap_end,
        later.c.ends_at > Booking.ends_at,
    )
    latest_wanted = max(found.values()) if len(found) >= limit else until
    # Not driven by the text match: SQLite then checks it while walking ix_booking_active_ends in time order,
    # instead of reading every booking of every matching instrument and sorting them all.
    checked_text = catalog.text_condition(session, query.q, drive=False)
    rows = session.execute(
        select(Booking.instrument_id, Booking.ends_at)
        .join(Instrument, Instrument.id == Booking.instrument_id)
        .where(
            *fits,
            *([] if checked_text is None else [checked_text]),
            Instrument.slot_minutes.in_(grids),
            _holds_time(Booking.status),
            Booking.ends_at > after,
            Booking.ends_at < latest_wanted,
            free_after,
        )
        .order_by(Booking.ends_at, Booking.instrument_id)
        .limit(limit * 4)
    ).all()
    for instrument_id, ends_at in rows:
        if instrument_id not in found or ends_at < found[instrument_id]:
            found[instrument_id] = ends_at
    best = sorted(found.items(), key=lambda item: (item[1], item[0]))[:limit]
    instruments = {
        i.id: i
        for i in session.scalars(
            select(Instrument)
            .where(Instrument.id.in_([i for i, _ in best]))
            .options(joinedload(Instrument.institution), joinedload(Instrument.category))
        )
    }
    return [
        Slot(instruments[i], start, start + timedelta(minutes=duration_minutes))
        for i, start in best
        if start < until
    ]


def _grids_in_use(session: Session, duration_minutes: int) -> list[int]:
    """The slot grids in use that divide `duration_minutes`, by a loose index scan of ix_instrument_slot_id
    (one probe per distinct grid) rather than a DISTINCT over every instrument."""
    grids = select(func.min(Instrument.slot_minutes).label("grid")).cte("grids", recursive=True)
    following = select(func.min(Instrument.slot_minutes)).where(Instrument.slot_minutes > grids.c.grid)
    grids = grids.union_all(select(following.scalar_subquery()).where(grids.c.grid.is_not(None)))
    in_use = session.scalars(select(grids.c.grid).where(grids.c.grid.is_not(None)))
    return [grid for grid in in_use if duration_minutes % grid == 0]


def _holds_time(status: Any) -> ColumnElement[bool]:
    """`status IN ('pending', 'confirmed')` with the values written out: SQLite uses the partial index
    ix_booking_active_ends only when the query repeats its predicate literally, not with parameters."""
    return status.in_([literal_column(f"'{s.value}'") for s in ACTIVE_STATUSES])


def _first_free(
    session: Session, candidate: Sequence[ColumnElement[bool]], start: datetime, end: datetime, limit: int,
    *, fenced: bool,
) -> list[int]:
    """The `limit` lowest ids of the instruments meeting `candidate` that are free for [start, end).

    Usually the planner walks ix_instrument_slot_id (or another index) in id order and stops at the limit
    (0.7 ms for a one-word match of 8 % of the rows). `fenced` is for a text match of several terms on
    PostgreSQL, which it underestimates (10 % of rows estimated as 1 %) and then checks the bookings of every
    candidate before sorting (144 ms); listing the candidates in a MATERIALIZED CTE, which it reads lazily in
    their order, checks only as many as the limit needs (20 ms). The fence would cost that 20 ms for nothing
    when the estimate is right.
    """
    if not fenced or session.get_bind().dialect.name != "postgresql":
        return list(session.scalars(
            select(Instrument.id).where(*candidate, ~busy_during(Instrument.id, start, end))
            .order_by(Instrument.id).limit(limit)
        ))
    ordered = (
        select(Instrument.id).where(*candidate).order_by(Instrument.id).cte("candidate").prefix_with("MATERIALIZED")
    )
    return list(session.scalars(select(ordered.c.id).where(~busy_during(ordered.c.id, start, end)).limit(limit)))
