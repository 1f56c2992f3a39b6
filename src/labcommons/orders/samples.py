"""Samples of orders: registering them (with the codes printed on their labels) and their chain of custody.

The customer may announce the samples they will send; facility staff record what happens to each one (received,
stored, consumed, returned, disposed). Every custody step is an event with who, when and where.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.db import utcnow
from labcommons.errors import Conflict, Forbidden, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity.models import User
from labcommons.identity.roles import Action
from labcommons.orders import service
from labcommons.orders.models import (
    CustodyEvent,
    OrderStatus,
    Sample,
    SampleEvent,
    SampleStatus,
    ServiceOrder,
)

S = OrderStatus
E = CustodyEvent
SS = SampleStatus

# The custody state machine: which events may follow a sample's status. Storing again moves the sample; a
# consumed, returned or disposed sample has left the facility's hands for good.
NEXT_EVENTS: dict[SampleStatus, tuple[CustodyEvent, ...]] = {
    SS.expected: (E.received,),
    SS.received: (E.stored, E.consumed, E.returned, E.disposed),
    SS.stored: (E.stored, E.consumed, E.returned, E.disposed),
    SS.consumed: (),
    SS.returned: (),
    SS.disposed: (),
}
STATUS_AFTER: dict[CustodyEvent, SampleStatus] = {
    E.received: SS.received,
    E.stored: SS.stored,
    E.consumed: SS.consumed,
    E.returned: SS.returned,
    E.disposed: SS.disposed,
}
TERMINAL_SAMPLE = frozenset({SS.consumed, SS.returned, SS.disposed})

# Order statuses in which each custody event may be recorded. Samples arrive only once the work is agreed and
# before results are out; a sample the facility still holds may be moved, returned or disposed of at any time
# after that, also once the order has ended.
_WORK = frozenset({S.accepted, S.samples_received, S.in_progress})
_HELD = _WORK | {S.results_delivered, S.closed, S.cancelled, S.rejected}
EVENT_ORDER_STATUSES: dict[CustodyEvent, frozenset[OrderStatus]] = {
    E.received: _WORK,
    E.stored: _HELD,
    E.consumed: _WORK | {S.results_delivered},
    E.returned: _HELD,
    E.disposed: _HELD,
}
# The customer announces samples once the order is submitted, and may until the work is done.
REGISTER_STATUSES = frozenset({S.submitted, S.quoted, S.accepted, S.samples_received, S.in_progress})

MAX_SAMPLES_PER_ORDER = 10000
MAX_SAMPLES_PER_REQUEST = 500
MAX_DESCRIPTION = 300
MAX_LOCATION = 200
MAX_NOTE = 2000


class IllegalCustodyEvent(Conflict):
    """The sample's custody status does not allow this event; `allowed` lists the events that may follow."""

    code = "illegal_custody_event"


class OrderStatusForbids(Conflict):
    """The order's status does not allow this sample step now (e.g. receiving before the quote is accepted)."""

    code = "order_status_forbids"


class StaffOnly(Forbidden):
    """Only the facility's staff record custody."""

    code = "staff_only"


def sample_code(order: ServiceOrder, position: int) -> str:
    """The code printed on a sample's label: <order number>-S<nn>, e.g. SO-2026-000001-S01."""
    return f"{order.number}-S{position:02d}"


def effective_status(order: ServiceOrder) -> OrderStatus:
    """The order's status for sample rules: an order on hold counts as the status it was held from."""
    if order.status == S.on_hold and order.held_from is not None:
        return order.held_from
    return order.status


def may_register(order: ServiceOrder) -> bool:
    """Whether samples may be announced (registered as expected) for the order now."""
    return effective_status(order) in REGISTER_STATUSES


def may_receive(order: ServiceOrder) -> bool:
    """Whether staff may record the receipt of samples of the order now."""
    return effective_status(order) in EVENT_ORDER_STATUSES[E.received]


def allowed_events(sample: Sample, order: ServiceOrder) -> list[str]:
    """The custody events staff may record for the sample now, given its status and the order's."""
    status = effective_status(order)
    return [e.value for e in NEXT_EVENTS[sample.status] if status in EVENT_ORDER_STATUSES[e]]


# --- reading -----------------------------------------------------------------------------------------------


def any_received(session: Session, order: ServiceOrder) -> bool:
    """Whether at least one of the order's samples has arrived at the facility."""
    return bool(session.scalar(select(exists().where(Sample.order_id == order.id,
                                                     Sample.status != SampleStatus.expected))))


def samples_with_events(session: Session, order: ServiceOrder) -> list[tuple[Sample, list[SampleEvent]]]:
    """The order's samples in label order, each with its chain-of-custody events, oldest first."""
    samples = list(session.scalars(select(Sample).where(Sample.order_id == order.id).order_by(Sample.position)))
    events: dict[int, list[SampleEvent]] = {s.id: [] for s in samples}
    if samples:
        for event in session.scalars(
            select(SampleEvent).where(SampleEvent.sample_id.in_(events)).order_by(SampleEvent.at, SampleEvent.id)
        ):
            events[event.sample_id].append(event)
    return [(s, events[s.id]) for s in samples]


