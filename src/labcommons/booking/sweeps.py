"""Periodic housekeeping run by the job queue: no-shows, expired waitlist offers and old finished jobs."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from labcommons import jobs
from labcommons.booking import usage, waitlist
from labcommons.db import utcnow

log = logging.getLogger("labcommons.jobs")


@jobs.handler("booking_sweep", writes=True)
def booking_sweep(session: Session, payload: dict[str, Any]) -> None:
    """Flag bookings nobody checked in to, pass expired waitlist offers on, and prune old finished jobs."""
    now = utcnow()
    no_shows = usage.mark_no_shows(session, now=now)
    expired = waitlist.expire_offers(session, now)
    pruned = jobs.prune(session, now)
    from labcommons.billing import ledger  # billing imports booking

    charged = ledger.charge_due_bookings(session, now=now)
    if charged:
        log.info("booking sweep: %d finished bookings charged", len(charged))
    if no_shows or expired or pruned:
        log.info("booking sweep: %d no-shows, %d offers expired, %d old jobs pruned", len(no_shows), expired, pruned)
