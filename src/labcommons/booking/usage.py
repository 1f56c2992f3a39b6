"""Usage as it really happened: check-in and check-out at the instrument, no-shows, and instrument tokens.

An instrument's computer (the interlock) authenticates with an instrument token that works for that instrument
only; only the token's SHA-256 is stored. Check-out marks a booking completed, which releases the rest of its
time (completed bookings do not hold time). A no-show keeps its booking confirmed: the flag records the
absence, the time is not freed retroactively, and a late arrival may still check in (which clears the flag).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, joinedload

from labcommons.actor import Actor
from labcommons.booking import service as booking_service
from labcommons.booking import waitlist
from labcommons.booking.models import (
    ACTIVE_STATUSES,
    Booking,
    BookingKind,
    BookingPolicy,
    BookingStatus,
    InstrumentToken,
)
from labcommons.catalog import service as catalog
from labcommons.catalog.models import Instrument
from labcommons.db import utcnow
from labcommons.errors import Conflict, InvalidInput, NotFound, Unauthenticated
from labcommons.identity.roles import Action, FacilityRef, authorize

# Users may check in this long before their booking starts (setting up, warming a laser).
CHECK_IN_EARLY = timedelta(minutes=15)
DEFAULT_NO_SHOW_GRACE_MINUTES = 15
# mark_no_shows looks only this far back, so its first run does not brand years of history.
NO_SHOW_LOOKBACK = timedelta(days=1)
INSTRUMENT_TOKEN_PREFIX = "lci_"


class NoCurrentBooking(Conflict):
    code = "no_current_booking"


class CheckInTooEarly(Conflict):
    code = "check_in_too_early"


class BookingEnded(Conflict):
    code = "booking_ended"


class BookingNotConfirmed(Conflict):
    code = "booking_not_confirmed"


class NotCheckedIn(Conflict):
    code = "not_checked_in"


class WrongInstrument(InvalidInput):
    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message, field=field, code="wrong_instrument")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --- instrument tokens -------------------------------------------------------------------------------------


def create_instrument_token(session: Session, instrument_id: int, *, name: str = "") -> tuple[InstrumentToken, str]:
    """A new token for one instrument; the secret is returned once, only its hash is kept."""
    catalog.get_instrument(session, instrument_id)
    if len(name) > 100:
        raise InvalidInput("The name is too long (at most 100 characters).", field="name", code="too_long")
    secret = INSTRUMENT_TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = InstrumentToken(instrument_id=instrument_id, token_hash=_digest(secret), name=name.strip())
    session.add(row)
    session.flush()
    return row, secret


def list_instrument_tokens(session: Session, instrument_id: int | None = None) -> Sequence[InstrumentToken]:
    stmt = select(InstrumentToken).order_by(InstrumentToken.id)
    if instrument_id is not None:
        stmt = stmt.where(InstrumentToken.instrument_id == instrument_id)
    return session.scalars(stmt).all()


def revoke_instrument_token(session: Session, token_id: int, *, now: datetime | None = None) -> InstrumentToken:
    """Revoke a token (idempotent: the first revocation time is kept)."""
    row = session.get(InstrumentToken, token_id)
    if row is None:
        raise NotFound(f"No instrument token {token_id}.", field="token_id")
    if row.revoked_at is None:
        row.revoked_at = now or utcnow()
        session.flush()
    return row


def authenticate_instrument(session: Session, token: str) -> InstrumentToken:
    """The live token a secret belongs to; Unauthenticated for an unknown or revoked one."""
    row = session.scalars(select(InstrumentToken).where(InstrumentToken.token_hash == _digest(token.strip()))).first()
    if row is None:
        raise Unauthenticated("Unknown instrument token.", field="Authorization")
    if row.revoked_at is not None:
        raise Unauthenticated("This instrument token has been revoked.", field="Authorization", revoked=True)
    return row


# --- who may act on a booking ------------------------------------------------------------------------------


def manages(actor: Actor | None, instrument: Instrument) -> bool:
    """Whether the actor runs the facility's bookings (and so may check anyone in)."""
    ref = FacilityRef(id=instrument.facility_id, institution_id=instrument.institution_id)
    return authorize(actor, Action.manage_facility_bookings, facility=ref)


def may_act_for(actor: Actor | None, booking: Booking) -> bool:
    return actor is not None and (booking.user_id == actor.user_id or manages(actor, booking.instrument))


