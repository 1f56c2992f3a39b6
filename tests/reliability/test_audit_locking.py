"""The audit chain's head is taken at the outermost commit only, never when a SAVEPOINT is released.

SQLAlchemy fires `before_commit` for a savepoint's release too. Appending there took the head's row lock in the
middle of a booking (its insert runs in a savepoint) and held it while the booking then waited for its funding
account's row lock; a charge holding that account waited for the head at its commit: a deadlock, which four server
processes hit within seconds (tests/reliability/test_crash_safety.py found it).
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select, text

from labcommons.audit import chain
from labcommons.audit.models import AuditEntry
from labcommons.booking import service as booking_service
from tests.factories import World, next_grid_day


def test_a_savepoint_release_leaves_the_audit_head_free_until_the_commit(world: World) -> None:
    start = next_grid_day(days=3)
    with world.db.unit_of_work(write=False) as s:
        before = int(s.scalar(select(func.count()).select_from(AuditEntry)) or 0)
    with world.db.unit_of_work() as s:
        # reserve_slot inserts the booking inside a savepoint and releases it.
        booking = booking_service.reserve_slot(s, world.actors["bob"], world.instruments["CONF"], start,
                                               start + timedelta(hours=1))
        assert not s.in_nested_transaction()
        # Nothing appended yet, in this very transaction...
        assert s.scalar(select(func.count()).select_from(AuditEntry)) == before
        if not world.db.is_sqlite:
            # ...and the head's row is not locked: another connection takes it at once (NOWAIT raises otherwise).
            with world.db.engine.connect() as other:
                other.execute(text("SELECT seq FROM audit_head FOR UPDATE NOWAIT")).all()
                other.rollback()
    with world.db.unit_of_work(write=False) as s:
        created = s.scalars(select(AuditEntry.entity_id).where(AuditEntry.action == "booking.created")).all()
        assert str(booking.id) in created
        assert chain.verify(s).ok
