"""Per-instrument booking rules set by facility managers: approval, qualification, hours, notice, quotas, buffers.

Every rule is checked here, in the service layer, under the instrument's lock (see service.lock_instrument).
Staff of the instrument's facility (anyone allowed to manage its bookings) are exempt from the qualification,
weekly-quota, opening-hours and assisted-hours rules; the horizon, notice and buffer rules bind everyone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.billing import talent
from labcommons.booking.models import (
    ACTIVE_STATUSES,
    Booking,
    BookingKind,
    BookingPolicy,
    BookingStatus,
    Qualification,
    QualificationLevel,
)
from labcommons.catalog.models import Instrument, OpenTo
from labcommons.db import utcnow
from labcommons.errors import Conflict, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity.roles import Action, FacilityRef

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_CLOCK = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$|^24:00$")

# What an instrument without a policy row behaves like (column defaults apply only on insert).
DEFAULTS: dict[str, Any] = {
    "requires_approval": False,
    "requires_qualification": False,
    "horizon_days": 90,
    "min_notice_minutes": 0,
    "max_hours_per_week": None,
    "cancellation_deadline_hours": 0,
    "buffer_minutes": 0,
    "opening_hours": None,
    "assisted_hours": None,
    "timezone": "Asia/Shanghai",
    "no_show_grace_minutes": 15,
    "waitlist_offer_minutes": 60,
}
# Policy fields that are whole numbers, with their allowed range.
INT_FIELDS: dict[str, tuple[int, int]] = {
    "horizon_days": (1, 3650),
    "min_notice_minutes": (0, 60 * 24 * 365),
    "max_hours_per_week": (1, 168),
    "cancellation_deadline_hours": (0, 24 * 365),
    "buffer_minutes": (0, 24 * 60),
    "no_show_grace_minutes": (0, 24 * 60),
    "waitlist_offer_minutes": (1, 7 * 24 * 60),
}
BOOL_FIELDS = ("requires_approval", "requires_qualification")
HOURS_FIELDS = ("opening_hours", "assisted_hours")
# Rules that live on Instrument but are edited in the same rules editor.
INSTRUMENT_FIELDS = ("open_to", "slot_minutes", "min_booking_minutes", "max_booking_minutes")

Hours = dict[str, list[tuple[str, str]]]


class CancellationDeadlinePassed(Conflict):
    code = "cancellation_deadline_passed"


# --- loading and saving ------------------------------------------------------------------------------------


def facility_ref(instrument: Instrument) -> FacilityRef:
    return FacilityRef(id=instrument.facility_id, institution_id=instrument.institution_id)


def is_facility_staff(actor: Actor, instrument: Instrument) -> bool:
    """Whether the actor runs the instrument's facility (and so is exempt from the user rules)."""
    return roles.authorize(actor, Action.manage_facility_bookings, facility=facility_ref(instrument))


def policy_for(session: Session, instrument_id: int) -> BookingPolicy:
    """The instrument's policy row, or an unsaved one with the defaults when the manager has set none."""
    policy = session.get(BookingPolicy, instrument_id)
    if policy is None:
        policy = BookingPolicy(instrument_id=instrument_id, **DEFAULTS)
    return policy


def parse_hours(raw: str | None) -> Hours | None:
    """Stored hours JSON as {weekday: [(start, end), ...]}; None means no restriction (or no period)."""
    if raw is None or raw == "":
        return None
    data = json.loads(raw)
    return {day: [(str(a), str(b)) for a, b in periods] for day, periods in data.items()}


