"""Recurring bookings: an RFC 5545 RRULE expanded in the series' zone, each occurrence booked like any other.

Occurrences repeat at the same wall-clock time in the series' zone, so a weekly 09:00 stays 09:00 across a DST
change. When some occurrences cannot be booked the user decides: keep the bookable ones, or book nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dateutil.rrule import rrule as RRule
from dateutil.rrule import rrulestr
from sqlalchemy import select
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.booking import service
from labcommons.booking.models import ACTIVE_STATUSES, Booking, BookingSeries
from labcommons.catalog import service as catalog
from labcommons.config import get_settings
from labcommons.db import utcnow
from labcommons.errors import DomainError, InvalidInput, NotFound

MAX_OCCURRENCES = 52
MAX_SPAN = timedelta(days=366)
MAX_RRULE_LENGTH = 500


@dataclass
class Occurrence:
    """One occurrence: booked (or bookable, in a preview), or refused with the rule's code and message."""

    starts_at: datetime
    ends_at: datetime
    bookable: bool
    booking: Booking | None = None
    code: str | None = None
    message: str | None = None


@dataclass
class SeriesResult:
    """`status`: "booked" (every occurrence), "partial" (the bookable ones kept), "preview" (nothing written,
    the user must decide) or "none" (nothing written, as asked)."""

    status: str
    occurrences: list[Occurrence]
    series: BookingSeries | None = None

    @property
    def bookable_count(self) -> int:
        return sum(1 for o in self.occurrences if o.bookable)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(f"Unknown time zone {name!r}.", field="timezone", code="unknown_timezone") from None


def _invalid(message: str) -> InvalidInput:
    return InvalidInput(message, field="rrule", code="invalid_rrule")


# Finer frequencies make no sense for bookings at one time of day, and iterating them costs much CPU.
FREQUENCIES = frozenset({"DAILY", "WEEKLY", "MONTHLY", "YEARLY"})
# Other parts (BYSETPOS, BYYEARDAY, BYWEEKNO, BYHOUR, ...) can make rules that never occur, which dateutil would
# only notice after iterating up to year 9999.
RULE_PARTS = frozenset({"FREQ", "COUNT", "UNTIL", "INTERVAL", "BYDAY", "BYMONTHDAY", "BYMONTH", "WKST"})
MAX_INTERVAL = 366
# The longest each month can be, February's in leap years.
MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise _invalid(f"The RRULE value {value!r} must be whole numbers.") from None


def _check_parts(text: str) -> None:
    """Refuse rules the booking form has no use for and those that could never occur."""
    parts: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        key, _, value = part.partition("=")
        parts[key.strip().upper()] = value.strip().upper()
    unknown = sorted(set(parts) - RULE_PARTS)
    if unknown:
        raise _invalid(f"The RRULE may not use {', '.join(unknown)}.")
    if parts.get("FREQ") not in FREQUENCIES:
        raise _invalid("FREQ is DAILY, WEEKLY, MONTHLY or YEARLY.")
    if "INTERVAL" in parts and not 1 <= _int_list(parts["INTERVAL"])[0] <= MAX_INTERVAL:
        raise _invalid(f"INTERVAL must be between 1 and {MAX_INTERVAL}.")
    months = _int_list(parts["BYMONTH"]) if "BYMONTH" in parts else list(range(1, 13))
    days = _int_list(parts["BYMONTHDAY"]) if "BYMONTHDAY" in parts else [1]
    if not all(1 <= m <= 12 for m in months) or not all(1 <= abs(d) <= 31 for d in days):
        raise _invalid("BYMONTH is 1 to 12 and BYMONTHDAY 1 to 31 (or -1 to -31).")
    if not any(abs(d) <= MONTH_DAYS[m - 1] for m in months for d in days):
        raise _invalid("No month has the days BYMONTHDAY names.")
    for day in parts.get("BYDAY", "").split(","):
        ordinal = day.strip()[:-2]
        if ordinal and ordinal not in ("-", "+") and not 1 <= abs(_int_list(ordinal)[0]) <= 5:
            raise _invalid("A BYDAY ordinal is 1 to 5 (or -1 to -5), e.g. 2MO.")


