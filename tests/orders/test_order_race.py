"""Concurrent transitions of one order on PostgreSQL: two requests in two threads with their own sessions, many
times over; exactly one wins every time and the event log has no gap. (SQLite serialises writers outright.)"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable

import pytest

from labcommons.db import Database
from labcommons.errors import DomainError
from labcommons.orders import quotes, service
from labcommons.orders.models import OrderStatus, QuoteStatus
from tests.factories import World
from tests.orders.order_support import add_service, events_of, far_day, grant, new_order, status_of

S = OrderStatus
ROUNDS = 15


@pytest.fixture
def pg_world(world: World) -> World:
    if world.db.is_sqlite:
        pytest.skip("SQLite serialises write transactions; the race needs PostgreSQL")
    return world


def race(db: Database, *work: Callable[[], None]) -> list[str]:
    """Run each piece of work in its own thread at the same moment; "ok" or the error code of each."""
    start = threading.Barrier(len(work))
    outcomes: list[str] = [""] * len(work)

    def run(i: int, fn: Callable[[], None]) -> None:
        start.wait(timeout=10)
        try:
            fn()
            outcomes[i] = "ok"
        except DomainError as exc:
            outcomes[i] = f"{exc.status_code}:{exc.code}"
        except Exception as exc:  # an unmapped database error would be a 500: the test must see it
            outcomes[i] = f"crash:{type(exc).__name__}:{exc}"

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(work)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return outcomes


def both_read_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make both transactions read the order before either writes (the interleaving that matters)."""
    gate = threading.Barrier(2)
    original = service._check_guards

    def wait_then_check(session: object, order: object, to: object) -> None:
        # If the other thread was refused earlier there is nothing to wait for.
        with contextlib.suppress(threading.BrokenBarrierError):
            gate.wait(timeout=2)
        original(session, order, to)  # type: ignore[arg-type]

    monkeypatch.setattr(service, "_check_guards", wait_then_check)


def assert_no_gap(world: World, order_id: int) -> list[OrderStatus]:
    events = events_of(world, order_id)
    assert [e.version for e in events] == list(range(1, len(events) + 1))
    for before, after in itertools.pairwise(events):
        assert after.from_status == before.to_status
    return [e.to_status for e in events]


def test_cancel_by_the_user_races_reject_by_staff(pg_world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world = pg_world
    both_read_first(monkeypatch)
    service_id = add_service(world)
    bob, alice = world.actors["bob"], grant(world, "alice")
    for _round in range(ROUNDS):
        order_id = new_order(world, service_id, submit=True)

        def cancel(order_id: int = order_id) -> None:
            with world.db.unit_of_work() as s:
                service.transition(s, bob, order_id, S.cancelled)

        def reject(order_id: int = order_id) -> None:
            with world.db.unit_of_work() as s:
                service.transition(s, alice, order_id, S.rejected, comment="out of scope")

        outcomes = race(world.db, cancel, reject)
        assert sorted(outcomes) == ["409:order_changed", "ok"], outcomes
        final = S.cancelled if outcomes[0] == "ok" else S.rejected
        assert status_of(world, order_id) == final
        assert assert_no_gap(world, order_id) == [S.draft, S.submitted, final]


def test_two_accepts_of_one_quote_record_one(pg_world: World) -> None:
    world = pg_world
    service_id = add_service(world)
    bob, alice = world.actors["bob"], grant(world, "alice")
    for _round in range(ROUNDS):
        order_id = new_order(world, service_id, submit=True)
        with world.db.unit_of_work() as s:
            quote_id = quotes.issue_quote(s, alice, order_id, [("Library prep", 2, 50000)], far_day()).id

        def accept(order_id: int = order_id, quote_id: int = quote_id) -> None:
            with world.db.unit_of_work() as s:
                quotes.accept_quote(s, bob, order_id, quote_id)

        outcomes = race(world.db, accept, accept)
        assert outcomes.count("ok") == 1, outcomes
        assert next(o for o in outcomes if o != "ok").startswith("409:"), outcomes
        assert status_of(world, order_id) == S.accepted
        assert assert_no_gap(world, order_id) == [S.draft, S.submitted, S.quoted, S.accepted]
        with world.db.unit_of_work(write=False) as s:
            [q] = quotes.list_quotes(s, bob, order_id)
            assert q.status == QuoteStatus.accepted


def test_accept_races_a_new_quote_version(pg_world: World) -> None:
    world = pg_world
    service_id = add_service(world)
    bob, alice = world.actors["bob"], grant(world, "alice")
    for _round in range(ROUNDS):
        order_id = new_order(world, service_id, submit=True)
        with world.db.unit_of_work() as s:
            quote_id = quotes.issue_quote(s, alice, order_id, [("Library prep", 2, 50000)], far_day()).id

        def accept(order_id: int = order_id, quote_id: int = quote_id) -> None:
            with world.db.unit_of_work() as s:
                quotes.accept_quote(s, bob, order_id, quote_id)

        def requote(order_id: int = order_id) -> None:
            with world.db.unit_of_work() as s:
                quotes.issue_quote(s, alice, order_id, [("Library prep", 2, 40000)], far_day())

        outcomes = race(world.db, accept, requote)
        assert outcomes.count("ok") == 1 and all(o == "ok" or o.startswith("409:") for o in outcomes), outcomes
        with world.db.unit_of_work(write=False) as s:
            states = sorted((q.version, q.status) for q in quotes.list_quotes(s, bob, order_id))
        if outcomes[0] == "ok":  # accepted first: the work is agreed and no new version exists
            assert states == [(1, QuoteStatus.accepted)] and status_of(world, order_id) == S.accepted
        else:
            assert states == [(1, QuoteStatus.superseded), (2, QuoteStatus.offered)]
            assert status_of(world, order_id) == S.quoted
        assert_no_gap(world, order_id)
