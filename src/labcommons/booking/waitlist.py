"""Waitlists for taken slots. Placeholder hook called by booking.service; the waitlist work fills it in."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from labcommons.booking.models import Booking


def slot_freed(session: Session, booking: Booking, *, now: datetime) -> None:
    """A booking's time became free: offer it to the first eligible waiter."""
