"""Service order endpoints under /api/v1: orders, transitions, quotes, messages, ratings.

Reads need the token scope `orders:read`, writes `orders:write`; every POST takes an Idempotency-Key.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.http import Db, Id, IdempotencyKey, idempotent_post, link, require_role_for, require_scope
from labcommons.idempotency import Outcome
from labcommons.identity.roles import Action
from labcommons.orders import messages, quotes, ratings, service
from labcommons.orders.models import OrderStatus, ServiceOrder
from labcommons.orders.schemas import (
    EventList,
    EventRead,
    MessageCreate,
    MessageList,
    MessageRead,
    OrderCounts,
    OrderCreate,
    OrderDetail,
    OrderPage,
    OrderRead,
    QueuePage,
    QuoteCreate,
    QuoteDecline,
    QuoteList,
    QuoteRead,
    RatingCreate,
    RatingRead,
    TransitionCreate,
)

router = APIRouter(tags=["orders"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API token"},
    403: {"description": "Not your step (`not_your_step`), not staff anywhere, or the token lacks the scope"},
    404: {"description": "Unknown order or quote, or not yours to see"},
    409: {"description": "Conflicts with the order's state: `illegal_transition` (body lists `allowed`), "
                         "`order_changed`, `quote_expired`, `quote_not_offered`, `already_rated`"},
    422: {"description": "Invalid input; `field` names it and `error` the rule"},
}
# OpenAPI links: what a client (and the stateful fuzzer) can do next with an order it made, and with a quote.
ORDER_LINKS = {
    "GetOrder": link("get_order_api_v1_orders__order_id__get", order_id="id"),
    "MoveOrder": link("transition_api_v1_orders__order_id__transitions_post", order_id="id"),
    "ListEvents": link("list_events_api_v1_orders__order_id__events_get", order_id="id"),
    "IssueQuote": link("issue_quote_api_v1_orders__order_id__quotes_post", order_id="id"),
    "ListQuotes": link("list_quotes_api_v1_orders__order_id__quotes_get", order_id="id"),
    "PostMessage": link("post_message_api_v1_orders__order_id__messages_post", order_id="id"),
    "ListMessages": link("list_messages_api_v1_orders__order_id__messages_get", order_id="id"),
    "RegisterSamples": link("register_samples_api_v1_orders__order_id__samples_post", order_id="id"),
    "ListResults": link("list_order_results_api_v1_orders__order_id__results_get", order_id="id"),
}
QUOTE_LINKS = {
    "AcceptQuote": link("accept_quote_api_v1_orders__order_id__quotes__quote_id__accept_post",
                        order_id="$request.path.order_id", quote_id="id"),
    "DeclineQuote": link("decline_quote_api_v1_orders__order_id__quotes__quote_id__decline_post",
                         order_id="$request.path.order_id", quote_id="id"),
}
Reader = Annotated[Actor, Depends(require_scope("orders:read"))]
Writer = Annotated[Actor, Depends(require_scope("orders:write"))]


StaffWriter = Annotated[Actor, Depends(require_role_for("orders:write", Action.manage_facility_orders))]
StaffReader = Annotated[Actor, Depends(require_role_for("orders:read", Action.manage_facility_orders))]


def order_detail(session: Session, actor: Actor, order: ServiceOrder) -> OrderDetail:
    """The order as its user or staff sees it: what they may do next, the current quote, counts, rating."""
    sides = service.parties_of(actor, order)
    counts = service.counts_of(session, order, sides)
    quote = quotes.current_quote(session, order)
    rating = ratings.rating_of(session, order)
    return OrderDetail.model_validate({
        **OrderRead.fields_of(order),
        "parties": sorted(p.value for p in sides),
        "allowed_transitions": service.allowed_transitions(order, sides),
        "current_quote": QuoteRead.of(quote) if quote is not None else None,
        "counts": OrderCounts(samples=counts.samples, results=counts.results, messages=counts.messages),
        "rating": RatingRead.of(rating) if rating is not None else None,
    })


def _detail_of(session: Session, actor: Actor, order_id: int) -> dict[str, Any]:
    order = service.get_order(session, actor, order_id)
    return order_detail(session, actor, order).model_dump(mode="json")


# --- orders ---------------------------------------------------------------------------------------------------


@router.post("/orders", status_code=201, response_model=OrderDetail,
             responses={**ERRORS, 201: {"description": "The order", "links": ORDER_LINKS}})
def create_order(body: OrderCreate, request: Request, actor: Writer, db: Db,
                 idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Order a service: a draft, or submitted at once with `submit: true` (a fixed-price service is then quoted
    automatically at its list price)."""

    def work(session: Session) -> Outcome:
        order = service.create_order(
            session, actor, body.service_id, title=body.title, description=body.description,
            sample_count=body.sample_count, sample_description=body.sample_description, wanted_by=body.wanted_by,
            contact_phone=body.contact_phone, account_id=body.account_id,
        )
        if body.submit:
            service.transition(session, actor, order.id, OrderStatus.submitted)
        return Outcome(201, _detail_of(session, actor, order.id))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.get("/orders", response_model=OrderPage, responses=ERRORS)
