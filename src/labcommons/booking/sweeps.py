"""Periodic booking housekeeping run by the job queue: no-shows and expired waitlist offers."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from labcommons import jobs
from labcommons.booking import usage, waitlist
from labcommons.db import utcnow

log = logging.getLogger("labcommons.jobs")


@jobs.handler("booking_sweep")
def booking_sweep(session: Session, payload: dict[str, Any]) -> None:
    """Flag bookings nobody checked in to, and pass expired waitlist offers to the next in line."""
    now = utcnow()
    no_shows = usage.mark_no_shows(session, now=now)
    expired = waitlist.expire_offers(session, now)
    if no_shows or expired:
        log.info("booking sweep: %d no-shows, %d offers expired", len(no_shows), expired)
