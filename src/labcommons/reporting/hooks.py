"""The flush listener that marks changed bookings' days for the statistics, registered by booking/models.py.

It imports nothing of ours at module level, so registering it cannot start an import cycle; the work is in
reporting.aggregate.mark_changed.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session


@event.listens_for(Session, "after_flush")
def _after_flush(session: Session, _context: Any) -> None:
    from labcommons.reporting.aggregate import mark_changed

    mark_changed(session)