def sample_actor_names(session: Session, samples: Iterable[tuple[Sample, list[SampleEvent]]]) -> dict[int, str]:
    """The names of the users who recorded the custody events of `samples` (as samples_with_events gives them)."""
    ids = {e.actor_id for _s, events in samples for e in events if e.actor_id is not None}
    if not ids:
        return {}
    return {row.id: row.name for row in session.execute(select(User.id, User.name).where(User.id.in_(ids)))}


def received_at(events: Sequence[SampleEvent]) -> datetime | None:
    """When the sample arrived (its first `received` event), or None."""
    return next((e.at for e in events if e.event == E.received), None)


def list_samples(session: Session, actor: Actor, order_id: int) -> tuple[ServiceOrder,
                                                                        list[tuple[Sample, list[SampleEvent]]]]:
    """An order the actor is on (its customer or the facility's staff) and its samples with their events."""
    order = service.get_order(session, actor, order_id)
    return order, samples_with_events(session, order)


def _visible_sample(session: Session, actor: Actor, sample: Sample | None, what: str) -> tuple[Sample, ServiceOrder]:
    if sample is None:
        raise NotFound(f"Sample {what} does not exist.", field="sample")
    try:
        order = service.get_order(session, actor, sample.order_id)
    except NotFound:
        raise NotFound(f"Sample {what} does not exist.", field="sample") from None
    return sample, order


def get_sample(session: Session, actor: Actor, sample_id: int) -> tuple[Sample, ServiceOrder, list[SampleEvent]]:
    """A sample of an order the actor is on, its order and its custody events; NotFound for anyone else."""
    sample, order = _visible_sample(session, actor, session.get(Sample, sample_id), str(sample_id))
    return sample, order, custody_events(session, sample)


def find_by_code(session: Session, actor: Actor, code: str) -> tuple[Sample, ServiceOrder, list[SampleEvent]]:
    """The sample with a label code (as scanned; case and surrounding blanks do not matter)."""
    code = (code or "").strip().upper()
    found = session.scalars(select(Sample).where(Sample.code == code)).first() if code else None
    sample, order = _visible_sample(session, actor, found, repr(code))
    return sample, order, custody_events(session, sample)


def custody_events(session: Session, sample: Sample) -> list[SampleEvent]:
    """The custody events of one sample, oldest first."""
    return list(session.scalars(
        select(SampleEvent).where(SampleEvent.sample_id == sample.id).order_by(SampleEvent.at, SampleEvent.id)
    ))


# --- registering -------------------------------------------------------------------------------------------


def _clean(text: str | None, limit: int, field: str) -> str:
    text = (text or "").strip()
    if len(text) > limit:
        raise InvalidInput(f"The text is too long ({limit} characters at most).", field=field, code="too_long",
                           max=limit)
    return text


def _descriptions(descriptions: Sequence[str] | None, count: int | None) -> list[str]:
    """The descriptions of the samples to register: given one per sample, or `count` blank ones."""
    given = list(descriptions or [])
    if given:
        cleaned = [_clean(d, MAX_DESCRIPTION, "descriptions") for d in given]
        if count is not None and count != len(cleaned):
            raise InvalidInput("The count does not match the number of descriptions.", field="count",
                               code="count_mismatch", descriptions=len(cleaned))
    elif count is None:
        raise InvalidInput("Give the samples' descriptions or their number.", field="descriptions",
                           code="missing_field")
    else:
        cleaned = [""] * count
    if not 1 <= len(cleaned) <= MAX_SAMPLES_PER_REQUEST:
        raise InvalidInput(f"Register 1 to {MAX_SAMPLES_PER_REQUEST} samples at a time.",
                           field="count" if not given else "descriptions", code="out_of_range",
                           min=1, max=MAX_SAMPLES_PER_REQUEST)
    return cleaned


def _require_order_status(order: ServiceOrder, allowed: frozenset[OrderStatus], doing: str) -> None:
    if effective_status(order) not in allowed:
        raise OrderStatusForbids(
            f"Samples cannot be {doing} while the order is {order.status.value}.", field="order_id",
            order_status=order.status.value, allowed_statuses=sorted(s.value for s in allowed),
        )


