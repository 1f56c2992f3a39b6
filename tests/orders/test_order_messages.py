"""Order messages (who writes as whom, limits, who is told) and ratings of closed orders, on both databases."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from labcommons.errors import DomainError, InvalidInput, NotFound
from labcommons.notifications.models import Job
from labcommons.orders import messages, ratings
from labcommons.orders.models import OrderStatus
from tests.factories import World, grant
from tests.orders.order_support import add_service, new_order, walk_to

S = OrderStatus


def message_jobs(world: World) -> list[dict[str, object]]:
    with world.db.unit_of_work(write=False) as s:
        payloads = [json.loads(j.payload) for j in s.scalars(select(Job).where(Job.kind == "order_mail"))]
    return [p for p in payloads if p["template"] == "message"]


def test_the_thread_between_user_and_staff(world: World) -> None:
    alice, carol = grant(world, "alice"), grant(world, "carol", role="facility_manager")
    bob = world.actors["bob"]
    order_id = new_order(world, add_service(world), submit=True)
    with world.db.unit_of_work() as s:
        first = messages.post_message(s, bob, order_id, "  Can you do it by Friday?  ")
        assert (first.body, first.from_staff) == ("Can you do it by Friday?", False)
    with world.db.unit_of_work() as s:
        answer = messages.post_message(s, alice, order_id, "Yes, if the samples arrive on Tuesday.")
        assert answer.from_staff is True
    with world.db.unit_of_work(write=False) as s:
        thread = messages.list_messages(s, carol, order_id)
    assert [(v.author_name, v.message.from_staff) for v in thread] == [("Bob", False), ("Alice", True)]
    # The user's message goes to every staff member of the facility; staff's answer to the user.
    told = [(p["message_id"], p["recipient_id"]) for p in message_jobs(world)]
    assert sorted(told) == sorted([(first.id, alice.user_id), (first.id, carol.user_id),
                                   (answer.id, bob.user_id)])


def test_staff_who_ordered_write_as_the_user(world: World) -> None:
    alice, carol = grant(world, "alice"), grant(world, "carol")
    order_id = new_order(world, add_service(world), customer="alice", submit=True)
    with world.db.unit_of_work() as s:
        own = messages.post_message(s, alice, order_id, "Please hurry")
        assert own.from_staff is False
    assert [p["recipient_id"] for p in message_jobs(world)] == [carol.user_id]


@pytest.mark.parametrize(("body", "code"), [("   ", "missing_field"), ("x" * (messages.MAX_LENGTH + 1), "too_long")])
def test_empty_and_overlong_messages_are_refused(world: World, body: str, code: str) -> None:
    order_id = new_order(world, add_service(world), submit=True)
    with pytest.raises(InvalidInput) as caught, world.db.unit_of_work() as s:
        messages.post_message(s, world.actors["bob"], order_id, body)
    assert (caught.value.field, caught.value.code) == ("body", code)
    with world.db.unit_of_work(write=False) as s:
        assert messages.list_messages(s, world.actors["bob"], order_id) == []


def test_strangers_neither_read_nor_write(world: World) -> None:
    order_id = new_order(world, add_service(world), submit=True)
    for actor in (world.actors["carol"], grant(world, "carol", facility="SC-UNI")):
        with pytest.raises(NotFound), world.db.unit_of_work() as s:
            messages.post_message(s, actor, order_id, "hello")
        with pytest.raises(NotFound), world.db.unit_of_work(write=False) as s:
            messages.list_messages(s, actor, order_id)


def test_a_closed_order_is_rated_once_by_its_user(world: World) -> None:
    alice, bob = grant(world, "alice"), world.actors["bob"]
    service_id = add_service(world)
    order_id = new_order(world, service_id)
    walk_to(world, order_id, S.results_delivered)
    with pytest.raises(DomainError) as early, world.db.unit_of_work() as s:
        ratings.rate_order(s, bob, order_id, 5)
    assert early.value.status_code == 409 and early.value.code == "order_not_closed"
    walk_to_closed(world, order_id)
    with pytest.raises(DomainError) as staff_try, world.db.unit_of_work() as s:
        ratings.rate_order(s, alice, order_id, 5)
    assert staff_try.value.status_code == 403
    for score in (0, 6, True):
        with pytest.raises(InvalidInput) as bad, world.db.unit_of_work() as s:
            ratings.rate_order(s, bob, order_id, score)  # type: ignore[arg-type]
        assert bad.value.field == "score"
    with world.db.unit_of_work() as s:
        rating = ratings.rate_order(s, bob, order_id, 4, " quick and careful ")
        assert (rating.score, rating.comment, rating.service_id) == (4, "quick and careful", service_id)
    with pytest.raises(DomainError) as again, world.db.unit_of_work() as s:
        ratings.rate_order(s, bob, order_id, 1)
    assert again.value.status_code == 409 and again.value.code == "already_rated"
    with world.db.unit_of_work(write=False) as s:
        from labcommons.orders import service

        stored = ratings.rating_of(s, service.get_order(s, bob, order_id))
        assert stored is not None and stored.score == 4


def walk_to_closed(world: World, order_id: int) -> None:
    from labcommons.orders import service
    from labcommons.orders.models import ServiceOrder

    with world.db.unit_of_work() as s:
        order = s.get(ServiceOrder, order_id)
        assert order is not None
        service.apply_transition(s, order, S.closed, actor_id=None)