def _minutes(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


def validate_hours(value: Any, field: str) -> str | None:
    """Hours as given (JSON text, a mapping or None) checked and turned into canonical JSON text."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidInput("Opening hours must be JSON such as {\"mon\": [[\"09:00\", \"18:00\"]]}.",
                               field=field, code="invalid_hours") from None
    if not isinstance(value, Mapping):
        raise InvalidInput("Hours must map weekdays (mon … sun) to lists of [start, end].", field=field,
                           code="invalid_hours")
    result: dict[str, list[list[str]]] = {}
    for day, periods in value.items():
        if day not in WEEKDAYS:
            raise InvalidInput(f"Unknown weekday {day!r}; use mon, tue, wed, thu, fri, sat, sun.",
                               field=f"{field}.{day}", code="invalid_weekday")
        if not isinstance(periods, list | tuple):
            raise InvalidInput("Each weekday needs a list of [start, end] periods.", field=f"{field}.{day}",
                               code="invalid_hours")
        clean: list[list[str]] = []
        for period in periods:
            if not isinstance(period, list | tuple) or len(period) != 2:
                raise InvalidInput("Each period is a pair [start, end].", field=f"{field}.{day}",
                                   code="invalid_hours")
            start, end = (str(p).strip() for p in period)
            for clock in (start, end):
                if not _CLOCK.match(clock):
                    raise InvalidInput(f"{clock!r} is not a time of day HH:MM (00:00 to 24:00).",
                                       field=f"{field}.{day}", code="invalid_time")
            if _minutes(start) >= _minutes(end):
                raise InvalidInput(f"The period {start}–{end} must start before it ends.",
                                   field=f"{field}.{day}", code="start_not_before_end")
            clean.append([start, end])
        clean.sort(key=lambda p: _minutes(p[0]))
        for before, after in pairwise(clean):
            if _minutes(after[0]) < _minutes(before[1]):
                raise InvalidInput("Periods of one day must not overlap.", field=f"{field}.{day}",
                                   code="overlapping_periods")
        if clean:
            result[day] = clean
    ordered = {day: result[day] for day in WEEKDAYS if day in result}
    return json.dumps(ordered, separators=(",", ":"))


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(f"Unknown time zone {name!r}.", field="timezone", code="invalid_timezone") from None


def _as_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool):
        value = None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be a whole number.", field=name, code="invalid_number") from None
    if not low <= number <= high:
        raise InvalidInput(f"{name} must be between {low} and {high}.", field=name, code="out_of_range",
                           min=low, max=high)
    return number


def save_policy(session: Session, actor: Actor, instrument_id: int, **fields: Any) -> BookingPolicy:
    """Change an instrument's rules (only the fields given); needs edit_facility_catalogue on its facility."""
    instrument = session.get(Instrument, instrument_id)
    if instrument is None:
        raise NotFound(f"Instrument {instrument_id} does not exist.", field="instrument_id")
    roles.require(actor, Action.edit_facility_catalogue, facility=facility_ref(instrument))
    known = set(DEFAULTS) | set(INSTRUMENT_FIELDS)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise InvalidInput(f"Unknown rule {unknown[0]!r}.", field=unknown[0], code="unknown_field")
    policy = session.get(BookingPolicy, instrument_id)
    if policy is None:
        policy = BookingPolicy(instrument_id=instrument_id, **DEFAULTS)
        session.add(policy)
    values: dict[str, Any] = {}
    for name, value in fields.items():
        if name in BOOL_FIELDS:
            if not isinstance(value, bool):
                raise InvalidInput(f"{name} must be true or false.", field=name, code="invalid_boolean")
            values[name] = value
        elif name in INT_FIELDS:
            values[name] = None if name == "max_hours_per_week" and value in (None, "") \
                else _as_int(name, value, *INT_FIELDS[name])
        elif name in HOURS_FIELDS:
            values[name] = validate_hours(value, name)
        elif name == "timezone":
            _zone(str(value))
            values[name] = str(value)
        elif name == "open_to":
            try:
                values[name] = OpenTo(value)
            except ValueError:
                raise InvalidInput("open_to is one of institution, region, everyone.", field=name,
                                   code="invalid_choice") from None
        else:
            values[name] = _as_int(name, value, 1, 60 * 24 * 31)
    slot = values.get("slot_minutes", instrument.slot_minutes)
    shortest = values.get("min_booking_minutes", instrument.min_booking_minutes)
    longest = values.get("max_booking_minutes", instrument.max_booking_minutes)
    if shortest > longest:
        raise InvalidInput("The shortest booking must not be longer than the longest.", field="min_booking_minutes",
                           code="min_above_max")
    for name, minutes in (("min_booking_minutes", shortest), ("max_booking_minutes", longest)):
        if minutes % slot:
            raise InvalidInput(f"{name} must be a multiple of the {slot}-minute slot.", field=name,
                               code="not_on_slot_grid", slot_minutes=slot)
    for name, value in values.items():
        setattr(instrument if name in INSTRUMENT_FIELDS else policy, name, value)
    policy.updated_by_id = actor.user_id
    policy.updated_at = utcnow()
    session.flush()
    return policy


# --- the rules -----------------------------------------------------------------------------------------------


def _periods(hours: Hours, start: datetime, end: datetime, zone: ZoneInfo) -> list[tuple[datetime, datetime]]:
    """The UTC periods of weekly `hours` that touch [start, end), merged where they meet."""
    first = start.astimezone(zone).date() - timedelta(days=1)
    last = end.astimezone(zone).date()
    spans: list[tuple[datetime, datetime]] = []
    day = first
    while day <= last:
        for opens, closes in hours.get(WEEKDAYS[day.weekday()], []):
            spans.append((_at(day, opens, zone), _at(day, closes, zone)))
        day += timedelta(days=1)
    spans.sort()
    merged: list[tuple[datetime, datetime]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _at(day: date, clock: str, zone: ZoneInfo) -> datetime:
    # "24:00" is midnight at the end of the day, so a period may run on into the next day's "00:00".
    minutes = _minutes(clock)
    if minutes == 24 * 60:
        day, minutes = day + timedelta(days=1), 0
    return datetime.combine(day, time(minutes // 60, minutes % 60), tzinfo=zone).astimezone(UTC)


def within_hours(hours: Hours, start: datetime, end: datetime, zone: ZoneInfo) -> bool:
    """Whether [start, end) lies wholly inside the weekly hours (periods that meet count as one)."""
    return any(a <= start and end <= b for a, b in _periods(hours, start, end, zone))


def category_codes(code: str) -> list[str]:
    """A category and its ancestors: "GEN.SEQ.X" → ["GEN.SEQ.X", "GEN.SEQ", "GEN"]."""
    parts = code.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def live_qualification_level(
    session: Session, user_id: int, instrument: Instrument, *, now: datetime
) -> QualificationLevel | None:
    """The best level of the user's unexpired, unrevoked qualifications for the instrument or its categories."""
    levels = session.scalars(
        select(Qualification.level).where(
            Qualification.user_id == user_id,
            or_(Qualification.instrument_id == instrument.id,
                Qualification.category_code.in_(category_codes(instrument.category_code))),
            Qualification.revoked_at.is_(None),
            or_(Qualification.expires_at.is_(None), Qualification.expires_at > now),
        )
    ).all()
    if not levels:
        return None
    return QualificationLevel.independent if QualificationLevel.independent in levels \
        else QualificationLevel.assisted


def _others(session: Session, instrument_id: int, start: datetime, end: datetime,
            exclude_booking_id: int | None) -> Iterable[Booking]:
    stmt = select(Booking).where(
        Booking.instrument_id == instrument_id,
        Booking.status.in_(ACTIVE_STATUSES),
        Booking.starts_at < end,
        Booking.ends_at > start,
    )
    if exclude_booking_id is not None:
        stmt = stmt.where(Booking.id != exclude_booking_id)
    return session.scalars(stmt).all()


@dataclass(frozen=True)
class _Week:
    start: datetime
    end: datetime


def _iso_weeks(start: datetime, end: datetime, zone: ZoneInfo) -> list[_Week]:
    """The ISO weeks (Monday 00:00 to Monday 00:00 in `zone`) that [start, end) touches, in UTC."""
    local = start.astimezone(zone).date()
    monday = local - timedelta(days=local.weekday())
    weeks: list[_Week] = []
    while True:
        a = datetime.combine(monday, time(0), tzinfo=zone).astimezone(UTC)
        if a >= end:
            return weeks
        b = datetime.combine(monday + timedelta(days=7), time(0), tzinfo=zone).astimezone(UTC)
        weeks.append(_Week(a, b))
        monday += timedelta(days=7)


def _overlap(a0: datetime, a1: datetime, b0: datetime, b1: datetime) -> timedelta:
    return max(timedelta(), min(a1, b1) - max(a0, b0))


def check_policy(
    session: Session, actor: Actor, instrument: Instrument, starts_at: datetime, ends_at: datetime, *,
    now: datetime, exclude_booking_id: int | None = None, rules: BookingPolicy | None = None,
) -> None:
    """Raise a domain error naming the rule a new booking of [starts_at, ends_at) breaks (`rules`: the
    instrument's policy when the caller has it already)."""
    policy = rules if rules is not None else policy_for(session, instrument.id)
    zone = _zone(policy.timezone)
    staff = is_facility_staff(actor, instrument)
    horizon = policy.horizon_days
    if starts_at - now > timedelta(days=horizon):
        # A verified talent card recognised in the instrument's region opens the calendar further ahead (looked up
        # only when the plain horizon is passed: most bookings never need it).
        horizon += talent.priority_days(session, actor.user_id, instrument.region_code, now.astimezone(zone).date())
    if starts_at - now > timedelta(days=horizon):
        raise InvalidInput(f"Bookings may start at most {horizon} days ahead.", field="starts_at",
                           code="beyond_horizon", horizon_days=horizon)
    if starts_at - now < timedelta(minutes=policy.min_notice_minutes):
        raise InvalidInput(f"Bookings need {policy.min_notice_minutes} minutes' notice.", field="starts_at",
                           code="too_short_notice", min_notice_minutes=policy.min_notice_minutes)
    if not staff:
        level = (live_qualification_level(session, actor.user_id, instrument, now=now)
                 if policy.requires_qualification else None)
        if policy.requires_qualification and level is None:
            raise InvalidInput("This instrument needs training: you hold no valid qualification for it.",
                               field="instrument_id", code="qualification_required")
        opening = parse_hours(policy.opening_hours)
        if opening is not None and not within_hours(opening, starts_at, ends_at, zone):
            raise InvalidInput("The booking must lie within the instrument's opening hours.", field="starts_at",
                               code="outside_opening_hours")
        if policy.requires_qualification and level == QualificationLevel.assisted:
            assisted = parse_hours(policy.assisted_hours) or {}
            if not within_hours(assisted, starts_at, ends_at, zone):
                raise InvalidInput("With an assisted qualification you may book only in staff-assisted hours.",
                                   field="starts_at", code="outside_assisted_hours")
    if policy.buffer_minutes:
        gap = timedelta(minutes=policy.buffer_minutes)
        if _others(session, instrument.id, starts_at - gap, ends_at + gap, exclude_booking_id):
            raise InvalidInput(f"Leave {policy.buffer_minutes} minutes between bookings of this instrument.",
                               field="starts_at", code="buffer_violated", buffer_minutes=policy.buffer_minutes)
    if policy.max_hours_per_week is not None and not staff:
        _check_weekly_quota(session, actor, instrument, policy, starts_at, ends_at, zone, exclude_booking_id)


def _check_weekly_quota(
    session: Session, actor: Actor, instrument: Instrument, policy: BookingPolicy, starts_at: datetime,
    ends_at: datetime, zone: ZoneInfo, exclude_booking_id: int | None,
) -> None:
    assert policy.max_hours_per_week is not None
    limit = timedelta(hours=policy.max_hours_per_week)
    for week in _iso_weeks(starts_at, ends_at, zone):
        stmt = select(Booking.starts_at, Booking.ends_at).where(
            Booking.instrument_id == instrument.id,
            Booking.user_id == actor.user_id,
            Booking.kind == BookingKind.use,
            # A checked-out booking is completed but its hours were used: counting it keeps check-out no way round.
            Booking.status.in_((*ACTIVE_STATUSES, BookingStatus.completed)),
            Booking.starts_at < week.end,
            Booking.ends_at > week.start,
        )
        if exclude_booking_id is not None:
            stmt = stmt.where(Booking.id != exclude_booking_id)
        used = sum((_overlap(a, b, week.start, week.end) for a, b in session.execute(stmt).all()), timedelta())
        if used + _overlap(starts_at, ends_at, week.start, week.end) > limit:
            raise InvalidInput(
                f"You may book at most {policy.max_hours_per_week} hours of this instrument per week.",
                field="ends_at", code="weekly_quota_exceeded", max_hours_per_week=policy.max_hours_per_week,
                used_minutes=int(used.total_seconds() // 60),
            )


def initial_status(session: Session, actor: Actor, instrument: Instrument, *,
                   rules: BookingPolicy | None = None) -> BookingStatus:
    """pending when the instrument's bookings need approval (except the facility's own staff), else confirmed."""
    policy = rules if rules is not None else policy_for(session, instrument.id)
    if policy.requires_approval and not is_facility_staff(actor, instrument):
        return BookingStatus.pending
    return BookingStatus.confirmed


def cancellation_deadline(policy: BookingPolicy, booking: Booking) -> datetime:
    return booking.starts_at - timedelta(hours=policy.cancellation_deadline_hours)


def check_cancellation(session: Session, actor: Actor, booking: Booking, *, now: datetime) -> None:
    """Raise a domain error when the owner may no longer cancel (past the cancellation deadline)."""
    policy = policy_for(session, booking.instrument_id)
    if not policy.cancellation_deadline_hours or booking.status == BookingStatus.pending:
        return
    instrument = session.get(Instrument, booking.instrument_id)
    assert instrument is not None
    if now > cancellation_deadline(policy, booking) and not is_facility_staff(actor, instrument):
        raise CancellationDeadlinePassed(
            "The cancellation deadline has passed; ask the facility to cancel this booking.", field="booking_id",
            cancellation_deadline_hours=policy.cancellation_deadline_hours,
        )


# --- the rules editor ----------------------------------------------------------------------------------------


def rules_for_editing(session: Session, actor: Actor, instrument_id: int) -> tuple[Instrument, BookingPolicy]:
    """An instrument and its policy for the rules editor; needs edit_facility_catalogue on its facility."""
    instrument = session.get(Instrument, instrument_id)
    if instrument is None:
        raise NotFound(f"Instrument {instrument_id} does not exist.", field="instrument_id")
    roles.require(actor, Action.edit_facility_catalogue, facility=facility_ref(instrument))
    return instrument, policy_for(session, instrument_id)


def hours_to_text(raw: str | None) -> dict[str, str]:
    """Stored hours as one text per weekday, "09:00-12:00, 13:00-18:00", for form fields."""
    hours = parse_hours(raw) or {}
    return {day: ", ".join(f"{a}-{b}" for a, b in hours.get(day, [])) for day in WEEKDAYS}


def hours_from_text(texts: Mapping[str, str], field: str) -> str | None:
    """Form texts per weekday as hours JSON; every day blank means no hours (None)."""
    if not any(texts.get(day, "").strip() for day in WEEKDAYS):
        return None
    hours: dict[str, list[list[str]]] = {}
    for day in WEEKDAYS:
        periods = []
        for part in texts.get(day, "").replace("，", ",").split(","):
            part = part.strip().replace("–", "-").replace("—", "-")
            if not part:
                continue
            start, sep, end = part.partition("-")
            if not sep:
                raise InvalidInput(f"Write periods as 09:00-18:00, not {part!r}.", field=f"{field}.{day}",
                                   code="invalid_hours")
            periods.append([start.strip(), end.strip()])
        hours[day] = periods
    return validate_hours(hours, field)