def _parse_rule(text: str, dtstart: datetime) -> RRule:
    text = text.strip()
    if text.upper().startswith("RRULE:"):
        text = text[len("RRULE:"):]
    if not text or len(text) > MAX_RRULE_LENGTH or "\n" in text or ":" in text:
        raise InvalidInput("Give one RRULE, e.g. FREQ=WEEKLY;COUNT=10.", field="rrule", code="invalid_rrule")
    parts = {p.split("=", 1)[0].strip().upper() for p in text.split(";") if p.strip()}
    # Without COUNT or UNTIL a rule repeats for ever.
    if not parts & {"COUNT", "UNTIL"}:
        raise InvalidInput("The rule needs COUNT or UNTIL.", field="rrule", code="unbounded_rrule")
    _check_parts(text)
    try:
        rule = rrulestr(text, dtstart=dtstart)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"The RRULE is not valid: {exc}.", field="rrule", code="invalid_rrule") from None
    if not isinstance(rule, RRule):
        raise InvalidInput("Give one RRULE, e.g. FREQ=WEEKLY;COUNT=10.", field="rrule", code="invalid_rrule")
    return rule


def _out_of_range() -> InvalidInput:
    return InvalidInput("The series would run past the year 9999.", field="first_starts_at", code="out_of_range")


def expand(rrule: str, first_starts_at: datetime, zone: ZoneInfo) -> list[datetime]:
    """The occurrences' starts as aware datetimes in `zone`, at most MAX_OCCURRENCES within MAX_SPAN."""
    try:
        # An aware dtstart makes dateutil keep the wall-clock time and re-attach the zone to every occurrence.
        dtstart = first_starts_at.astimezone(zone)
    except OverflowError:
        raise _out_of_range() from None
    rule = _parse_rule(rrule, dtstart)
    starts: list[datetime] = []
    # Iterating can fail too (dateutil checks some values only then); it stops past the one-year window, so a
    # sparse rule costs no more than that.
    try:
        for start in rule:
            if starts and start - starts[0] > MAX_SPAN:
                raise InvalidInput("A series may span at most a year.", field="rrule", code="series_too_long")
            starts.append(start)
            if len(starts) > MAX_OCCURRENCES:
                raise InvalidInput(f"A series is limited to {MAX_OCCURRENCES} occurrences.", field="rrule",
                                   code="too_many_occurrences", max_occurrences=MAX_OCCURRENCES)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"The RRULE is not valid: {exc}.", field="rrule", code="invalid_rrule") from None
    if not starts:
        raise InvalidInput("The rule gives no occurrence.", field="rrule", code="empty_rrule")
    return starts


