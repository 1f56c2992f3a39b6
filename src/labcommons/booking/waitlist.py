"""Waitlists for taken slots: when the time frees up, the oldest eligible waiter is offered it for a while.

An offer does not hold the time: anyone may still book it, and accepting then fails clearly. Offers that run out
pass to the next waiter (expire_offers, run periodically).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from labcommons.actor import Actor
from labcommons.booking import policy
from labcommons.booking import service as booking_service
from labcommons.booking.models import (
    Booking,
    BookingPolicy,
    BookingStatus,
    WaitlistEntry,
    WaitlistStatus,
)
from labcommons.catalog import service as catalog
from labcommons.catalog.models import Instrument
from labcommons.db import utcnow
from labcommons.errors import Conflict, DomainError, NotFound
from labcommons.identity import service as identity
from labcommons.identity.models import User
from labcommons.identity.roles import grants_of
from labcommons.notifications.service import notify

DEFAULT_OFFER_MINUTES = 60
OPEN_STATUSES = (WaitlistStatus.waiting, WaitlistStatus.offered)


class SlotIsFree(Conflict):
    code = "slot_is_free"


class AlreadyWaiting(Conflict):
    code = "already_waiting"


class OfferNotLive(Conflict):
    """The entry has no offer, or its offer ran out."""

    code = "offer_not_live"


class SlotTakenMeanwhile(Conflict):
    code = "slot_taken"


@dataclass(frozen=True)
class EntryView:
    entry: WaitlistEntry
    instrument: Instrument


def _taken(session: Session, instrument_id: int, starts_at: datetime, ends_at: datetime) -> bool:
    return bool(session.scalar(select(booking_service.busy_during(instrument_id, starts_at, ends_at))))


def join(
    session: Session, actor: Actor, instrument_id: int, starts_at: datetime, ends_at: datetime, purpose: str = "",
    *, now: datetime | None = None,
) -> WaitlistEntry:
    """Wait for a taken interval; SlotIsFree when nothing holds it (book it instead)."""
    now = now or utcnow()
    instrument = catalog.get_instrument(session, instrument_id)
    # Waiting only makes sense for a request that could be booked once the time is free.
    booking_service.check_booking_request(instrument, actor, starts_at, ends_at, purpose, now=now)
    if not _taken(session, instrument.id, starts_at, ends_at):
        raise SlotIsFree("The slot is free: book it.", field="starts_at")
    duplicate = session.scalar(
        select(WaitlistEntry.id).where(
            WaitlistEntry.user_id == actor.user_id, WaitlistEntry.instrument_id == instrument.id,
            WaitlistEntry.starts_at == starts_at, WaitlistEntry.ends_at == ends_at,
            WaitlistEntry.status.in_(OPEN_STATUSES),
        )
    )
    if duplicate is not None:
        raise AlreadyWaiting("You are already on the waitlist for this time.", field="starts_at", entry_id=duplicate)
    entry = WaitlistEntry(
        instrument_id=instrument.id, user_id=actor.user_id, starts_at=starts_at, ends_at=ends_at, purpose=purpose,
        status=WaitlistStatus.waiting, created_at=now,
    )
    session.add(entry)
    session.flush()
    return entry


def _own_entry(session: Session, actor: Actor, entry_id: int) -> WaitlistEntry:
    entry = session.scalars(
        select(WaitlistEntry)
        .where(WaitlistEntry.id == entry_id, WaitlistEntry.user_id == actor.user_id)
        .with_for_update()
    ).first()
    if entry is None:
        raise NotFound(f"Waitlist entry {entry_id} does not exist.", field="entry_id")
    return entry


def withdraw(session: Session, actor: Actor, entry_id: int, *, now: datetime | None = None) -> WaitlistEntry:
    """Leave the waitlist; an offer the user held passes to the next waiter."""
    now = now or utcnow()
    entry = _own_entry(session, actor, entry_id)
    if entry.status not in OPEN_STATUSES:
        raise Conflict(f"The entry is already {entry.status.value}.", field="entry_id", status=entry.status.value)
    was_offered = entry.status == WaitlistStatus.offered
    entry.status = WaitlistStatus.withdrawn
    session.flush()
    if was_offered:
        _offer_free_time(session, entry.instrument_id, entry.starts_at, entry.ends_at, now=now)
    return entry


def list_entries(session: Session, actor: Actor) -> list[EntryView]:
    """The actor's waitlist entries, open ones first, then by start."""
    rows = session.execute(
        select(WaitlistEntry, Instrument)
        .join(Instrument, Instrument.id == WaitlistEntry.instrument_id)
        .where(WaitlistEntry.user_id == actor.user_id)
        .options(joinedload(Instrument.institution))
        .order_by(WaitlistEntry.starts_at.desc(), WaitlistEntry.id.desc())
        .limit(200)
    ).all()
    views = [EntryView(entry, instrument) for entry, instrument in rows]
    return sorted(views, key=lambda v: v.entry.status not in OPEN_STATUSES)


def offer_minutes(session: Session, instrument_id: int) -> int:
    """How long a waitlist offer lasts on an instrument (the policy's, else the default)."""
    minutes = session.scalar(
        select(BookingPolicy.waitlist_offer_minutes).where(BookingPolicy.instrument_id == instrument_id)
    )
    return minutes or DEFAULT_OFFER_MINUTES


def _eligible(session: Session, instrument: Instrument, entry: WaitlistEntry, *, now: datetime) -> bool:
    """Dry run of the booking rules for the waiter, short of writing."""
    user = session.get(User, entry.user_id)
    if user is None or not user.is_active:
        return False
    # With the waiter's role grants, so that the policy's exemptions for facility staff apply as when they book.
    actor = identity.actor_for(user, grants=grants_of(session, user.id))
    try:
        booking_service.check_booking_request(instrument, actor, entry.starts_at, entry.ends_at, entry.purpose,
                                              now=now)
        policy.check_policy(session, actor, instrument, entry.starts_at, entry.ends_at, now=now)
    except DomainError:
        return False
    return True


