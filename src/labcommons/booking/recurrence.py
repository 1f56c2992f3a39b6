"""Recurring bookings: an RFC 5545 RRULE expanded in the series' zone, each occurrence booked like any other.

Occurrences repeat at the same wall-clock time in the series' zone, so a weekly 09:00 stays 09:00 across a DST
change. When some occurrences cannot be booked the user decides: keep the bookable ones, or book nothing.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dateutil.rrule import rrule as RRule
from dateutil.rrule import rrulestr
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.booking import service
from labcommons.booking.models import Booking, BookingSeries
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
    try:
        rule = rrulestr(text, dtstart=dtstart)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"The RRULE is not valid: {exc}.", field="rrule", code="invalid_rrule") from None
    if not isinstance(rule, RRule):
        raise InvalidInput("Give one RRULE, e.g. FREQ=WEEKLY;COUNT=10.", field="rrule", code="invalid_rrule")
    return rule


def expand(rrule: str, first_starts_at: datetime, zone: ZoneInfo) -> list[datetime]:
    """The occurrences' starts as aware datetimes in `zone`, at most MAX_OCCURRENCES within MAX_SPAN."""
    # An aware dtstart makes dateutil keep the wall-clock time and re-attach the zone to every occurrence.
    dtstart = first_starts_at.astimezone(zone)
    starts = list(itertools.islice(iter(_parse_rule(rrule, dtstart)), MAX_OCCURRENCES + 1))
    if not starts:
        raise InvalidInput("The rule gives no occurrence.", field="rrule", code="empty_rrule")
    if len(starts) > MAX_OCCURRENCES:
        raise InvalidInput(f"A series is limited to {MAX_OCCURRENCES} occurrences.", field="rrule",
                           code="too_many_occurrences", max_occurrences=MAX_OCCURRENCES)
    if starts[-1] - starts[0] > MAX_SPAN:
        raise InvalidInput("A series may span at most a year.", field="rrule", code="series_too_long")
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
) -> SeriesResult:
    """Book every occurrence of a series; when some are refused, `keep_partial` decides (None: preview only)."""
    now = now or utcnow()
    zone = _zone(timezone or actor.timezone or get_settings().default_timezone)
    if not 0 < duration_minutes <= 60 * 24 * 31:
        raise InvalidInput("duration_minutes must be between 1 and 44640.", field="duration_minutes",
                           code="invalid_duration")
    starts = expand(rrule, first_starts_at, zone)
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
                booking = service.reserve_slot(session, actor, instrument.id, starts_at, ends_at, purpose, now=now)
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
