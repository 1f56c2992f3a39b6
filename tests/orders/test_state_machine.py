"""The order state machine: every (from, to, party) against TRANSITIONS, holds and resumes, comments, via-only
steps, guards and the event log, on both databases."""

from __future__ import annotations

import pytest

from labcommons.actor import Actor
from labcommons.errors import DomainError, Forbidden, InvalidInput, NotFound
from labcommons.orders import service
from labcommons.orders.models import OrderStatus, Quote, QuoteStatus
from labcommons.orders.service import TRANSITIONS, Party
from tests.factories import World, grant
from tests.orders.order_support import (
    add_received_sample,
    add_result_file,
    add_service,
    events_of,
    new_order,
    status_of,
    walk_to,
)

S = OrderStatus

# What each side may do from each status (an on-hold order here was held from submitted), written out by hand
# as an oracle independent of the code: the error bodies must list exactly these, in life-cycle order.
ALLOWED: dict[tuple[OrderStatus, Party], list[str]] = {
    (S.draft, Party.customer): ["submitted", "cancelled"],
    (S.draft, Party.staff): [],
    (S.submitted, Party.customer): ["cancelled"],
    (S.submitted, Party.staff): ["quoted", "rejected", "on_hold"],
    (S.quoted, Party.customer): ["submitted", "accepted", "cancelled"],
    (S.quoted, Party.staff): ["quoted", "rejected", "on_hold"],
    (S.accepted, Party.customer): ["cancelled"],
    (S.accepted, Party.staff): ["samples_received", "in_progress", "cancelled", "on_hold"],
    (S.samples_received, Party.customer): [],
    (S.samples_received, Party.staff): ["in_progress", "cancelled", "on_hold"],
    (S.in_progress, Party.customer): [],
    (S.in_progress, Party.staff): ["results_delivered", "cancelled", "on_hold"],
    (S.results_delivered, Party.customer): ["closed"],
    (S.results_delivered, Party.staff): ["in_progress", "closed"],
    (S.closed, Party.customer): [],
    (S.closed, Party.staff): [],
    (S.rejected, Party.customer): [],
    (S.rejected, Party.staff): [],
    (S.cancelled, Party.customer): [],
    (S.cancelled, Party.staff): [],
    (S.on_hold, Party.customer): [],
    (S.on_hold, Party.staff): ["submitted", "rejected", "cancelled"],
}


def rule(from_: OrderStatus, to: OrderStatus) -> service.Step | None:
    """The rule of the table, with on-hold orders held from submitted (resume is staff's, without comment)."""
    if from_ == S.on_hold and to == S.submitted:
        return service.Step(frozenset({Party.staff}))
    return TRANSITIONS.get((from_, to))


def attempt(world: World, actor: Actor, order_id: int, to: OrderStatus, comment: str = "") -> DomainError | None:
    try:
        with world.db.unit_of_work() as s:
            service.transition(s, actor, order_id, to, comment=comment)
    except DomainError as exc:
        return exc
    return None


@pytest.mark.parametrize("from_", list(OrderStatus))
def test_every_step_from_every_status_for_both_sides(world: World, from_: OrderStatus) -> None:
    service_id = add_service(world)
    customer, staff = world.actors["bob"], grant(world, "alice")
    sides = {Party.customer: customer, Party.staff: staff}
    for to in OrderStatus:
        for party, actor in sides.items():
            order_id = new_order(world, service_id)
            walk_to(world, order_id, from_)
            before = events_of(world, order_id)
            step = rule(from_, to)
            case = (from_.value, to.value, party.value)
            if to == S.samples_received:
                add_received_sample(world, order_id)
            if to == S.results_delivered:
                add_result_file(world, order_id)
            if step is None or party not in step.parties or step.via is not None:
                error = attempt(world, actor, order_id, to, "because")
                assert error is not None, case
                if step is not None and party not in step.parties:
                    assert error.status_code == 403 and error.code == "not_your_step", case
                else:
                    assert error.status_code == 409 and error.code == "illegal_transition", case
                    if step is not None:  # a via-only step: its own action is named
                        assert error.details["via"] == step.via, case
                assert error.field == "to" and error.details["allowed"] == ALLOWED[(from_, party)], case
                assert status_of(world, order_id) == from_ and len(events_of(world, order_id)) == len(before), case
                continue
            if step.needs_comment:
                error = attempt(world, actor, order_id, to)
                assert isinstance(error, InvalidInput) and error.code == "comment_required", case
                assert error.field == "comment" and status_of(world, order_id) == from_, case
            assert attempt(world, actor, order_id, to, "  because  ") is None, case
            assert status_of(world, order_id) == to, case
            events = events_of(world, order_id)
            assert [e.version for e in events] == list(range(1, len(before) + 2)), case
            last = events[-1]
            assert (last.from_status, last.to_status, last.actor_id, last.comment) == (
                from_, to, actor.user_id, "because"), case


