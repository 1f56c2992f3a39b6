"""What users are told about their bookings. Placeholder hook; the notifications work fills it in."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from labcommons.booking.models import Booking

# Events services announce; each becomes an e-mail (zh/en) unless the user switched it off.
EVENTS = ("created", "requested", "approved", "declined", "cancelled", "reminder", "waitlist_offer", "maintenance")


def notify(session: Session, event: str, booking: Booking, **data: Any) -> None:
    """Queue the notification of `event` about `booking`; it is sent after the commit by the job runner."""
