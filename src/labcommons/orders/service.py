"""The order life as an explicit state machine: who may move an order from which status to which, and the one
function that does it (`transition`), safe under concurrent requests."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, false, func, or_, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from labcommons.actor import Actor
from labcommons.catalog.models import Facility, Service
from labcommons.db import MAX_ID, utcnow
from labcommons.errors import Conflict, Forbidden, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity.models import Role, User
from labcommons.identity.roles import Action, FacilityRef
from labcommons.matching.models import Expert
from labcommons.orders.models import OrderEvent, OrderMessage, OrderStatus, ResultFile, Sample, ServiceOrder
from labcommons.pagination import decode_keyset, encode_cursor

S = OrderStatus
# Facilities work on China Standard Time: "today" for wanted-by dates and quote validity is their day.
FACILITY_ZONE = ZoneInfo("Asia/Shanghai")


def N_(message: str) -> str:
    """Mark a message for the catalogue; it is translated where shown (pages, mails)."""
    return message


STATUS_LABELS: dict[OrderStatus, str] = {
    S.draft: N_("Draft"),
    S.submitted: N_("Submitted"),
    S.quoted: N_("Quoted"),
    S.accepted: N_("Accepted"),
    S.samples_received: N_("Samples received"),
    S.in_progress: N_("In progress"),
    S.results_delivered: N_("Results delivered"),
    S.closed: N_("Closed"),
    S.rejected: N_("Rejected"),
    S.cancelled: N_("Cancelled"),
    S.on_hold: N_("On hold"),
}
# The main line of the life cycle, for progress bars; rejected, cancelled and on_hold leave it.
LIFE_CYCLE: tuple[OrderStatus, ...] = (
    S.draft, S.submitted, S.quoted, S.accepted, S.samples_received, S.in_progress, S.results_delivered, S.closed,
)


def facility_today(now: datetime | None = None) -> date:
    """Today's date where the facilities are (Asia/Shanghai)."""
    return (now or utcnow()).astimezone(FACILITY_ZONE).date()


class Party(enum.StrEnum):
    """Which side of an order an actor is on."""

    customer = "customer"
    staff = "staff"


CUSTOMER = frozenset({Party.customer})
STAFF = frozenset({Party.staff})
BOTH = CUSTOMER | STAFF


@dataclass(frozen=True)
class Step:
    """One allowed transition: the parties who may take it, whether a comment is required, and whether it is
    taken through a dedicated action (quote, accept, decline) rather than the generic transition call."""

    parties: frozenset[Party]
    needs_comment: bool = False
    via: str | None = None


# The whole state machine. on_hold → the status it was held from is "resume" (see `_resume_step`).
TRANSITIONS: dict[tuple[OrderStatus, OrderStatus], Step] = {
    (S.draft, S.submitted): Step(CUSTOMER),
    (S.draft, S.cancelled): Step(CUSTOMER),
    (S.submitted, S.quoted): Step(STAFF, via="quote"),
    (S.submitted, S.rejected): Step(STAFF, needs_comment=True),
    (S.submitted, S.cancelled): Step(CUSTOMER),
    (S.submitted, S.on_hold): Step(STAFF, needs_comment=True),
    # A new quote version replaces the offered one; recorded as quoted → quoted.
    (S.quoted, S.quoted): Step(STAFF, via="quote"),
    (S.quoted, S.accepted): Step(CUSTOMER, via="accept_quote"),
    (S.quoted, S.submitted): Step(CUSTOMER, via="decline_quote"),
    (S.quoted, S.rejected): Step(STAFF, needs_comment=True),
    (S.quoted, S.cancelled): Step(CUSTOMER),
    (S.quoted, S.on_hold): Step(STAFF, needs_comment=True),
    (S.accepted, S.samples_received): Step(STAFF),
    (S.accepted, S.in_progress): Step(STAFF),
    (S.accepted, S.cancelled): Step(BOTH, needs_comment=True),
    (S.accepted, S.on_hold): Step(STAFF, needs_comment=True),
    (S.samples_received, S.in_progress): Step(STAFF),
    (S.samples_received, S.cancelled): Step(STAFF, needs_comment=True),
    (S.samples_received, S.on_hold): Step(STAFF, needs_comment=True),
    (S.in_progress, S.results_delivered): Step(STAFF),
    (S.in_progress, S.cancelled): Step(STAFF, needs_comment=True),
    (S.in_progress, S.on_hold): Step(STAFF, needs_comment=True),
    (S.results_delivered, S.closed): Step(BOTH),
    (S.results_delivered, S.in_progress): Step(STAFF, needs_comment=True),
    (S.on_hold, S.cancelled): Step(STAFF, needs_comment=True),
    (S.on_hold, S.rejected): Step(STAFF, needs_comment=True),
}
TERMINAL = frozenset({S.closed, S.rejected, S.cancelled})
# Holding and refusing are only possible before the work was agreed; rejecting an on-hold order likewise.
_REJECTABLE_FROM_HOLD = frozenset({S.submitted, S.quoted})
_RESUME = Step(STAFF)


