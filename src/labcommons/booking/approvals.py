"""The approval queue: facility staff approve or decline pending bookings of their facility's instruments."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, false, or_, select
from sqlalchemy.orm import Session, joinedload

from labcommons.actor import Actor
from labcommons.booking import service as booking_service
from labcommons.booking import waitlist
from labcommons.booking.models import Booking, BookingStatus
from labcommons.booking.policy import facility_ref
from labcommons.catalog.models import Instrument
from labcommons.db import utcnow
from labcommons.errors import Conflict, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity.models import Role
from labcommons.identity.roles import PERMISSIONS, Action, require_some
from labcommons.notifications.service import notify

MAX_REASON_LENGTH = 1000


class BookingNotPending(Conflict):
    code = "booking_not_pending"


def facilities_filter(actor: Actor, action: Action) -> ColumnElement[bool]:
    """SQL over Instrument: the instruments whose facility the actor may do `action` for."""
    allowed = PERMISSIONS[action].roles
    grants = [g for g in actor.grants if g.role in allowed]
    if any(g.role == Role.platform_admin for g in grants):
        return Instrument.id.is_not(None)
    facility_ids = [g.facility_id for g in grants if g.facility_id is not None
                    and g.role in (Role.facility_staff, Role.facility_manager)]
    institution_ids = [g.institution_id for g in grants if g.institution_id is not None
                       and g.role == Role.institution_admin]
    if not facility_ids and not institution_ids:
        return false()
    return or_(Instrument.facility_id.in_(facility_ids), Instrument.institution_id.in_(institution_ids))


def pending_for(session: Session, actor: Actor, *, limit: int = 200) -> list[Booking]:
    """Pending bookings of the facilities the actor manages, oldest request first (instrument and user loaded)."""
    require_some(actor, Action.manage_facility_bookings)
    return list(session.scalars(
        select(Booking)
        .join(Instrument, Instrument.id == Booking.instrument_id)
        .where(Booking.status == BookingStatus.pending, facilities_filter(actor, Action.manage_facility_bookings))
        .options(joinedload(Booking.instrument), joinedload(Booking.user))
        .order_by(Booking.created_at, Booking.id)
        .limit(limit)
    ))


def _managed_pending(session: Session, actor: Actor, booking_id: int) -> Booking:
    require_some(actor, Action.manage_facility_bookings)
    # The instrument first, then the booking: the order every booking writer uses, so none deadlock.
    instrument_id = booking_service.booking_instrument_id(session, booking_id)
    if instrument_id is not None:
        booking_service.lock_instrument(session, instrument_id)
    booking = session.scalars(
        select(Booking).where(Booking.id == booking_id)
        .options(joinedload(Booking.instrument), joinedload(Booking.user))
        .with_for_update(of=Booking)
    ).first()
    # Bookings of facilities the actor does not run are reported exactly like missing ones.
    if booking is None or not roles.authorize(
        actor, Action.manage_facility_bookings, facility=facility_ref(booking.instrument)
    ):
        raise NotFound(f"Booking {booking_id} does not exist.", field="booking_id")
    if booking.status != BookingStatus.pending:
        raise BookingNotPending(f"The booking is {booking.status.value}, not pending.", field="booking_id",
                                status=booking.status.value)
    return booking


def approve(session: Session, actor: Actor, booking_id: int, *, now: datetime | None = None) -> Booking:
    """Confirm a pending booking; 404 for bookings of other facilities, 409 unless it is pending."""
    booking = _managed_pending(session, actor, booking_id)
    booking.status = BookingStatus.confirmed
    booking.decided_by_id = actor.user_id
    booking.decided_at = now or utcnow()
    session.flush()
    notify(session, "approved", booking, reason="")
    return booking


def decline(session: Session, actor: Actor, booking_id: int, reason: str, *, now: datetime | None = None) -> Booking:
    """Refuse a pending booking with a reason the user is told; its time becomes free."""
    reason = (reason or "").strip()
    if not reason:
        raise InvalidInput("Give the reason for declining; the user is told.", field="reason", code="missing_reason")
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidInput(f"The reason is limited to {MAX_REASON_LENGTH} characters.", field="reason",
                           code="too_long")
    booking = _managed_pending(session, actor, booking_id)
    now = now or utcnow()
    booking.status = BookingStatus.cancelled
    booking.cancelled_at = now
    booking.cancel_kind = "declined"
    booking.cancel_note = reason
    booking.cancelled_by_id = actor.user_id
    booking.decided_by_id = actor.user_id
    booking.decided_at = now
    session.flush()
    notify(session, "declined", booking, reason=reason)
    waitlist.slot_freed(session, booking, now=now)
    return booking