def test_the_oracle_agrees_with_allowed_transitions(world: World) -> None:
    service_id = add_service(world)
    for from_ in OrderStatus:
        order_id = new_order(world, service_id)
        walk_to(world, order_id, from_)
        with world.db.unit_of_work(write=False) as s:
            order = service.get_order(s, world.actors["bob"], order_id)
            for party in Party:
                assert service.allowed_transitions(order, {party}) == ALLOWED[(from_, party)], (from_, party)


@pytest.mark.parametrize("held", [S.submitted, S.quoted, S.accepted, S.samples_received, S.in_progress])
def test_hold_and_resume_return_to_where_the_order_was(world: World, held: OrderStatus) -> None:
    service_id = add_service(world)
    staff, customer = grant(world, "alice"), world.actors["bob"]
    order_id = new_order(world, service_id)
    walk_to(world, order_id, held)
    error = attempt(world, staff, order_id, S.on_hold)
    assert error is not None and error.code == "comment_required"
    assert attempt(world, staff, order_id, S.on_hold, "waiting for the reagent") is None
    with world.db.unit_of_work(write=False) as s:
        order = service.get_order(s, staff, order_id)
        assert (order.status, order.held_from) == (S.on_hold, held)
        staff_may = service.allowed_transitions(order, {Party.staff})
    # Rejecting is only for work not yet agreed.
    expected = [held.value] + (["rejected"] if held in (S.submitted, S.quoted) else []) + ["cancelled"]
    assert staff_may == sorted(expected, key=lambda v: list(OrderStatus).index(OrderStatus(v)))
    other = next(s for s in (S.in_progress, S.accepted) if s != held)
    error = attempt(world, staff, order_id, other)
    assert error is not None and error.code == "illegal_transition"
    resumed = attempt(world, customer, order_id, held)
    assert isinstance(resumed, Forbidden) and resumed.code == "not_your_step"
    assert attempt(world, staff, order_id, held) is None
    with world.db.unit_of_work(write=False) as s:
        order = service.get_order(s, staff, order_id)
        assert (order.status, order.held_from) == (held, None)
    assert [(e.from_status, e.to_status) for e in events_of(world, order_id)[-2:]] == [
        (held, S.on_hold), (S.on_hold, held)]


def test_rejecting_an_accepted_order_on_hold_is_refused(world: World) -> None:
    service_id = add_service(world)
    staff = grant(world, "alice")
    order_id = new_order(world, service_id)
    walk_to(world, order_id, S.accepted)
    assert attempt(world, staff, order_id, S.on_hold, "instrument broken") is None
    error = attempt(world, staff, order_id, S.rejected, "no")
    assert error is not None and error.code == "illegal_transition"
    assert error.details["allowed"] == ["accepted", "cancelled"]


def test_guards_need_samples_and_results(world: World) -> None:
    service_id = add_service(world)
    staff = grant(world, "alice")
    order_id = new_order(world, service_id)
    walk_to(world, order_id, S.accepted)
    error = attempt(world, staff, order_id, S.samples_received)
    assert error is not None and error.status_code == 409 and error.code == "no_samples_received"
    assert attempt(world, staff, order_id, S.in_progress) is None
    error = attempt(world, staff, order_id, S.results_delivered)
    assert error is not None and error.status_code == 409 and error.code == "no_results"
    add_result_file(world, order_id)
    assert attempt(world, staff, order_id, S.results_delivered) is None


