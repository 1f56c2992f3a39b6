"""Concurrent transitions of one order on PostgreSQL: two requests in two threads with their own sessions, many
times over; exactly one wins every time and the event log has no gap. (SQLite serialises writers outright.)"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator

import pytest

from labcommons.actor import Actor
from labcommons.errors import DomainError
from labcommons.orders import quotes, service
from labcommons.orders.models import OrderStatus, QuoteStatus
from tests.factories import World, grant
from tests.orders.order_support import add_service, at_once, events_of, far_day, new_order, status_of

S = OrderStatus
ROUNDS = 15


@pytest.fixture
def pg_world(world: World) -> World:
    if world.db.is_sqlite:
        pytest.skip("SQLite serialises write transactions; the race needs PostgreSQL")
    return world


def race(*work: Callable[[], None]) -> list[str]:
    """Run each piece of work in its own thread at the same moment; "ok" or the error code of each."""

    def outcome(result: object) -> str:
        if isinstance(result, DomainError):
            return f"{result.status_code}:{result.code}"
        if isinstance(result, Exception):  # an unmapped database error would be a 500: the test must see it
            return f"crash:{type(result).__name__}:{result}"
        return "ok"

    return [outcome(r) for r in at_once(*work)]


def both_read_first(monkeypatch: pytest.MonkeyPatch, *racing: OrderStatus) -> None:
    """Make both transactions moving an order to one of the `racing` statuses read it before either writes (the
    interleaving that matters)."""
    gate = threading.Barrier(2)
    original = service._check_guards

    def wait_then_check(session: object, order: object, to: OrderStatus) -> None:
        # Only the racing steps wait: a lone submission waiting here (new_order's) broke the barrier for good, after
        # which nothing was interleaved and a thread could find the order already moved (illegal_transition).
        # If the other thread was refused earlier there is nothing to wait for.
        if to in racing:
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
    both_read_first(monkeypatch, S.cancelled, S.rejected)
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

        outcomes = race(cancel, reject)
        assert sorted(outcomes) == ["409:order_changed", "ok"], outcomes
        final = S.cancelled if outcomes[0] == "ok" else S.rejected
        assert status_of(world, order_id) == final
        assert assert_no_gap(world, order_id) == [S.draft, S.submitted, final]


def quoted_orders(world: World, alice: Actor) -> Iterator[tuple[int, Callable[[], None]]]:
    """ROUNDS orders of bob's, each quoted by alice, with the call by which bob accepts the quote."""
    service_id = add_service(world)
    for _round in range(ROUNDS):
        order_id = new_order(world, service_id, submit=True)
        with world.db.unit_of_work() as s:
            quote_id = quotes.issue_quote(s, alice, order_id, [("Library prep", 2, 50000)], far_day()).id

        def accept(order_id: int = order_id, quote_id: int = quote_id) -> None:
            with world.db.unit_of_work() as s:
                quotes.accept_quote(s, world.actors["bob"], order_id, quote_id)

        yield order_id, accept


def test_two_accepts_of_one_quote_record_one(pg_world: World) -> None:
    world = pg_world
    bob, alice = world.actors["bob"], grant(world, "alice")
    for order_id, accept in quoted_orders(world, alice):
        outcomes = race(accept, accept)
        assert outcomes.count("ok") == 1, outcomes
        assert next(o for o in outcomes if o != "ok").startswith("409:"), outcomes
        assert status_of(world, order_id) == S.accepted
        assert assert_no_gap(world, order_id) == [S.draft, S.submitted, S.quoted, S.accepted]
        with world.db.unit_of_work(write=False) as s:
            [q] = quotes.list_quotes(s, bob, order_id)
            assert q.status == QuoteStatus.accepted


def test_accept_races_a_new_quote_version(pg_world: World) -> None:
    world = pg_world
    bob, alice = world.actors["bob"], grant(world, "alice")
    for order_id, accept in quoted_orders(world, alice):

        def requote(order_id: int = order_id) -> None:
            with world.db.unit_of_work() as s:
                quotes.issue_quote(s, alice, order_id, [("Library prep", 2, 40000)], far_day())

        outcomes = race(accept, requote)
        assert outcomes.count("ok") == 1 and all(o == "ok" or o.startswith("409:") for o in outcomes), outcomes
        with world.db.unit_of_work(write=False) as s:
            states = sorted((q.version, q.status) for q in quotes.list_quotes(s, bob, order_id))
        if outcomes[0] == "ok":  # accepted first: the work is agreed and no new version exists
            assert states == [(1, QuoteStatus.accepted)] and status_of(world, order_id) == S.accepted
        else:
            assert states == [(1, QuoteStatus.superseded), (2, QuoteStatus.offered)]
            assert status_of(world, order_id) == S.quoted
        assert_no_gap(world, order_id)
