"""The no-overlap invariant: held by the database itself, and by random book/cancel sequences."""

from __future__ import annotations

from datetime import datetime, timedelta
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import delete, select, text
from sqlalchemy.exc import IntegrityError

from labcommons.booking import service
from labcommons.booking.models import ACTIVE_STATUSES, Booking, BookingStatus
from labcommons.db import Database
from tests.factories import World, build_world, next_grid_day


def _raw_insert(db: Database, world: World, start: datetime, end: datetime, status: str = "confirmed") -> None:
    with db.unit_of_work() as s:
        s.add(Booking(instrument_id=world.instruments["CONF"], user_id=world.actors["alice"].user_id,
                      starts_at=start, ends_at=end, status=BookingStatus(status), purpose=""))
        s.flush()


def test_database_refuses_overlap_even_without_the_service(db: Database) -> None:
    world = build_world(db)
    t0 = next_grid_day()
    _raw_insert(db, world, t0, t0 + timedelta(hours=2))
    with pytest.raises(IntegrityError):
        _raw_insert(db, world, t0 + timedelta(hours=1), t0 + timedelta(hours=3))
    _raw_insert(db, world, t0 + timedelta(hours=2), t0 + timedelta(hours=3))  # back to back is fine
    _raw_insert(db, world, t0, t0 + timedelta(hours=2), status="cancelled")  # inactive rows never conflict


def test_database_refuses_reactivating_into_an_overlap(db: Database) -> None:
    world = build_world(db)
    t0 = next_grid_day()
    _raw_insert(db, world, t0, t0 + timedelta(hours=1), status="cancelled")
    _raw_insert(db, world, t0, t0 + timedelta(hours=1))
    with pytest.raises(IntegrityError), db.unit_of_work() as s:
        s.execute(text("UPDATE booking SET status = 'confirmed' WHERE status = 'cancelled'"))


def test_end_must_follow_start_in_the_database(db: Database) -> None:
    world = build_world(db)
    t0 = next_grid_day()
    with pytest.raises(IntegrityError):
        _raw_insert(db, world, t0, t0)


SLOTS = 16


class BookingMachine(RuleBasedStateMachine):
    """Random book and cancel calls agree with an in-memory model and never leave an overlap."""

    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world
        self.db = world.db
        self.base = next_grid_day()
        self.model: dict[int, tuple[int, int]] = {}  # booking id → (first slot, end slot), active only

    @initialize()
    def clean(self) -> None:
        with self.db.unit_of_work() as s:
            s.execute(delete(Booking))

    def _at(self, slot: int) -> datetime:
        return self.base + timedelta(minutes=30 * slot)

    @rule(first=st.integers(0, SLOTS - 1), length=st.integers(1, 4), who=st.sampled_from(["alice", "bob"]))
    def book(self, first: int, length: int, who: str) -> None:
        end = first + length
        expected_ok = all(end <= a or b <= first for a, b in self.model.values())
        try:
            with self.db.unit_of_work() as s:
                booking = service.reserve_slot(
                    s, self.world.actors[who], self.world.instruments["CONF"], self._at(first), self._at(end)
                )
                booking_id = booking.id
        except service.OverlappingBooking:
            assert not expected_ok, f"refused [{first},{end}) though the model has {self.model}"
            return
        assert expected_ok, f"accepted [{first},{end}) over {self.model}"
        self.model[booking_id] = (first, end)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        booking_id = data.draw(st.sampled_from(sorted(self.model)))
        owner = self._owner(booking_id)
        with self.db.unit_of_work() as s:
            service.cancel_booking(s, self.world.actors[owner], booking_id)
        del self.model[booking_id]

    def _owner(self, booking_id: int) -> str:
        with self.db.unit_of_work(write=False) as s:
            user_id = s.scalar(select(Booking.user_id).where(Booking.id == booking_id))
        return next(name for name, actor in self.world.actors.items() if actor.user_id == user_id)

    @invariant()
    def database_agrees_with_model_and_has_no_overlap(self) -> None:
        with self.db.unit_of_work(write=False) as s:
            rows = s.execute(
                select(Booking.id, Booking.starts_at, Booking.ends_at).where(Booking.status.in_(ACTIVE_STATUSES))
            ).all()
        assert {r.id for r in rows} == set(self.model)
        spans = sorted((r.starts_at, r.ends_at) for r in rows)
        for (_, end), (next_start, _) in pairwise(spans):
            assert end <= next_start


def test_random_book_and_cancel_sequences_keep_the_invariant(db: Database) -> None:
    world = build_world(db)
    run_state_machine_as_test(
        lambda: BookingMachine(world),
        settings=settings(max_examples=25, stateful_step_count=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )
