"""Samples of orders: codes, the custody state machine, order-status guards, permissions, races, API, labels."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import pytest
from barcode.charsets import code128 as code128_table
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from labcommons.actor import Actor
from labcommons.errors import DomainError, Forbidden, InvalidInput, NotFound
from labcommons.identity import service as identity
from labcommons.orders import labels, samples, service
from labcommons.orders.models import (
    CustodyEvent,
    OrderEvent,
    OrderStatus,
    Sample,
    SampleEvent,
    SampleStatus,
    ServiceOrder,
)
from tests.api_client import client_for
from tests.factories import World, grant
from tests.orders.order_support import add_service, at_once

S = OrderStatus

# --- helpers (shared with tests/web/test_sample_pages.py) ---------------------------------------------------


# The way from a fresh draft to each status, taken with apply_transition (quotes are not this module's concern).
PATH: dict[OrderStatus, list[OrderStatus]] = {
    S.draft: [],
    S.submitted: [S.submitted],
    S.quoted: [S.submitted, S.quoted],
    S.accepted: [S.submitted, S.quoted, S.accepted],
    S.samples_received: [S.submitted, S.quoted, S.accepted, S.samples_received],
    S.in_progress: [S.submitted, S.quoted, S.accepted, S.in_progress],
    S.results_delivered: [S.submitted, S.quoted, S.accepted, S.in_progress, S.results_delivered],
    S.closed: [S.submitted, S.quoted, S.accepted, S.in_progress, S.results_delivered, S.closed],
    S.cancelled: [S.submitted, S.quoted, S.accepted, S.cancelled],
    S.rejected: [S.submitted, S.rejected],
    S.on_hold: [S.submitted, S.quoted, S.accepted, S.on_hold],
}


def make_order(world: World, status: OrderStatus = S.accepted, customer: str = "bob",
               service_id: int | None = None) -> int:
    """An order of `customer` brought to `status`."""
    service_id = service_id or add_service(world)
    with world.db.unit_of_work() as s:
        order = service.create_order(s, world.actors[customer], service_id, title="Tumour tissue sections")
        for step in PATH[status]:
            if order.status == step:  # e.g. a fixed-price service already quoted on submission
                continue
            service.apply_transition(s, order, step, actor_id=world.actors[customer].user_id)
        assert order.status == status
        return order.id


def order_of(world: World, order_id: int) -> ServiceOrder:
    with world.db.unit_of_work(write=False) as s:
        order = s.get(ServiceOrder, order_id)
        assert order is not None
        return order


def register(world: World, actor: Actor, order_id: int, **kw: Any) -> list[str]:
    with world.db.unit_of_work() as s:
        return [x.code for x in samples.register_samples(s, actor, order_id, **kw)]


def sample_id(world: World, code: str) -> int:
    with world.db.unit_of_work(write=False) as s:
        found = s.scalars(select(Sample.id).where(Sample.code == code)).one()
        return int(found)


def record(world: World, actor: Actor, sid: int, event: str, **kw: str) -> Sample:
    with world.db.unit_of_work() as s:
        sample, _order = samples.record_event(s, actor, sid, event, **kw)
        return sample


def refused(call: Callable[[], object], kind: type[DomainError], code: str) -> DomainError:
    with pytest.raises(kind) as info:
        call()
    assert info.value.code == code, info.value.body()
    return info.value


def counts(world: World) -> tuple[int, int]:
    with world.db.unit_of_work(write=False) as s:
        return (s.scalar(select(func.count()).select_from(Sample)) or 0,
                s.scalar(select(func.count()).select_from(SampleEvent)) or 0)


# --- codes and registering ----------------------------------------------------------------------------------


def test_codes_follow_the_order_number_and_count_on(world: World) -> None:
    order_id = make_order(world, S.submitted)
    number = order_of(world, order_id).number
    assert number is not None and re.fullmatch(r"SO-\d{4}-\d{6}", number)
    codes = register(world, world.actors["bob"], order_id, descriptions=["  liver, FFPE ", "kidney"])
    assert codes == [f"{number}-S01", f"{number}-S02"]
    codes += register(world, world.actors["bob"], order_id, count=1)
    assert codes[-1] == f"{number}-S03"
    with world.db.unit_of_work(write=False) as s:
        order = s.get(ServiceOrder, order_id)
        assert order is not None
        rows = samples.samples_with_events(s, order)
        assert [(x.code, x.position, x.description, x.status, events) for x, events in rows] == [
            (f"{number}-S01", 1, "liver, FFPE", SampleStatus.expected, []),
            (f"{number}-S02", 2, "kidney", SampleStatus.expected, []),
            (f"{number}-S03", 3, "", SampleStatus.expected, []),
        ]
        assert not samples.any_received(s, order)
    # Codes are unique in the database, whatever code computes them.
    with pytest.raises(IntegrityError), world.db.unit_of_work() as s:
        s.add(Sample(order_id=order_id, position=99, code=f"{number}-S01"))
        s.flush()


def test_a_code_past_99_keeps_counting(world: World) -> None:
    order_id = make_order(world, S.submitted)
    codes = register(world, world.actors["bob"], order_id, count=100)
    assert codes[8].endswith("-S09") and codes[98].endswith("-S99") and codes[99].endswith("-S100")


@pytest.mark.parametrize(
    ("kwargs", "code", "field"),
    [
        ({}, "missing_field", "descriptions"),
        ({"descriptions": [], "count": None}, "missing_field", "descriptions"),
        ({"descriptions": ["a", "b"], "count": 3}, "count_mismatch", "count"),
        ({"count": 0}, "out_of_range", "count"),
        ({"count": samples.MAX_SAMPLES_PER_REQUEST + 1}, "out_of_range", "count"),
        ({"descriptions": ["x" * 301]}, "too_long", "descriptions"),
        ({"count": 1, "note": "n" * 2001}, "too_long", "note"),
    ],
)
def test_bad_registrations_are_refused_and_change_nothing(world: World, kwargs: dict[str, Any], code: str,
                                                          field: str) -> None:
    order_id = make_order(world, S.submitted)
    error = refused(lambda: register(world, world.actors["bob"], order_id, **kwargs), InvalidInput, code)
    assert error.field == field
    assert counts(world) == (0, 0)


@pytest.mark.parametrize("status", [S.draft, S.results_delivered, S.closed, S.cancelled, S.rejected])
def test_samples_are_announced_only_between_submission_and_results(world: World, status: OrderStatus) -> None:
    order_id = make_order(world, status)
    error = refused(lambda: register(world, world.actors["bob"], order_id, count=1), samples.OrderStatusForbids,
                    "order_status_forbids")
    assert error.status_code == 409 and error.details["order_status"] == status.value
    assert counts(world) == (0, 0)


@pytest.mark.parametrize("status", [S.submitted, S.quoted, S.accepted, S.samples_received, S.in_progress,
                                    S.on_hold])
def test_the_customer_announces_samples_while_the_order_is_open(world: World, status: OrderStatus) -> None:
    order_id = make_order(world, status)
    assert len(register(world, world.actors["bob"], order_id, count=2)) == 2


# --- custody ------------------------------------------------------------------------------------------------


def _sample_in(world: World, status: SampleStatus, order_status: OrderStatus = S.in_progress) -> tuple[int, Actor]:
    """A sample brought to `status` on an order in `order_status`, and a staff actor."""
    alice = grant(world, "alice")
    order_id = make_order(world, S.accepted)
    sid = sample_id(world, register(world, world.actors["bob"], order_id, count=1)[0])
    steps = {SampleStatus.expected: [], SampleStatus.received: ["received"],
             SampleStatus.stored: ["received", "stored"], SampleStatus.consumed: ["received", "consumed"],
             SampleStatus.returned: ["received", "returned"], SampleStatus.disposed: ["received", "disposed"]}
    for event in steps[status]:
        record(world, alice, sid, event, location="freezer A1" if event == "stored" else "")
    with world.db.unit_of_work() as s:
        order = s.get(ServiceOrder, order_id)
        assert order is not None
        path = {S.in_progress: [S.in_progress], S.closed: [S.in_progress, S.results_delivered, S.closed],
                S.cancelled: [S.cancelled]}[order_status]
        for step in path:
            service.apply_transition(s, order, step, actor_id=alice.user_id, comment="test")
    return sid, alice


ALL_EVENTS = [e.value for e in CustodyEvent]
NEXT = {
    SampleStatus.expected: ["received"],
    SampleStatus.received: ["stored", "consumed", "returned", "disposed"],
    SampleStatus.stored: ["stored", "consumed", "returned", "disposed"],
    SampleStatus.consumed: [],
    SampleStatus.returned: [],
    SampleStatus.disposed: [],
}


@pytest.mark.parametrize("status", list(SampleStatus))
def test_custody_follows_the_state_machine(world: World, status: SampleStatus) -> None:
    sid, alice = _sample_in(world, status)
    for event in ALL_EVENTS:
        if event in NEXT[status]:
            continue
        error = refused(lambda e=event: record(world, alice, sid, e, location="shelf 2"),  # type: ignore[misc]
                        samples.IllegalCustodyEvent, "illegal_custody_event")
        assert error.status_code == 409
        assert error.details["allowed"] == NEXT[status], event
        assert error.details["sample_status"] == status.value
    before = counts(world)
    for event in NEXT[status]:
        # Each allowed step works from this status (tried on a fresh sample each time).
        fresh, _ = _sample_in(world, status)
        sample = record(world, alice, fresh, event, location="shelf 2", note="checked")
        assert sample.status == samples.STATUS_AFTER[CustodyEvent(event)]
    assert counts(world)[1] >= before[1] + len(NEXT[status])


def test_storing_needs_a_place_and_moves_the_sample(world: World) -> None:
    sid, alice = _sample_in(world, SampleStatus.received)
    refused(lambda: record(world, alice, sid, "stored"), InvalidInput, "location_required")
    refused(lambda: record(world, alice, sid, "thawed"), InvalidInput, "unknown_event")
    assert record(world, alice, sid, "stored", location="-80 °C freezer B2").location == "-80 °C freezer B2"
    assert record(world, alice, sid, "stored", location="LN2 tank 1").location == "LN2 tank 1"
    gone = record(world, alice, sid, "returned", note="courier SF123")
    assert gone.status == SampleStatus.returned and gone.location == ""
    with world.db.unit_of_work(write=False) as s:
        sample, _order, events = samples.get_sample(s, alice, sid)
        names = samples.sample_actor_names(s, [(sample, events)])
    assert [(e.event, e.location, e.note, e.actor_id) for e in events] == [
        (CustodyEvent.received, "", "", alice.user_id),
        (CustodyEvent.stored, "-80 °C freezer B2", "", alice.user_id),
        (CustodyEvent.stored, "LN2 tank 1", "", alice.user_id),
        (CustodyEvent.returned, "", "courier SF123", alice.user_id),
    ]
    assert names == {alice.user_id: "Alice"}
    assert samples.received_at(events) == events[0].at


@pytest.mark.parametrize("status", [S.submitted, S.quoted])
def test_nothing_is_received_before_the_quote_is_accepted(world: World, status: OrderStatus) -> None:
    alice = grant(world, "alice")
    order_id = make_order(world, status)
    sid = sample_id(world, register(world, world.actors["bob"], order_id, count=1)[0])
    error = refused(lambda: record(world, alice, sid, "received"), samples.OrderStatusForbids,
                    "order_status_forbids")
    assert error.details["order_status"] == status.value
    refused(lambda: register(world, alice, order_id, count=1, receive=True), samples.OrderStatusForbids,
            "order_status_forbids")
    assert counts(world) == (1, 0)


@pytest.mark.parametrize("order_status", [S.closed, S.cancelled])
def test_after_the_order_ends_held_samples_may_only_be_moved_returned_or_disposed(
        world: World, order_status: OrderStatus) -> None:
    sid, alice = _sample_in(world, SampleStatus.stored, order_status)
    refused(lambda: record(world, alice, sid, "consumed"), samples.OrderStatusForbids, "order_status_forbids")
    with world.db.unit_of_work(write=False) as s:
        sample, order, _ = samples.get_sample(s, alice, sid)
        assert samples.allowed_events(sample, order) == ["stored", "returned", "disposed"]
    assert record(world, alice, sid, "stored", location="archive").status == SampleStatus.stored
    assert record(world, alice, sid, "disposed", note="autoclaved").status == SampleStatus.disposed


def test_an_order_on_hold_still_receives_its_samples(world: World) -> None:
    alice = grant(world, "alice")
    order_id = make_order(world, S.on_hold)
    sid = sample_id(world, register(world, world.actors["bob"], order_id, count=1)[0])
    assert record(world, alice, sid, "received").status == SampleStatus.received
    # Still on hold: resuming is the staff's decision, not a side effect of a receipt.
    assert order_of(world, order_id).status == S.on_hold


# --- the order follows the first receipt --------------------------------------------------------------------


def _events(world: World, order_id: int) -> list[tuple[OrderStatus | None, OrderStatus, int | None, str]]:
    with world.db.unit_of_work(write=False) as s:
        return [(e.from_status, e.to_status, e.actor_id, e.comment) for e in s.scalars(
            select(OrderEvent).where(OrderEvent.order_id == order_id).order_by(OrderEvent.version))]


def test_the_first_receipt_moves_an_accepted_order_to_samples_received(world: World) -> None:
    alice = grant(world, "alice")
    order_id = make_order(world, S.accepted)
    codes = register(world, world.actors["bob"], order_id, descriptions=["a", "b"])
    assert order_of(world, order_id).status == S.accepted
    record(world, alice, sample_id(world, codes[0]), "received")
    assert order_of(world, order_id).status == S.samples_received
    assert _events(world, order_id)[-1] == (S.accepted, S.samples_received, alice.user_id, codes[0])
    record(world, alice, sample_id(world, codes[1]), "received")
    assert [e[1] for e in _events(world, order_id)].count(S.samples_received) == 1
    # Now the manual transition's guard is satisfied too.
    with world.db.unit_of_work(write=False) as s:
        order = s.get(ServiceOrder, order_id)
        assert order is not None and samples.any_received(s, order)


def test_register_and_receive_in_one_step(world: World) -> None:
    alice = grant(world, "alice")
    order_id = make_order(world, S.accepted)
    codes = register(world, alice, order_id, descriptions=["serum 1", "serum 2"], receive=True,
                     location="reception fridge", note="cold chain intact")
    assert order_of(world, order_id).status == S.samples_received
    with world.db.unit_of_work(write=False) as s:
        _order, rows = samples.list_samples(s, alice, order_id)
    assert [(x.code, x.status, x.location) for x, _ in rows] == [
        (codes[0], SampleStatus.received, "reception fridge"), (codes[1], SampleStatus.received, "reception fridge")]
    assert all([(e.event, e.note) for e in events] == [(CustodyEvent.received, "cold chain intact")]
               for _, events in rows)


def test_receipts_once_work_has_started_leave_the_order_alone(world: World) -> None:
    alice = grant(world, "alice")
    order_id = make_order(world, S.in_progress)
    register(world, alice, order_id, count=1, receive=True)
    assert order_of(world, order_id).status == S.in_progress


# --- who may do what ----------------------------------------------------------------------------------------


def test_only_the_customer_and_the_facility_staff_see_samples(world: World) -> None:
    alice = grant(world, "alice")
    carol_elsewhere = grant(world, "carol", facility="SC-UNI")
    order_id = make_order(world, S.accepted)
    code = register(world, world.actors["bob"], order_id, count=1)[0]
    sid = sample_id(world, code)
    for who in (world.actors["bob"], alice):
        with world.db.unit_of_work(write=False) as s:
            assert samples.get_sample(s, who, sid)[0].code == code
            assert samples.find_by_code(s, who, f" {code.lower()} ")[0].id == sid
            assert len(samples.list_samples(s, who, order_id)[1]) == 1
    for who in (world.actors["carol"], carol_elsewhere):
        with world.db.unit_of_work(write=False) as s:
            with pytest.raises(NotFound):
                samples.get_sample(s, who, sid)
            with pytest.raises(NotFound):
                samples.find_by_code(s, who, code)
            with pytest.raises(NotFound):
                samples.list_samples(s, who, order_id)
        with pytest.raises(NotFound):
            register(world, who, order_id, count=1)
    # Custody is the facility's: the customer (staff nowhere) is refused, staff of another facility see nothing.
    refused(lambda: record(world, world.actors["bob"], sid, "received"), Forbidden, "forbidden")
    with pytest.raises(NotFound):
        record(world, carol_elsewhere, sid, "received")
    refused(lambda: register(world, world.actors["bob"], order_id, count=1, receive=True), samples.StaffOnly,
            "staff_only")
    with pytest.raises(NotFound):
        record(world, alice, 999999, "received")
    assert counts(world) == (1, 0)


# --- races --------------------------------------------------------------------------------------------------


def test_two_staff_receiving_one_sample_at_once_record_one_receipt(world: World) -> None:
    alice, carol = grant(world, "alice"), grant(world, "carol")
    order_id = make_order(world, S.accepted)
    codes = register(world, world.actors["bob"], order_id, count=6)
    for code in codes:
        sid = sample_id(world, code)
        results = at_once(lambda sid=sid: record(world, alice, sid, "received", location="bench 1"),
                          lambda sid=sid: record(world, carol, sid, "received", location="bench 2"))
        won = [r for r in results if isinstance(r, Sample)]
        lost = [r for r in results if isinstance(r, DomainError)]
        assert len(won) == 1 and len(lost) == 1, results
        assert isinstance(lost[0], samples.IllegalCustodyEvent) and lost[0].details["sample_status"] == "received"
        with world.db.unit_of_work(write=False) as s:
            events = s.scalars(select(SampleEvent).where(SampleEvent.sample_id == sid)).all()
            assert [e.event for e in events] == [CustodyEvent.received]
            assert s.get(Sample, sid).location == events[0].location  # type: ignore[union-attr]
    # The order moved once, by whichever receipt came first.
    assert [e[1] for e in _events(world, order_id)].count(S.samples_received) == 1


def test_receipts_of_two_samples_at_once_both_count_and_move_the_order_once(world: World) -> None:
    alice, carol = grant(world, "alice"), grant(world, "carol")
    service_id = add_service(world)
    for _round in range(3):
        order_id = make_order(world, S.accepted, service_id=service_id)
        first, second = (sample_id(world, c) for c in register(world, world.actors["bob"], order_id, count=2))
        results = at_once(lambda first=first: record(world, alice, first, "received"),
                          lambda second=second: record(world, carol, second, "received"))
        assert all(isinstance(r, Sample) for r in results), results
        assert order_of(world, order_id).status == S.samples_received
        assert [e[1] for e in _events(world, order_id)].count(S.samples_received) == 1


def test_concurrent_registrations_number_samples_without_gaps(world: World) -> None:
    alice = grant(world, "alice")
    order_id = make_order(world, S.accepted)
    results = at_once(lambda: register(world, world.actors["bob"], order_id, count=3),
                      lambda: register(world, alice, order_id, count=2, receive=True))
    assert all(isinstance(r, list) for r in results), results
    with world.db.unit_of_work(write=False) as s:
        positions = sorted(s.scalars(select(Sample.position).where(Sample.order_id == order_id)))
    assert positions == [1, 2, 3, 4, 5]


# --- API ----------------------------------------------------------------------------------------------------


def test_the_api_registers_lists_and_records_custody(world: World) -> None:
    grant(world, "alice")
    order_id = make_order(world, S.accepted)
    client = client_for(world.db)
    bob, alice, carol = world.headers("bob"), world.headers("alice"), world.headers("carol")

    made = client.post(f"/api/v1/orders/{order_id}/samples", json={"descriptions": ["plasma", "serum"]},
                       headers={**bob, "Idempotency-Key": "reg-1"})
    assert made.status_code == 201, made.text
    items = made.json()["items"]
    assert [i["description"] for i in items] == ["plasma", "serum"]
    assert all(i["status"] == "expected" and i["allowed_events"] == [] and i["events"] == [] for i in items)
    again = client.post(f"/api/v1/orders/{order_id}/samples", json={"descriptions": ["plasma", "serum"]},
                        headers={**bob, "Idempotency-Key": "reg-1"})
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == made.json()
    assert counts(world)[0] == 2

    first = items[0]
    listed = client.get(f"/api/v1/orders/{order_id}/samples", headers=alice).json()["items"]
    assert [i["code"] for i in listed] == [i["code"] for i in items]
    assert listed[0]["allowed_events"] == ["received"]  # staff see what they may record

    received = client.post(f"/api/v1/samples/{first['id']}/events", json={"event": "received", "note": "ok"},
                           headers={**alice, "Idempotency-Key": "rcv-1"})
    assert received.status_code == 201, received.text
    body = received.json()
    assert body["status"] == "received" and body["received_at"] is not None
    assert [(e["event"], e["actor_name"], e["note"]) for e in body["events"]] == [("received", "Alice", "ok")]
    assert body["allowed_events"] == ["stored", "consumed", "returned", "disposed"]
    replay = client.post(f"/api/v1/samples/{first['id']}/events", json={"event": "received", "note": "ok"},
                         headers={**alice, "Idempotency-Key": "rcv-1"})
    assert replay.status_code == 201 and replay.json() == body
    assert order_of(world, order_id).status == S.samples_received

    twice = client.post(f"/api/v1/samples/{first['id']}/events", json={"event": "received"}, headers=alice)
    assert twice.status_code == 409
    assert twice.json()["error"] == "illegal_custody_event"
    assert twice.json()["allowed"] == ["stored", "consumed", "returned", "disposed"]
    no_place = client.post(f"/api/v1/samples/{first['id']}/events", json={"event": "stored"}, headers=alice)
    assert no_place.status_code == 422 and no_place.json()["field"] == "location"
    unknown = client.post(f"/api/v1/samples/{first['id']}/events", json={"event": "thawed"}, headers=alice)
    assert unknown.status_code == 422 and unknown.json()["field"] == "event"
    bad = client.post(f"/api/v1/orders/{order_id}/samples", json={"descriptions": ["a"], "count": 2}, headers=bob)
    assert bad.status_code == 422 and bad.json()["field"] == "count"
    receive_as_customer = client.post(f"/api/v1/orders/{order_id}/samples", json={"count": 1, "receive": True},
                                      headers=bob)
    assert receive_as_customer.status_code == 403 and receive_as_customer.json()["error"] == "staff_only"
    by_customer = client.post(f"/api/v1/samples/{first['id']}/events", json={"event": "stored", "location": "x"},
                              headers=bob)
    assert by_customer.status_code == 403

    one = client.get(f"/api/v1/samples/{first['id']}", headers=bob)
    assert one.status_code == 200 and one.json()["code"] == first["code"] and one.json()["allowed_events"] == []
    scanned = client.get(f"/api/v1/samples/by-code/{first['code'].lower()}", headers=bob)
    assert scanned.status_code == 200 and scanned.json()["id"] == first["id"]
    for path in (f"/api/v1/samples/{first['id']}", f"/api/v1/samples/by-code/{first['code']}",
                 f"/api/v1/orders/{order_id}/samples", f"/api/v1/samples/{first['id']}/label.svg"):
        hidden = client.get(path, headers=carol)
        assert hidden.status_code == 404, path
        assert hidden.json()["error"] == "not_found"
    assert client.post(f"/api/v1/orders/{order_id}/samples", json={"count": 1}, headers=carol).status_code == 404

    label = client.get(f"/api/v1/samples/{first['id']}/label.svg", headers=bob)
    assert label.status_code == 200 and label.headers["content-type"].startswith("image/svg+xml")
    root = ET.fromstring(label.content)
    assert root.tag == "{http://www.w3.org/2000/svg}svg" and root.get("width") == "62mm"
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert first["code"] in texts and order_of(world, order_id).number in texts and "plasma" in texts


def test_api_scopes_are_required(world: World) -> None:
    order_id = make_order(world, S.submitted)
    with world.db.unit_of_work() as s:
        user = identity.find_user(s, "bob@example.org")
        read_only = identity.create_api_token(s, user, name="ro", scopes=["orders:read"])
    client = client_for(world.db)
    headers = {"Authorization": f"Bearer {read_only}"}
    assert client.get(f"/api/v1/orders/{order_id}/samples", headers=headers).status_code == 200
    denied = client.post(f"/api/v1/orders/{order_id}/samples", json={"count": 1}, headers=headers)
    assert denied.status_code == 403 and denied.json()["error"] == "insufficient_scope"
    assert counts(world) == (0, 0)


# --- labels -------------------------------------------------------------------------------------------------

SVG = "{http://www.w3.org/2000/svg}"


def _modules_from_path(d: str, size: int) -> list[list[int]]:
    """The dark modules an SVG path of unit runs ("M x y h n v1 h-n z") draws, as a matrix."""
    grid = [[0] * size for _ in range(size)]
    for x, y, n in re.findall(r"M(\d+) (\d+)h(\d+)v1h-\d+z", d):
        for dx in range(int(n)):
            grid[int(y)][int(x) + dx] = 1
    return grid


def test_the_qr_code_holds_the_landing_address_of_the_code() -> None:
    code = "SO-2026-000042-S07"
    url = labels.scan_url(code)
    assert url.endswith(f"/samples/code/{code}") and url.startswith(("http://", "https://"))
    root = ET.fromstring(labels.qr_svg(code))
    size = int(root.get("viewBox", "").split()[2])
    path = root.find(f"{SVG}path")
    assert path is not None
    drawn = _modules_from_path(path.get("d", ""), size)
    # The expected symbol, computed independently of labels.py, with the same quiet zone.
    import segno

    expected = segno.make(url, error="m", micro=False)
    border = labels.QR_BORDER
    want = [[0] * size for _ in range(size)]
    for y, row in enumerate(expected.matrix):
        for x, dark in enumerate(row):
            want[y + border][x + border] = 1 if dark else 0
    assert drawn == want
    assert expected.designator.endswith("-M")


def _decode_code128(modules: str) -> str:
    """Read a Code 128 symbol from its modules: split into 11-module symbols, map them through the standard
    pattern table, follow the code-set switches and check the checksum."""
    patterns = {p: i for i, p in enumerate(code128_table.CODES)}
    stop = "1100011101011"  # the stop symbol with its final bar (ISO/IEC 15417)
    assert modules.endswith(stop)
    body = modules[: -len(stop)]
    values = [patterns[body[i:i + 11]] for i in range(0, len(body), 11)]
    start, *data, check = values
    assert (start + sum(i * v for i, v in enumerate(data, start=1))) % 103 == check
    charset = {103: "A", 104: "B", 105: "C"}[start]
    out = ""
    for v in data:
        if v == 99:
            charset = "C"
        elif v == 100 and charset != "B":
            charset = "B"
        elif v == 101 and charset != "A":
            charset = "A"
        elif charset == "C":
            out += f"{v:02d}"
        else:
            out += chr(v + 32)
    return out


def _modules_from_bars(svg: str) -> str:
    root = ET.fromstring(svg)
    width = int(root.get("viewBox", "").split()[2])
    line = ["0"] * width
    for rect in root.iter(f"{SVG}rect"):
        if rect.get("x") is None:
            continue  # the white background
        x, w = round(float(rect.get("x", "0"))), round(float(rect.get("width", "0")))
        line[x:x + w] = ["1"] * w
    return "".join(line).strip("0")


@pytest.mark.parametrize("code", ["SO-2026-000001-S01", "SO-2026-123456-S100"])
def test_the_barcode_decodes_to_the_sample_code(code: str) -> None:
    assert _decode_code128(_modules_from_bars(labels.barcode_svg(code))) == code


def test_a_label_is_one_valid_svg_with_everything_on_it() -> None:
    from datetime import date

    svg = labels.label_svg(labels.LabelText(code="SO-2026-000001-S01", order_number="SO-2026-000001",
                                            description="Mouse liver <FFPE> & kidney, " + "x" * 60,
                                            received_on=date(2026, 11, 25)))
    root = ET.fromstring(svg.encode())
    assert (root.get("width"), root.get("height")) == ("62mm", "29mm")
    texts = [t.text or "" for t in root.iter(f"{SVG}text")]
    assert texts[:2] == ["SO-2026-000001-S01", "SO-2026-000001"]
    assert texts[2].startswith("Mouse liver <FFPE> & kidney") and texts[2].endswith("…")
    assert len(texts[2]) == labels.DESCRIPTION_CHARS
    assert texts[3] == "Received: 2026-11-25"
    bars = [r for r in root.iter(f"{SVG}rect") if r.get("height") == "7.000"]
    assert bars and max(float(r.get("x", 0)) + float(r.get("width", 0)) for r in bars) <= 62