def list_orders(
    actor: Reader, db: Db, status: OrderStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50, cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> OrderPage:
    """The caller's own orders, newest first."""
    with db.unit_of_work(write=False) as session:
        rows, next_cursor = service.list_my_orders(session, actor, status=status, limit=limit, cursor=cursor)
        return OrderPage(items=[OrderRead.of(o) for o in rows], next_cursor=next_cursor)


@router.get("/manage/orders", response_model=QueuePage, responses=ERRORS)
def staff_queue(
    actor: StaffReader, db: Db, status: OrderStatus | None = None,
    facility: Annotated[str | None, Query(max_length=40, description="Facility code")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50, cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> QueuePage:
    """Submitted orders of the facilities the caller works for (staff, manager, institution or platform admin),
    newest first, with counts per status."""
    with db.unit_of_work(write=False) as session:
        rows, next_cursor = service.staff_queue(session, actor, status=status, facility=facility, limit=limit,
                                                cursor=cursor)
        counts = service.queue_counts(session, actor, facility=facility)
        return QueuePage(items=[OrderRead.of(o) for o in rows], next_cursor=next_cursor, counts=counts)


@router.get("/orders/{order_id}", response_model=OrderDetail, responses=ERRORS)
def get_order(order_id: Id, actor: Reader, db: Db) -> OrderDetail:
    """One order of the caller or of a facility they work for; anyone else's is 404."""
    with db.unit_of_work(write=False) as session:
        return order_detail(session, actor, service.get_order(session, actor, order_id))


@router.post("/orders/{order_id}/transitions", response_model=OrderDetail, responses=ERRORS)
def transition(order_id: Id, body: TransitionCreate, request: Request, actor: Writer, db: Db,
               idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Move the order to status `to`. 409 `illegal_transition` lists the caller's `allowed` targets; pass
    `expected_version` to refuse with 409 `order_changed` if someone moved it meanwhile."""

    def work(session: Session) -> Outcome:
        service.transition(session, actor, order_id, body.to, comment=body.comment,
                           expected_version=body.expected_version)
        return Outcome(200, _detail_of(session, actor, order_id))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.get("/orders/{order_id}/events", response_model=EventList, responses=ERRORS)
def list_events(order_id: Id, actor: Reader, db: Db) -> EventList:
    """The order's history, oldest first: every status change with who, when and why."""
    with db.unit_of_work(write=False) as session:
        events = service.events_of(session, service.get_order(session, actor, order_id))
        names = service.user_names(session, (e.actor_id for e in events))
        return EventList(items=[EventRead.of(e, names) for e in events])


# --- quotes ---------------------------------------------------------------------------------------------------


@router.get("/orders/{order_id}/quotes", response_model=QuoteList, responses=ERRORS)
def list_quotes(order_id: Id, actor: Reader, db: Db) -> QuoteList:
    """Every quote version of the order, newest first."""
    with db.unit_of_work(write=False) as session:
        return QuoteList(items=[QuoteRead.of(q) for q in quotes.list_quotes(session, actor, order_id)])


@router.post("/orders/{order_id}/quotes", status_code=201, response_model=QuoteRead,
             responses={**ERRORS, 201: {"description": "The quote", "links": QUOTE_LINKS}})
def issue_quote(order_id: Id, body: QuoteCreate, request: Request, actor: StaffWriter, db: Db,
                idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Offer a quote (facility staff) for a submitted order, or a new version replacing the one on offer."""

    def work(session: Session) -> Outcome:
        quote = quotes.issue_quote(session, actor, order_id, body.line_tuples(), body.valid_until, body.note,
                                   expected_version=body.expected_version)
        return Outcome(201, QuoteRead.of(quote).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.post("/orders/{order_id}/quotes/{quote_id}/accept", response_model=OrderDetail, responses=ERRORS)
def accept_quote(order_id: Id, quote_id: Id, request: Request, actor: Writer, db: Db,
                 idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Accept the quote on offer (the order's user); 409 `quote_expired` past its validity."""

    def work(session: Session) -> Outcome:
        quotes.accept_quote(session, actor, order_id, quote_id)
        return Outcome(200, _detail_of(session, actor, order_id))

    return idempotent_post(request, db, actor, idempotency_key, None, work)


@router.post("/orders/{order_id}/quotes/{quote_id}/decline", response_model=OrderDetail, responses=ERRORS)
def decline_quote(order_id: Id, quote_id: Id, request: Request, actor: Writer, db: Db,
                  body: QuoteDecline | None = None, idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Decline the quote on offer (the order's user), with an optional reason; the order awaits a new quote."""
    reason = body.reason if body is not None else ""

    def work(session: Session) -> Outcome:
        quotes.decline_quote(session, actor, order_id, quote_id, reason)
        return Outcome(200, _detail_of(session, actor, order_id))

    return idempotent_post(request, db, actor, idempotency_key, {"reason": reason}, work)


# --- messages and rating --------------------------------------------------------------------------------------


@router.get("/orders/{order_id}/messages", response_model=MessageList, responses=ERRORS)
def list_messages(order_id: Id, actor: Reader, db: Db) -> MessageList:
    """The order's message thread, oldest first."""
    with db.unit_of_work(write=False) as session:
        return MessageList(items=[MessageRead.of(v) for v in messages.list_messages(session, actor, order_id)])


@router.post("/orders/{order_id}/messages", status_code=201, response_model=MessageRead, responses=ERRORS)
def post_message(order_id: Id, body: MessageCreate, request: Request, actor: Writer, db: Db,
                 idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Write to the order's thread; the other side is e-mailed."""

    def work(session: Session) -> Outcome:
        message = messages.post_message(session, actor, order_id, body.body)
        view = messages.MessageView(message, service.user_names(session, [actor.user_id]).get(actor.user_id, ""))
        return Outcome(201, MessageRead.of(view).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.post("/orders/{order_id}/rating", status_code=201, response_model=RatingRead, responses=ERRORS)
def rate_order(order_id: Id, body: RatingCreate, request: Request, actor: Writer, db: Db,
               idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Rate a closed order (its user, once: 409 `already_rated` afterwards)."""

    def work(session: Session) -> Outcome:
        rating = ratings.rate_order(session, actor, order_id, body.score, body.comment)
        return Outcome(201, RatingRead.of(rating).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)