def book_series(
    session: Session,
    actor: Actor,
    instrument_id: int,
    first_starts_at: datetime,
    duration_minutes: int,
    rrule: str,
    purpose: str = "",
    keep_partial: bool | None = None,
    *,
    timezone: str | None = None,
    now: datetime | None = None,
    account_id: int | None = None,
) -> SeriesResult:
    """Book every occurrence of a series; when some are refused, `keep_partial` decides (None: preview only).

    Each occurrence holds its estimate on the funding account, so a series past the account's limit is refused in
    part like any other conflict."""
    now = now or utcnow()
    zone = _zone(timezone or actor.timezone or get_settings().default_timezone)
    if not 0 < duration_minutes <= 60 * 24 * 31:
        raise InvalidInput("duration_minutes must be between 1 and 44640.", field="duration_minutes",
                           code="invalid_duration")
    starts = expand(rrule, first_starts_at, zone)
    try:
        # The last occurrence must end, in UTC too, before datetime's end of year 9999.
        (starts[-1] + timedelta(minutes=duration_minutes)).astimezone(UTC)
    except OverflowError:
        raise _out_of_range() from None
    instrument = catalog.get_instrument(session, instrument_id)
    occurrences: list[Occurrence] = []
    # The outer savepoint undoes every occurrence unless the series is kept; each occurrence has its own so that a
    # refused one leaves the others (and a PostgreSQL transaction) intact.
    outer = session.begin_nested()
    for local_start in starts:
        # Wall-clock arithmetic in the zone: the length is kept in local time, like the booking form does.
        starts_at = local_start.astimezone(UTC)
        ends_at = (local_start + timedelta(minutes=duration_minutes)).astimezone(UTC)
        try:
            with session.begin_nested():
                booking = service.reserve_slot(session, actor, instrument.id, starts_at, ends_at, purpose, now=now,
                                               account_id=account_id)
        except NotFound:
            raise
        except DomainError as exc:
            occurrences.append(Occurrence(starts_at, ends_at, False, code=exc.code, message=exc.message))
        else:
            occurrences.append(Occurrence(starts_at, ends_at, True, booking=booking))
    booked = [o for o in occurrences if o.booking is not None]
    if not booked or (len(booked) < len(occurrences) and not keep_partial):
        outer.rollback()
        for occurrence in occurrences:
            occurrence.booking = None
        return SeriesResult("preview" if keep_partial is None else "none", occurrences)
    outer.commit()
    series = BookingSeries(
        user_id=actor.user_id, instrument_id=instrument.id, rrule=rrule.strip(),
        first_starts_at=first_starts_at.astimezone(UTC), duration_minutes=duration_minutes, timezone=zone.key,
        purpose=purpose,
    )
    session.add(series)
    session.flush()
    for occurrence in booked:
        assert occurrence.booking is not None
        occurrence.booking.series_id = series.id
    session.flush()
    return SeriesResult("booked" if len(booked) == len(occurrences) else "partial", occurrences, series)


@dataclass
class SkippedOccurrence:
    """An occurrence that could not be cancelled, with the rule's code and message."""

    booking: Booking
    code: str
    message: str


@dataclass
class SeriesCancellation:
    """What cancelling the rest of a series did: the occurrences cancelled and those left, and why."""

    series: BookingSeries
    cancelled: list[Booking]
    skipped: list[SkippedOccurrence]


def cancel_series(session: Session, actor: Actor, series_id: int, *, now: datetime | None = None) -> SeriesCancellation:
    """Cancel every active occurrence of the actor's own series that has not ended, each one like a single booking
    (owner check, cancellation deadline, notification, waitlist offer); those that cannot be cancelled are skipped
    and reported. Someone else's series is reported exactly like a missing one."""
    now = now or utcnow()
    series = session.get(BookingSeries, series_id)
    if series is None or series.user_id != actor.user_id:
        raise NotFound(f"Series {series_id} does not exist.", field="series_id")
    ids = session.scalars(
        select(Booking.id)
        .where(Booking.series_id == series.id, Booking.user_id == actor.user_id,
               Booking.status.in_(ACTIVE_STATUSES), Booking.ends_at > now)
        .order_by(Booking.starts_at, Booking.id)
    ).all()
    cancelled: list[Booking] = []
    skipped: list[SkippedOccurrence] = []
    for booking_id in ids:
        try:
            # Each occurrence in its own savepoint: a refused one leaves the others (and PostgreSQL) intact.
            with session.begin_nested():
                cancelled.append(service.cancel_booking(session, actor, booking_id, now=now))
        except NotFound:
            continue
        except DomainError as exc:
            booking = session.get(Booking, booking_id)
            assert booking is not None
            skipped.append(SkippedOccurrence(booking, exc.code, exc.message))
    return SeriesCancellation(series, cancelled, skipped)