def register_samples(
    session: Session,
    actor: Actor,
    order_id: int,
    *,
    descriptions: Sequence[str] | None = None,
    count: int | None = None,
    receive: bool = False,
    location: str = "",
    note: str = "",
) -> list[Sample]:
    """Register samples of an order, numbered after those it has, by their descriptions or their number.

    The customer or staff announce expected samples; staff may register and receive them in one step
    (`receive=True`, with an optional location), which records the receipt as for expected samples.
    """
    order = service.get_order(session, actor, order_id, for_update=True)
    if receive and service.Party.staff not in service.parties_of(actor, order):
        raise StaffOnly("Only the facility's staff record the receipt of samples.", field="receive")
    cleaned = _descriptions(descriptions, count)
    location = _clean(location, MAX_LOCATION, "location")
    note = _clean(note, MAX_NOTE, "note")
    if receive:
        _require_order_status(order, EVENT_ORDER_STATUSES[E.received], "received")
    else:
        _require_order_status(order, REGISTER_STATUSES, "registered")
    # The order row is locked (PostgreSQL) or the write serialised (SQLite), so no one else numbers samples
    # of this order meanwhile; the unique (order_id, position) and code back this up.
    last = session.scalar(select(func.max(Sample.position)).where(Sample.order_id == order.id)) or 0
    if last + len(cleaned) > MAX_SAMPLES_PER_ORDER:
        raise InvalidInput(f"An order has at most {MAX_SAMPLES_PER_ORDER} samples.", field="count",
                           code="too_many_samples", max=MAX_SAMPLES_PER_ORDER)
    now = utcnow()
    created = [
        Sample(order_id=order.id, position=last + i, code=sample_code(order, last + i), description=text,
               status=SS.received if receive else SS.expected, location=location if receive else "", created_at=now)
        for i, text in enumerate(cleaned, start=1)
    ]
    session.add_all(created)
    session.flush()
    if receive:
        session.add_all(SampleEvent(sample_id=s.id, event=E.received, actor_id=actor.user_id, at=now,
                                    location=location, note=note) for s in created)
        session.flush()
        _after_receipt(session, order, actor, created)
    return created


# --- custody -----------------------------------------------------------------------------------------------


def _as_event(value: CustodyEvent | str) -> CustodyEvent:
    try:
        return CustodyEvent(value)
    except ValueError:
        raise InvalidInput(f"Unknown custody event {value!r}.", field="event", code="unknown_event",
                           allowed=[e.value for e in CustodyEvent]) from None


def record_event(
    session: Session,
    actor: Actor,
    sample_id: int,
    event: CustodyEvent | str,
    *,
    location: str = "",
    note: str = "",
) -> tuple[Sample, ServiceOrder]:
    """Record a custody step of a sample as facility staff; returns the sample and its order.

    409 illegal_custody_event (with `allowed`) when the sample's status does not allow the step, 409
    order_status_forbids when the order's does not (e.g. receipt before the quote is accepted). `stored` needs a
    location; storing again moves the sample.
    """
    roles.require_some(actor, Action.manage_facility_orders)
    kind = _as_event(event)
    sample = session.get(Sample, sample_id)
    if sample is None:
        raise NotFound(f"Sample {sample_id} does not exist.", field="sample")
    try:
        order = service.get_order(session, actor, sample.order_id, staff=True, for_update=True)
    except NotFound:
        raise NotFound(f"Sample {sample_id} does not exist.", field="sample") from None
    # Read the sample again under the order's lock: a concurrent step may have committed while we waited.
    session.refresh(sample)
    location = _clean(location, MAX_LOCATION, "location")
    note = _clean(note, MAX_NOTE, "note")
    if kind == E.stored and not location:
        raise InvalidInput("Say where the sample is stored.", field="location", code="location_required")
    before = sample.status
    if kind not in NEXT_EVENTS[before]:
        raise IllegalCustodyEvent(
            f"A sample that is {before.value} cannot be {kind.value}.", field="event", sample_status=before.value,
            allowed=allowed_events(sample, order),
        )
    _require_order_status(order, EVENT_ORDER_STATUSES[kind], kind.value)
    after = STATUS_AFTER[kind]
    # Where the sample is now: the place given, or nowhere once it has left the facility's hands.
    where = "" if after in TERMINAL_SAMPLE else (location or sample.location)
    # A compare-and-set on the status: of two staff receiving the same sample at once only one changes it, even
    # where the order's row lock is not taken (SQLite serialises writers instead).
    result = session.execute(
        update(Sample).where(Sample.id == sample.id, Sample.status == before)
        .values(status=after, location=where).execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.refresh(sample)
        raise IllegalCustodyEvent(
            f"Someone else recorded a step of this sample at the same moment; it is now {sample.status.value}.",
            field="event", sample_status=sample.status.value, allowed=allowed_events(sample, order),
        )
    session.add(SampleEvent(sample_id=sample.id, event=kind, actor_id=actor.user_id, at=utcnow(), location=location,
                            note=note))
    session.flush()
    session.refresh(sample, attribute_names=["status", "location"])
    if kind == E.received:
        _after_receipt(session, order, actor, [sample])
    return sample, order


def _after_receipt(session: Session, order: ServiceOrder, actor: Actor, received: Sequence[Sample]) -> None:
    """The first receipt of an accepted order moves it to samples_received (the staff see where work stands)."""
    if order.status == S.accepted:
        service.apply_transition(session, order, S.samples_received, actor_id=actor.user_id,
                                 comment=", ".join(s.code for s in received))