def test_strangers_and_unknown_targets(world: World) -> None:
    service_id = add_service(world)
    order_id = new_order(world, service_id, submit=True)
    error = attempt(world, world.actors["carol"], order_id, S.cancelled)
    assert isinstance(error, NotFound) and error.field == "order_id"
    # Staff of another facility are strangers too.
    other_staff = grant(world, "carol", facility="SC-UNI")
    assert isinstance(attempt(world, other_staff, order_id, S.rejected, "x"), NotFound)
    with pytest.raises(InvalidInput) as caught, world.db.unit_of_work() as s:
        service.transition(s, world.actors["bob"], order_id, "teleported")
    assert caught.value.code == "unknown_status" and caught.value.field == "to"
    with pytest.raises(InvalidInput) as caught, world.db.unit_of_work() as s:
        service.transition(s, world.actors["bob"], order_id, "cancelled", comment="x" * 2001)
    assert caught.value.code == "too_long"
    assert status_of(world, order_id) == S.submitted


def test_expected_version_refuses_a_stale_step(world: World) -> None:
    service_id = add_service(world)
    bob = world.actors["bob"]
    order_id = new_order(world, service_id)
    with pytest.raises(DomainError) as caught, world.db.unit_of_work() as s:
        service.transition(s, bob, order_id, S.submitted, expected_version=7)
    assert caught.value.status_code == 409 and caught.value.code == "order_changed"
    assert caught.value.field == "expected_version" and caught.value.details["version"] == 1
    with world.db.unit_of_work() as s:
        service.transition(s, bob, order_id, S.submitted, expected_version=1)
    assert status_of(world, order_id) == S.submitted


def test_staff_who_ordered_from_their_own_facility_are_on_both_sides(world: World) -> None:
    service_id = add_service(world)
    alice = grant(world, "alice")
    order_id = new_order(world, service_id, customer="alice", submit=True)
    with world.db.unit_of_work(write=False) as s:
        order = service.get_order(s, alice, order_id)
        assert service.parties_of(alice, order) == {Party.customer, Party.staff}
        assert service.allowed_transitions(order, service.parties_of(alice, order)) == [
            "quoted", "rejected", "cancelled", "on_hold"]


def test_numbers_submission_stamp_and_terminal_stamp(world: World) -> None:
    service_id = add_service(world)
    order_id = new_order(world, service_id, submit=True)
    with world.db.unit_of_work(write=False) as s:
        order = service.get_order(s, world.actors["bob"], order_id)
        assert order.number == f"SO-{order.created_at.year}-{order.id:06d}"
        assert order.submitted_at is not None and order.closed_at is None
    assert attempt(world, world.actors["bob"], order_id, S.cancelled) is None
    with world.db.unit_of_work(write=False) as s:
        assert service.get_order(s, world.actors["bob"], order_id).closed_at is not None


def test_cancelling_a_quoted_order_withdraws_its_quote(world: World) -> None:
    from labcommons.orders import quotes
    from tests.orders.order_support import far_day

    service_id = add_service(world)
    staff, bob = grant(world, "alice"), world.actors["bob"]
    order_id = new_order(world, service_id, submit=True)
    with world.db.unit_of_work() as s:
        quote_id = quotes.issue_quote(s, staff, order_id, [("Library prep", 2, 50000)], far_day()).id
    assert attempt(world, bob, order_id, S.cancelled) is None
    with world.db.unit_of_work(write=False) as s:
        quote = s.get(Quote, quote_id)
        assert quote is not None and quote.status == QuoteStatus.withdrawn


def test_creating_orders_validates_the_input(world: World) -> None:
    service_id = add_service(world)
    inactive = add_service(world, active=False)
    bob = world.actors["bob"]
    cases = [
        (dict(service_id=inactive, title="x"), "service_id"),
        (dict(service_id=10_000, title="x"), "service_id"),
        (dict(service_id=service_id, title="  "), "title"),
        (dict(service_id=service_id, title="x" * 201), "title"),
        (dict(service_id=service_id, title="x", sample_count=-1), "sample_count"),
        (dict(service_id=service_id, title="x", contact_phone="1" * 41), "contact_phone"),
        (dict(service_id=service_id, title="x", wanted_by=service.facility_today().replace(year=2020)), "wanted_by"),
    ]
    for fields, field in cases:
        with pytest.raises(DomainError) as caught, world.db.unit_of_work() as s:
            service.create_order(s, bob, **fields)  # type: ignore[arg-type]
        assert caught.value.field == field, fields
        assert caught.value.status_code in (404, 422)