def _freed_booking(session: Session, instrument_id: int, starts_at: datetime, ends_at: datetime) -> Booking | None:
    """The most recently cancelled booking over an interval: what an offer passed on after expiry is about."""
    return session.scalars(
        select(Booking)
        .where(Booking.instrument_id == instrument_id, Booking.status == BookingStatus.cancelled,
               Booking.starts_at < ends_at, Booking.ends_at > starts_at)
        .options(joinedload(Booking.instrument))
        .order_by(Booking.cancelled_at.desc(), Booking.id.desc())
    ).first()


def _offer_free_time(
    session: Session, instrument_id: int, starts_at: datetime, ends_at: datetime, *, now: datetime,
    freed: Booking | None = None,
) -> list[WaitlistEntry]:
    """Offer free time in [starts_at, ends_at) to waiters, oldest first, one live offer per stretch of time."""
    booking_service.lock_instrument(session, instrument_id)
    candidates = session.scalars(
        select(WaitlistEntry)
        .where(
            WaitlistEntry.instrument_id == instrument_id,
            WaitlistEntry.status.in_(OPEN_STATUSES),
            WaitlistEntry.starts_at < ends_at,
            WaitlistEntry.ends_at > starts_at,
        )
        .order_by(WaitlistEntry.created_at, WaitlistEntry.id)
        .with_for_update()
    ).all()
    waiting = [e for e in candidates if e.status == WaitlistStatus.waiting]
    if not waiting:
        return []
    # Two waiters are never offered overlapping time at once. A waiter's interval may reach beyond the freed one,
    # so live offers are looked up over the whole stretch the candidates wait for.
    live = list(session.scalars(
        select(WaitlistEntry).where(
            WaitlistEntry.instrument_id == instrument_id,
            WaitlistEntry.status == WaitlistStatus.offered,
            WaitlistEntry.offer_expires_at > now,
            WaitlistEntry.starts_at < max(e.ends_at for e in waiting),
            WaitlistEntry.ends_at > min(e.starts_at for e in waiting),
        )
    ))
    instrument = catalog.get_instrument(session, instrument_id)
    minutes = offer_minutes(session, instrument_id)
    offered: list[WaitlistEntry] = []
    for entry in waiting:
        if entry.starts_at <= now:
            entry.status = WaitlistStatus.expired
            continue
        if any(o.starts_at < entry.ends_at and entry.starts_at < o.ends_at for o in live):
            continue
        if _taken(session, instrument_id, entry.starts_at, entry.ends_at):
            continue
        if not _eligible(session, instrument, entry, now=now):
            continue
        entry.status = WaitlistStatus.offered
        entry.offered_at = now
        entry.offer_expires_at = now + timedelta(minutes=minutes)
        live.append(entry)
        offered.append(entry)
    session.flush()
    for entry in offered:
        about = freed or _freed_booking(session, instrument_id, entry.starts_at, entry.ends_at)
        # The notification names the freed booking; without one (never in practice) the offer still stands.
        if about is not None:
            # The freed booking's holder is not the recipient: the offer goes to the entry's user (`user_id`).
            notify(session, "waitlist_offer", about, entry_id=entry.id, user_id=entry.user_id)
    return offered


def slot_freed(session: Session, booking: Booking, *, now: datetime) -> None:
    """A booking's time became free: offer it to the first eligible waiter."""
    _offer_free_time(session, booking.instrument_id, booking.starts_at, booking.ends_at, now=now, freed=booking)


def accept(session: Session, actor: Actor, entry_id: int, *, now: datetime | None = None,
           account_id: int | None = None) -> Booking:
    """Book the offered time while the offer is live (charged to `account_id` where the facility charges);
    SlotTakenMeanwhile if someone booked it first."""
    now = now or utcnow()
    entry = _own_entry(session, actor, entry_id)
    if entry.status != WaitlistStatus.offered:
        raise OfferNotLive("This waitlist entry has no offer to accept.", field="entry_id",
                           status=entry.status.value)
    if entry.offer_expires_at is None or entry.offer_expires_at <= now:
        raise OfferNotLive("The offer has expired.", field="entry_id", status="expired")
    try:
        booking = booking_service.reserve_slot(
            session, actor, entry.instrument_id, entry.starts_at, entry.ends_at, entry.purpose, now=now,
            account_id=account_id,
        )
    except booking_service.OverlappingBooking as exc:
        raise SlotTakenMeanwhile(
            "Someone else booked this time after it was offered to you; it is no longer free.", field="entry_id",
        ) from exc
    entry.status = WaitlistStatus.accepted
    entry.booking_id = booking.id
    session.flush()
    return booking


def expire_offers(session: Session, now: datetime | None = None) -> int:
    """Mark offers that ran out as expired and pass their time to the next waiters; returns how many expired."""
    now = now or utcnow()
    expired = session.scalars(
        select(WaitlistEntry)
        .where(WaitlistEntry.status == WaitlistStatus.offered, WaitlistEntry.offer_expires_at <= now)
        .order_by(WaitlistEntry.offer_expires_at, WaitlistEntry.id)
        .with_for_update()
    ).all()
    for entry in expired:
        entry.status = WaitlistStatus.expired
    session.flush()
    for entry in expired:
        _offer_free_time(session, entry.instrument_id, entry.starts_at, entry.ends_at, now=now)
    return len(expired)