class IllegalTransition(Conflict):
    """The order's status does not allow this step (now); `allowed` lists the steps the caller may take.

    `code` names a more specific rule (e.g. no_results) where there is one.
    """

    code = "illegal_transition"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None, **details: Any) -> None:
        super().__init__(message, field=field, **details)
        if code:
            self.code = code


class OrderChanged(Conflict):
    """Another request moved the order first (compare-and-set on its version lost)."""

    code = "order_changed"


class NotYourStep(Forbidden):
    """The step exists but belongs to the other party (the user or the facility staff)."""

    code = "not_your_step"


# --- who is who ------------------------------------------------------------------------------------------------


def facility_ref(order: ServiceOrder, facility: Facility | None = None) -> FacilityRef:
    """The order's facility for permission checks."""
    if facility is None:
        facility = order.facility
    return FacilityRef(id=facility.id, institution_id=facility.institution_id)


def is_staff(actor: Actor | None, facility: FacilityRef) -> bool:
    """Whether the actor works the orders of the facility (staff, manager, its institution admin, platform)."""
    return roles.authorize(actor, Action.manage_facility_orders, facility=facility)


def parties_of(actor: Actor | None, order: ServiceOrder) -> frozenset[Party]:
    """The sides of the order the actor is on (both for staff who ordered from their own facility)."""
    if actor is None:
        return frozenset()
    found = set()
    if order.user_id == actor.user_id:
        found.add(Party.customer)
    if is_staff(actor, facility_ref(order)):
        found.add(Party.staff)
    return frozenset(found)


def get_order(session: Session, actor: Actor, order_id: int, *, staff: bool = False,
              for_update: bool = False) -> ServiceOrder:
    """An order the actor may see (its user or the facility's staff), with service, facility and user loaded.

    `staff=True` requires the actor to be the facility's staff: Forbidden for someone who is staff nowhere, else
    NotFound for anyone not on the order, as if it did not exist, so order ids reveal nothing. `for_update` locks
    the row on PostgreSQL.
    """
    if staff:
        roles.require_some(actor, Action.manage_facility_orders)
    stmt = select(ServiceOrder).where(ServiceOrder.id == order_id).options(
        joinedload(ServiceOrder.service), joinedload(ServiceOrder.facility), joinedload(ServiceOrder.user)
    )
    if for_update:
        stmt = stmt.with_for_update(of=ServiceOrder)
    order = session.scalars(stmt).unique().first()
    if order is None:
        raise NotFound(f"Order {order_id} does not exist.", field="order_id")
    sides = parties_of(actor, order)
    if not sides or (staff and Party.staff not in sides):
        raise NotFound(f"Order {order_id} does not exist.", field="order_id")
    return order


# --- the state machine -----------------------------------------------------------------------------------------


def step_for(order: ServiceOrder, to: OrderStatus) -> Step | None:
    """The rule for moving `order` to `to` from where it is now, or None if there is none."""
    if order.status == S.on_hold:
        if to == order.held_from:
            return _RESUME
        if to == S.rejected and order.held_from not in _REJECTABLE_FROM_HOLD:
            return None
    return TRANSITIONS.get((order.status, to))


