"""Maintenance and downtime blocks: bookings of kind "maintenance" held by the staff member who set them.

Being bookings, blocks are covered by the database's no-overlap constraint, so no user can book into one. A block
over users' bookings is refused until the staff member confirms; the displaced bookings are then cancelled with the
reason and their owners notified. Nothing is displaced silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from labcommons.actor import Actor
from labcommons.booking import service, waitlist
from labcommons.booking.models import ACTIVE_STATUSES, Booking, BookingKind, BookingStatus
from labcommons.catalog import service as catalog
from labcommons.catalog.models import Instrument
from labcommons.db import utcnow
from labcommons.errors import Conflict, InvalidInput, NotFound
from labcommons.identity.roles import Action, FacilityRef, require
from labcommons.notifications.service import notify

MAX_REASON_LENGTH = 2000
MAX_BLOCK = timedelta(days=366)


class DisplacesBookings(Conflict):
    """The block overlaps users' bookings; `bookings` lists them. Confirm to cancel them and notify their owners."""

    code = "displaces_bookings"


class OverlappingBlock(Conflict):
    code = "overlapping_block"


def managed_instrument(session: Session, actor: Actor, instrument_id: int) -> Instrument:
    """The instrument, if the actor manages its facility's bookings; Forbidden otherwise."""
    instrument = catalog.get_instrument(session, instrument_id)
    require(actor, Action.manage_facility_bookings,
            facility=FacilityRef(id=instrument.facility_id, institution_id=instrument.institution_id))
    return instrument


def _check_block(starts_at: datetime, ends_at: datetime, reason: str, *, now: datetime) -> None:
    if ends_at <= starts_at:
        raise InvalidInput("The end must be after the start.", field="ends_at", code="ends_before_start")
    if ends_at <= now:
        raise InvalidInput("The block has already ended.", field="ends_at", code="ends_in_past")
    if ends_at - starts_at > MAX_BLOCK:
        raise InvalidInput("A block may last at most a year.", field="ends_at", code="block_too_long")
    if not reason.strip():
        raise InvalidInput("Give the reason; it is sent to anyone displaced.", field="reason", code="missing_reason")
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidInput(f"The reason is limited to {MAX_REASON_LENGTH} characters.", field="reason",
                           code="too_long")


def _overlapping_use(session: Session, instrument_id: int, starts_at: datetime, ends_at: datetime) -> list[Booking]:
    return list(session.scalars(
        select(Booking)
        .where(
            Booking.instrument_id == instrument_id,
            Booking.kind == BookingKind.use,
            Booking.status.in_(ACTIVE_STATUSES),
            Booking.starts_at < ends_at,
            Booking.ends_at > starts_at,
        )
        .options(joinedload(Booking.user), joinedload(Booking.instrument))
        .order_by(Booking.starts_at, Booking.id)
    ))


def describe(booking: Booking) -> dict[str, object]:
    """A displaced booking as the 409 body and the confirmation page list it."""
    return {
        "booking_id": booking.id, "user_id": booking.user_id, "user_name": booking.user.name,
        "user_email": booking.user.email, "starts_at": booking.starts_at.isoformat(),
        "ends_at": booking.ends_at.isoformat(), "status": booking.status.value,
    }


def preview_block(
    session: Session, actor: Actor, instrument_id: int, starts_at: datetime, ends_at: datetime
) -> list[Booking]:
    """The active use bookings (with their owners) a block of [starts_at, ends_at) would displace."""
    instrument = managed_instrument(session, actor, instrument_id)
    return _overlapping_use(session, instrument.id, starts_at, ends_at)


def create_block(
    session: Session, actor: Actor, instrument_id: int, starts_at: datetime, ends_at: datetime, reason: str,
    confirm_displace: bool = False, *, now: datetime | None = None,
) -> tuple[Booking, list[Booking]]:
    """Block the instrument for maintenance; DisplacesBookings unless confirmed when users' bookings overlap.

    Returns the block and the bookings it displaced (cancelled, owners notified).
    """
    now = now or utcnow()
    instrument = managed_instrument(session, actor, instrument_id)
    reason = reason.strip()
    _check_block(starts_at, ends_at, reason, now=now)
    # Under the lock no booking can slip in between listing the displaced ones and inserting the block.
    service.lock_instrument(session, instrument.id)
    displaced = _overlapping_use(session, instrument.id, starts_at, ends_at)
    if displaced and not confirm_displace:
        raise DisplacesBookings(
            f"The block would displace {len(displaced)} booking(s); confirm to cancel them and notify their owners.",
            field="confirm", bookings=[describe(b) for b in displaced],
        )
    for booking in displaced:
        booking.status = BookingStatus.cancelled
        booking.cancelled_at = now
        booking.cancel_kind = "maintenance"
        booking.cancel_note = reason
        booking.cancelled_by_id = actor.user_id
    session.flush()
    for booking in displaced:
        notify(session, "maintenance", booking, reason=reason)
    block = Booking(
        instrument_id=instrument.id, user_id=actor.user_id, starts_at=starts_at, ends_at=ends_at,
        status=BookingStatus.confirmed, purpose=reason, kind=BookingKind.maintenance,
    )
    block.instrument = instrument
    try:
        with session.begin_nested():
            session.add(block)
            session.flush()
    except IntegrityError as exc:
        # Only another maintenance block can still overlap: every use booking in the way was cancelled above.
        if not service._is_overlap_violation(exc):
            raise
        raise OverlappingBlock("This time overlaps another maintenance block.", field="starts_at") from exc
    return block, displaced


def list_blocks(
    session: Session, actor: Actor, instrument_id: int, *, now: datetime | None = None
) -> tuple[Instrument, Sequence[Booking]]:
    """The instrument and its maintenance blocks that have not ended, soonest first."""
    now = now or utcnow()
    instrument = managed_instrument(session, actor, instrument_id)
    blocks = session.scalars(
        select(Booking)
        .where(
            Booking.instrument_id == instrument.id,
            Booking.kind == BookingKind.maintenance,
            Booking.status.in_(ACTIVE_STATUSES),
            Booking.ends_at > now,
        )
        .options(joinedload(Booking.user))
        .order_by(Booking.starts_at, Booking.id)
    ).all()
    return instrument, blocks


def cancel_block(
    session: Session, actor: Actor, instrument_id: int, block_id: int, *, now: datetime | None = None
) -> Booking:
    """Lift a maintenance block; its time becomes bookable again and is offered to the waitlist."""
    now = now or utcnow()
    instrument = managed_instrument(session, actor, instrument_id)
    block = session.scalars(
        select(Booking)
        .where(Booking.id == block_id, Booking.instrument_id == instrument.id,
               Booking.kind == BookingKind.maintenance)
        .with_for_update()
    ).first()
    if block is None or block.status not in ACTIVE_STATUSES:
        raise NotFound(f"Maintenance block {block_id} does not exist.", field="block_id")
    block.instrument = instrument
    block.status = BookingStatus.cancelled
    block.cancelled_at = now
    block.cancel_kind = "staff"
    block.cancelled_by_id = actor.user_id
    session.flush()
    waitlist.slot_freed(session, block, now=now)
    return block