def get_booking(session: Session, booking_id: int, *, lock: bool = False) -> Booking:
    """A booking with its instrument and user, for check-in by whoever the caller has authorised."""
    stmt = select(Booking).where(Booking.id == booking_id).options(
        joinedload(Booking.instrument), joinedload(Booking.user)
    )
    if lock:
        # Instrument before booking, the order of every booking writer: check-out may free time for the waitlist.
        instrument_id = booking_service.booking_instrument_id(session, booking_id)
        if instrument_id is not None:
            booking_service.lock_instrument(session, instrument_id)
        stmt = stmt.with_for_update(of=Booking)
    booking = session.scalars(stmt).first()
    if booking is None:
        raise NotFound(f"Booking {booking_id} does not exist.", field="booking_id")
    return booking


def booking_for_actor(session: Session, actor: Actor, booking_id: int, *, instrument_id: int | None = None) -> Booking:
    """A booking the actor may check in or out: their own, or any of a facility they manage."""
    booking = get_booking(session, booking_id, lock=True)
    if not may_act_for(actor, booking):
        # Someone else's booking is reported exactly like a missing one.
        raise NotFound(f"Booking {booking_id} does not exist.", field="booking_id")
    if instrument_id is not None and booking.instrument_id != instrument_id:
        raise WrongInstrument("The booking is for another instrument.", field="booking_id")
    return booking


# --- check-in and check-out --------------------------------------------------------------------------------


def check_in_window(booking: Booking) -> tuple[datetime, datetime]:
    """[opens, closes) during which a booking may be checked in."""
    return booking.starts_at - CHECK_IN_EARLY, booking.ends_at


def usage_action(booking: Booking, now: datetime) -> str | None:
    """What a page may offer for a booking now: "check_in", "check_out" or None."""
    if booking.kind != BookingKind.use or booking.status != BookingStatus.confirmed:
        return None
    if booking.checked_in_at is None:
        opens, closes = check_in_window(booking)
        return "check_in" if opens <= now < closes else None
    return "check_out" if booking.checked_out_at is None else None


def check_in(session: Session, booking: Booking, *, now: datetime | None = None) -> Booking:
    """Record the start of use of a confirmed booking; checking in again keeps the first time."""
    now = now or utcnow()
    if booking.checked_in_at is not None:
        return booking
    if booking.kind != BookingKind.use:
        raise BookingNotConfirmed("A maintenance block is not checked in.", field="booking_id")
    if booking.status != BookingStatus.confirmed:
        raise BookingNotConfirmed(
            f"The booking is {booking.status.value}, not confirmed.", field="booking_id", status=booking.status.value
        )
    opens, closes = check_in_window(booking)
    if now < opens:
        raise CheckInTooEarly("Check-in opens 15 minutes before the booking starts.", field="booking_id",
                              opens_at=opens.isoformat())
    if now >= closes:
        raise BookingEnded("The booking has already ended.", field="booking_id")
    booking.checked_in_at = now
    # A late arrival did use the instrument after all.
    booking.no_show = False
    session.flush()
    return booking


def check_out(session: Session, booking: Booking, *, now: datetime | None = None) -> Booking:
    """Record the end of use and complete the booking; checking out again keeps the first time."""
    now = now or utcnow()
    if booking.checked_out_at is not None:
        return booking
    if booking.checked_in_at is None:
        raise NotCheckedIn("The booking has not been checked in.", field="booking_id")
    if booking.status != BookingStatus.confirmed:
        raise BookingNotConfirmed(
            f"The booking is {booking.status.value}, not confirmed; it cannot be checked out.", field="booking_id",
            status=booking.status.value,
        )
    booking.checked_out_at = max(now, booking.checked_in_at)
    booking.status = BookingStatus.completed
    session.flush()
    from labcommons.billing import ledger  # billing reads usage, so it imports booking

    ledger.charge_booking(session, booking, now=now)
    if now < booking.ends_at:
        # Done early: the rest of the booked time is free again, so the waitlist may have it.
        waitlist.slot_freed(session, booking, now=now)
    return booking


