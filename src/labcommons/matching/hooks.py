"""The flush listener that keeps match documents current, registered by catalog/models.py.

It imports nothing of ours at module level, so registering it cannot start an import cycle between the
catalogue's and the matching domain's tables; the work is in matching.index.mark_changed.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session


@event.listens_for(Session, "after_flush")
def _after_flush(session: Session, _context: Any) -> None:
    from labcommons.matching.index import mark_changed

    mark_changed(session)