def allowed_transitions(order: ServiceOrder, sides: Iterable[Party], *, include_via: bool = True) -> list[str]:
    """The statuses the holder of `sides` may move the order to now, in the order of the life cycle."""
    sides = frozenset(sides)
    result = []
    for target in OrderStatus:
        step = step_for(order, target)
        if step is None or not (step.parties & sides):
            continue
        if step.via is not None and not include_via:
            continue
        result.append(target.value)
    return result


def _refuse(order: ServiceOrder, to: OrderStatus, sides: frozenset[Party], step: Step | None) -> None:
    allowed = allowed_transitions(order, sides)
    if step is None:
        raise IllegalTransition(
            f"An order that is {order.status.value} cannot become {to.value}.", field="to",
            status=order.status.value, allowed=allowed,
        )
    raise NotYourStep(
        f"Moving an order from {order.status.value} to {to.value} is for the "
        f"{' or '.join(sorted(p.value for p in step.parties))}.", field="to", status=order.status.value,
        allowed=allowed,
    )


def apply_transition(
    session: Session,
    order: ServiceOrder,
    to: OrderStatus,
    *,
    actor_id: int | None,
    comment: str = "",
    expected_version: int | None = None,
) -> OrderEvent:
    """Move the order and record the event, with no permission check (callers have done it).

    A compare-and-set on the order's version: of two transactions that read the same version only the first to
    write wins; the other finds the row changed (PostgreSQL re-checks the WHERE after the winner commits) and gets
    409 order_changed. The unique (order_id, version) of the event log backs this up.
    """
    version = order.version if expected_version is None else expected_version
    if expected_version is not None and expected_version != order.version:
        raise OrderChanged("The order has changed since you looked at it; reload it.", field="expected_version",
                           status=order.status.value, version=order.version)
    from_status = order.status
    held_from = order.status if to == S.on_hold else (None if from_status == S.on_hold else order.held_from)
    now = utcnow()
    values: dict[str, object] = {"status": to, "version": version + 1, "held_from": held_from, "updated_at": now}
    if to == S.submitted and order.submitted_at is None:
        values["submitted_at"] = now
    if to in TERMINAL:
        values["closed_at"] = now
    result = session.execute(
        update(ServiceOrder)
        .where(ServiceOrder.id == order.id, ServiceOrder.version == version, ServiceOrder.status == from_status)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.expire(order)
        raise OrderChanged("Someone else changed this order at the same moment; reload it.", field="to")
    event = OrderEvent(order_id=order.id, version=version + 1, from_status=from_status, to_status=to,
                       actor_id=actor_id, at=now, comment=comment)
    try:
        with session.begin_nested():
            session.add(event)
            session.flush()
    except IntegrityError as exc:
        raise OrderChanged("Someone else changed this order at the same moment; reload it.", field="to") from exc
    session.refresh(order, attribute_names=["status", "version", "held_from", "updated_at", "submitted_at",
                                            "closed_at"])
    if to in TERMINAL:
        from labcommons.orders import quotes

        # An offered quote of a cancelled or rejected order can no longer be accepted.
        quotes.withdraw_offered(session, order)
    from labcommons.orders import notify

    notify.order_changed(session, order, event)
    return event


def transition(
    session: Session,
    actor: Actor,
    order_id: int,
    to: OrderStatus | str,
    *,
    comment: str = "",
    expected_version: int | None = None,
    via: str | None = None,
) -> ServiceOrder:
    """Move an order to status `to` as `actor`; 409 illegal_transition (with `allowed`) when its status does not
    allow it, 403 not_your_step when the step is the other party's.

    Steps taken through a dedicated action (issuing, accepting or declining a quote) pass that action as `via`;
    no other step may be taken with a `via`. Submitting a draft of a fixed-price service also quotes it at the list
    price (orders.quotes.auto_quote), so the order comes back quoted.
    """
    target = _as_status(to)
    order = get_order(session, actor, order_id)
    sides = parties_of(actor, order)
    step = step_for(order, target)
    if step is None or not (step.parties & sides):
        _refuse(order, target, sides, step)
    assert step is not None
    if step.via != via:
        # Quote steps go through their own actions (which check the quote), and those actions move nothing else.
        action = (step.via or "transition").replace("_", " ")
        raise IllegalTransition(
            f"Moving an order to {target.value} is done by the {action} action.", field="to",
            status=order.status.value, allowed=allowed_transitions(order, sides), via=step.via,
        )
    comment = (comment or "").strip()
    if len(comment) > 2000:
        raise InvalidInput("The comment is too long (2000 characters at most).", field="comment", code="too_long")
    if step.needs_comment and not comment:
        raise InvalidInput(f"Say why the order becomes {target.value}; the other side is told.", field="comment",
                           code="comment_required")
    if not (order.status == S.on_hold and target == order.held_from):  # resuming: it was there already
        _check_guards(session, order, target)
    from_status = order.status
    apply_transition(session, order, target, actor_id=actor.user_id, comment=comment,
                     expected_version=expected_version)
    if target == S.results_delivered:
        from labcommons.billing import ledger

        ledger.charge_order(session, order)
    if from_status == S.draft and target == S.submitted:
        from labcommons.orders import quotes

        # A fixed-price service is quoted at once, so the user can accept straight away.
        quotes.auto_quote(session, order)
    return order


def _check_guards(session: Session, order: ServiceOrder, to: OrderStatus) -> None:
    """Conditions beyond the status: results must exist before delivery, samples before their receipt."""
    if to == S.results_delivered:
        from labcommons.orders import results

        if not results.has_deliverable(session, order):
            raise IllegalTransition("Upload at least one result file before delivering results.", field="to",
                                    code="no_results", status=order.status.value)
    if to == S.samples_received:
        from labcommons.orders import samples

        if not samples.any_received(session, order):
            raise IllegalTransition("Record the receipt of at least one sample first.", field="to",
                                    code="no_samples_received", status=order.status.value)


def _as_status(value: OrderStatus | str) -> OrderStatus:
    try:
        return OrderStatus(value)
    except ValueError:
        raise InvalidInput(f"Unknown order status {value!r}.", field="to", code="unknown_status",
                           allowed=[s.value for s in OrderStatus]) from None


# --- creating and listing --------------------------------------------------------------------------------------


def order_number(order: ServiceOrder) -> str:
    """The human reference of an order: SO-<year>-<id, six digits>."""
    return f"SO-{order.created_at.year}-{order.id:06d}"


def create_order(
    session: Session,
    actor: Actor,
    service_id: int,
    *,
    title: str,
    description: str = "",
    sample_count: int = 0,
    sample_description: str = "",
    wanted_by: date | None = None,
    contact_phone: str = "",
    account_id: int | None = None,
    expert_id: int | None = None,
) -> ServiceOrder:
    """A draft order of an active service by the actor; submitting it is the `submitted` transition.

    When the facility charges, the order is tied to the funding account it will be charged to (`account_id`, or
    the actor's only account); accepting a quote holds its total there, delivering results charges it.
    `expert_id` names the expert a consultation asks for: an active expert of the service's facility, or one
    whose consultation service this is.
    """
    roles.require(actor, Action.order_service)
    service = session.get(Service, service_id, options=[joinedload(Service.facility)])
    if service is None or not service.is_active:
        raise NotFound(f"Service {service_id} does not exist or is not offered now.", field="service_id")
    title = (title or "").strip()
    if not title:
        raise InvalidInput("Give the order a title.", field="title", code="missing_field")
    if len(title) > 200:
        raise InvalidInput("The title is too long (200 characters at most).", field="title", code="too_long")
    if len(description) > 20000 or len(sample_description) > 5000:
        field = "description" if len(description) > 20000 else "sample_description"
        raise InvalidInput("The text is too long.", field=field, code="too_long")
    if not 0 <= sample_count <= 10000:
        raise InvalidInput("The number of samples must be 0 to 10000.", field="sample_count", code="out_of_range")
    if len(contact_phone.strip()) > 40:
        raise InvalidInput("The phone number is too long (40 characters at most).", field="contact_phone",
                           code="too_long")
    if wanted_by is not None and wanted_by < facility_today():
        raise InvalidInput("The wanted-by date is in the past.", field="wanted_by", code="date_in_past")
    if expert_id is not None:
        _check_expert(session, expert_id, service)
    order = ServiceOrder(
        service_id=service.id, facility_id=service.facility_id, user_id=actor.user_id, status=S.draft, version=1,
        title=title, description=description.strip(), sample_count=sample_count,
        sample_description=sample_description.strip(), wanted_by=wanted_by, contact_phone=contact_phone.strip(),
        expert_id=expert_id,
    )
    session.add(order)
    session.flush()
    order.number = order_number(order)
    session.add(OrderEvent(order_id=order.id, version=1, from_status=None, to_status=S.draft,
                           actor_id=actor.user_id, at=order.created_at))
    session.flush()
    from labcommons.billing import ledger  # billing charges orders, so it imports this module

    ledger.order_account(session, actor, order, account_id, now=utcnow())
    return order


def _check_expert(session: Session, expert_id: int, service: Service) -> None:
    # The column has no foreign key (see ServiceOrder.expert_id), so the link is checked here.
    expert = session.get(Expert, expert_id) if 0 < expert_id <= MAX_ID else None
    if expert is None or not expert.is_active or not (
        expert.consultation_service_id == service.id or expert.facility_id == service.facility_id
    ):
        raise InvalidInput("This expert does not consult through this service.", field="expert_id",
                           code="invalid_expert")


def events_of(session: Session, order: ServiceOrder) -> list[OrderEvent]:
    """The order's history, oldest first."""
    return list(session.scalars(
        select(OrderEvent).where(OrderEvent.order_id == order.id).order_by(OrderEvent.version)
    ))


def orderable_service(session: Session, service_id: int) -> Service:
    """An active service with its facility, for the order form; NotFound otherwise."""
    service = session.scalars(
        select(Service).where(Service.id == service_id).options(joinedload(Service.facility))
    ).first()
    if service is None or not service.is_active:
        raise NotFound(f"Service {service_id} does not exist or is not offered now.", field="service_id")
    return service


def user_names(session: Session, ids: Iterable[int | None]) -> dict[int, str]:
    """Display names of users by id (for timelines and threads)."""
    wanted = {i for i in ids if i is not None}
    if not wanted:
        return {}
    return {int(i): str(n) for i, n in session.execute(select(User.id, User.name).where(User.id.in_(wanted)))}


def _with_parts(stmt: Any) -> Any:
    return stmt.options(joinedload(ServiceOrder.service), joinedload(ServiceOrder.facility),
                        joinedload(ServiceOrder.user))


def _page(session: Session, stmt: Any, limit: int, cursor: str | None) -> tuple[list[ServiceOrder], str | None]:
    """Newest first by id, keyset-paged (ids only grow, so the order is creation order)."""
    if cursor:
        _rank, last_id = decode_keyset(cursor)
        stmt = stmt.where(ServiceOrder.id < last_id)
    rows = list(session.scalars(_with_parts(stmt).order_by(ServiceOrder.id.desc()).limit(limit + 1)).unique())
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, encode_cursor([rows[-1].id])
    return rows, None


def list_my_orders(session: Session, actor: Actor, *, status: OrderStatus | None = None, limit: int = 50,
                   cursor: str | None = None) -> tuple[list[ServiceOrder], str | None]:
    """The actor's own orders, newest first, one page and the cursor of the next."""
    roles.require(actor, Action.view_own_orders)
    stmt = select(ServiceOrder).where(ServiceOrder.user_id == actor.user_id)
    if status is not None:
        stmt = stmt.where(ServiceOrder.status == status)
    return _page(session, stmt, limit, cursor)


def staff_scope(actor: Actor) -> ColumnElement[bool]:
    """A filter on ServiceOrder: the orders of the facilities whose orders the actor works."""
    if roles.is_platform_admin(actor):
        return true()
    facility_roles = {Role.facility_staff.value, Role.facility_manager.value}
    facility_ids = {g.facility_id for g in actor.grants if g.role in facility_roles and g.facility_id}
    institution_ids = {g.institution_id for g in actor.grants
                       if g.role == Role.institution_admin.value and g.institution_id}
    clauses: list[ColumnElement[bool]] = []
    if facility_ids:
        clauses.append(ServiceOrder.facility_id.in_(facility_ids))
    if institution_ids:
        clauses.append(ServiceOrder.facility_id.in_(
            select(Facility.id).where(Facility.institution_id.in_(institution_ids))
        ))
    return or_(*clauses) if clauses else false()


def _queue_filter(session: Session, actor: Actor, facility: str | None) -> list[ColumnElement[bool]]:
    roles.require_some(actor, Action.manage_facility_orders)
    # Drafts are the user's own until submitted.
    where = [staff_scope(actor), ServiceOrder.status != S.draft]
    if facility:
        facility_id = session.scalar(select(Facility.id).where(Facility.code == facility.strip()))
        if facility_id is None:
            raise NotFound(f"No facility {facility!r}.", field="facility")
        where.append(ServiceOrder.facility_id == facility_id)
    return where


def staff_queue(session: Session, actor: Actor, *, status: OrderStatus | None = None, facility: str | None = None,
                limit: int = 50, cursor: str | None = None) -> tuple[list[ServiceOrder], str | None]:
    """Submitted orders of the facilities the actor works for (optionally one facility, by code), newest first."""
    stmt = select(ServiceOrder).where(*_queue_filter(session, actor, facility))
    if status is not None:
        stmt = stmt.where(ServiceOrder.status == status)
    return _page(session, stmt, limit, cursor)


def queue_counts(session: Session, actor: Actor, *, facility: str | None = None) -> dict[str, int]:
    """How many orders of the actor's queue are in each status (every status, zeros included; no drafts)."""
    rows = session.execute(
        select(ServiceOrder.status, func.count()).where(*_queue_filter(session, actor, facility))
        .group_by(ServiceOrder.status)
    )
    found = {OrderStatus(status).value: int(count) for status, count in rows}
    return {s.value: found.get(s.value, 0) for s in OrderStatus if s != S.draft}


# --- for the operator (command line): no permission checks --------------------------------------------------


def find_orders(session: Session, *, facility: str | None = None, status: OrderStatus | None = None,
                limit: int = 200) -> list[ServiceOrder]:
    """Orders of every facility (or one, by code), newest first; for the command line."""
    stmt = select(ServiceOrder)
    if facility:
        facility_id = session.scalar(select(Facility.id).where(Facility.code == facility.strip()))
        if facility_id is None:
            raise NotFound(f"No facility {facility!r}.", field="facility")
        stmt = stmt.where(ServiceOrder.facility_id == facility_id)
    if status is not None:
        stmt = stmt.where(ServiceOrder.status == status)
    return list(session.scalars(_with_parts(stmt).order_by(ServiceOrder.id.desc()).limit(limit)).unique())


def order_by_number(session: Session, number: str) -> ServiceOrder:
    """One order by its number (e.g. SO-2026-000042), with service, facility and user; for the command line."""
    order = session.scalars(_with_parts(select(ServiceOrder).where(ServiceOrder.number == number.strip().upper()))
                            ).unique().first()
    if order is None:
        raise NotFound(f"No order {number!r}.", field="number")
    return order


@dataclass(frozen=True)
class Counts:
    samples: int
    results: int
    messages: int


# Results become the user's to download once delivered (see orders.results).
_DELIVERED = frozenset({S.results_delivered, S.closed})


def counts_of(session: Session, order: ServiceOrder, sides: Iterable[Party]) -> Counts:
    """How many samples, result files (those the holder of `sides` may download) and messages the order has."""
    def count(model: Any, *where: Any) -> int:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)

    results = 0
    if Party.staff in frozenset(sides) or order.status in _DELIVERED:
        results = count(ResultFile, ResultFile.order_id == order.id, ResultFile.withdrawn_at.is_(None))
    return Counts(samples=count(Sample, Sample.order_id == order.id), results=results,
                  messages=count(OrderMessage, OrderMessage.order_id == order.id))