def usage_minutes(booking: Booking) -> int | None:
    """Whole minutes between check-in and check-out; None until both are recorded."""
    if booking.checked_in_at is None or booking.checked_out_at is None:
        return None
    return int((booking.checked_out_at - booking.checked_in_at).total_seconds() // 60)


@dataclass(frozen=True)
class UsageRecord:
    booking_id: int
    user_id: int
    checked_in_at: datetime
    checked_out_at: datetime
    minutes: int


def actual_usage(session: Session, instrument_id: int, start: datetime, end: datetime) -> list[UsageRecord]:
    """Completed sessions of an instrument that began in [start, end), for statistics and billing."""
    rows = session.scalars(
        select(Booking)
        .where(
            Booking.instrument_id == instrument_id,
            Booking.checked_in_at >= start,
            Booking.checked_in_at < end,
            Booking.checked_out_at.is_not(None),
        )
        .order_by(Booking.checked_in_at, Booking.id)
    ).all()
    return [
        UsageRecord(b.id, b.user_id, b.checked_in_at, b.checked_out_at, usage_minutes(b) or 0)
        for b in rows
        if b.checked_in_at is not None and b.checked_out_at is not None
    ]


# --- finding the booking at an instrument ------------------------------------------------------------------


def _user_bookings_near(session: Session, instrument_id: int, user_id: int, now: datetime) -> Sequence[Booking]:
    return session.scalars(
        select(Booking)
        .where(
            Booking.instrument_id == instrument_id,
            Booking.user_id == user_id,
            Booking.kind == BookingKind.use,
            Booking.status.in_(ACTIVE_STATUSES),
            Booking.ends_at > now,
            Booking.starts_at < now + timedelta(days=1),
        )
        .options(joinedload(Booking.instrument), joinedload(Booking.user))
        .order_by(Booking.starts_at)
        .with_for_update(of=Booking)
    ).all()


def booking_to_check_in(session: Session, instrument_id: int, user_id: int, *, now: datetime) -> Booking:
    """The user's booking of the instrument that may be checked in now (or is already checked in)."""
    found = _user_bookings_near(session, instrument_id, user_id, now)
    for booking in found:
        if booking.checked_in_at is not None and booking.checked_out_at is None:
            return booking
        opens, closes = check_in_window(booking)
        if opens <= now < closes:
            return booking
    if found:
        opens, _closes = check_in_window(found[0])
        raise CheckInTooEarly("Check-in opens 15 minutes before the booking starts.", field="user_email",
                              opens_at=opens.isoformat())
    raise NoCurrentBooking("The user has no booking of this instrument now.", field="user_email")


def booking_to_check_out(session: Session, instrument_id: int, user_id: int) -> Booking:
    """The user's checked-in, not checked-out booking of the instrument (even if it ran over its end)."""
    booking_service.lock_instrument(session, instrument_id)  # before the booking, like every booking writer
    booking = session.scalars(
        select(Booking)
        .where(
            Booking.instrument_id == instrument_id,
            Booking.user_id == user_id,
            Booking.checked_in_at.is_not(None),
            Booking.checked_out_at.is_(None),
        )
        .options(joinedload(Booking.instrument), joinedload(Booking.user))
        .order_by(Booking.checked_in_at.desc())
        .with_for_update(of=Booking)
    ).first()
    if booking is None:
        raise NotCheckedIn("The user is not checked in at this instrument.", field="user_email")
    return booking


@dataclass(frozen=True)
class NowAndNext:
    current: Booking | None
    upcoming: list[Booking]


def now_and_next(session: Session, instrument_id: int, *, now: datetime, limit: int = 5) -> NowAndNext:
    """The booking in progress (or still checked in) at an instrument and the next ones, maintenance included."""
    catalog.get_instrument(session, instrument_id)
    rows = session.scalars(
        select(Booking)
        .where(
            Booking.instrument_id == instrument_id,
            or_(
                and_(Booking.status.in_(ACTIVE_STATUSES), Booking.ends_at > now),
                # Someone still at the instrument after their time ran out.
                and_(Booking.status == BookingStatus.confirmed, Booking.checked_in_at.is_not(None),
                     Booking.checked_out_at.is_(None)),
            ),
            Booking.starts_at < now + timedelta(days=7),
        )
        .options(joinedload(Booking.user))
        .order_by(Booking.starts_at)
        .limit(limit + 2)
    ).all()
    current = next((b for b in rows if b.starts_at <= now), None)
    upcoming = [b for b in rows if b is not current and b.starts_at > now][:limit]
    return NowAndNext(current, upcoming)


# --- no-shows ----------------------------------------------------------------------------------------------


def mark_no_shows(
    session: Session, *, now: datetime | None = None, lookback: timedelta = NO_SHOW_LOOKBACK
) -> list[int]:
    """Flag confirmed use bookings not checked in by their start plus the grace period; returns their ids.

    Meant to run periodically from the job runner. Statuses stay confirmed (see the module docstring).
    """
    now = now or utcnow()
    rows = session.execute(
        select(Booking, BookingPolicy.no_show_grace_minutes)
        .outerjoin(BookingPolicy, BookingPolicy.instrument_id == Booking.instrument_id)
        .where(
            Booking.kind == BookingKind.use,
            Booking.status == BookingStatus.confirmed,
            Booking.checked_in_at.is_(None),
            Booking.no_show.is_(False),
            Booking.starts_at <= now,
            Booking.starts_at > now - lookback,
        )
        .with_for_update(of=Booking)
    ).all()
    marked = []
    for booking, grace in rows:
        # A missing policy row means the default grace.
        minutes = DEFAULT_NO_SHOW_GRACE_MINUTES if grace is None else grace
        if booking.starts_at + timedelta(minutes=minutes) <= now:
            booking.no_show = True
            marked.append(booking.id)
    session.flush()
    return sorted(marked)
