"""Per-instrument booking rules set by facility managers (approval, qualification, hours, quotas ...).

Placeholder hooks called by booking.service; the booking-policy work fills them in.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.booking.models import Booking, BookingStatus
from labcommons.catalog.models import Instrument


def check_policy(
    session: Session, actor: Actor, instrument: Instrument, starts_at: datetime, ends_at: datetime, *,
    now: datetime, exclude_booking_id: int | None = None,
) -> None:
    """Raise a domain error naming the rule a new booking of [starts_at, ends_at) breaks."""


def initial_status(session: Session, actor: Actor, instrument: Instrument) -> BookingStatus:
    """pending when the instrument's bookings need approval, else confirmed."""
    return BookingStatus.confirmed


def check_cancellation(session: Session, actor: Actor, booking: Booking, *, now: datetime) -> None:
    """Raise a domain error when the owner may no longer cancel (past the cancellation deadline)."""
