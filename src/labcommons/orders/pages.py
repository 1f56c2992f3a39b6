"""Service order pages: ordering a service, my orders, an order's page, the facility's order queue."""

from __future__ import annotations

import re
from datetime import date, timedelta
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, Response

from labcommons.actor import Actor
from labcommons.billing import talent
from labcommons.catalog.models import PriceUnit, Service
from labcommons.db import Database
from labcommons.errors import Conflict, DomainError, Forbidden, InvalidInput
from labcommons.http import Id, request_db
from labcommons.i18n import gettext_ as _
from labcommons.identity import roles
from labcommons.identity.roles import Action
from labcommons.orders import messages, quotes, ratings, results, samples, service
from labcommons.orders.models import OrderStatus, Quote, QuoteStatus, ServiceOrder
from labcommons.orders.service import LIFE_CYCLE, STATUS_LABELS, Party
from labcommons.pages import N_, check_csrf, env, redirect, render, require_actor, url_with, yuan

router = APIRouter(include_in_schema=False)

S = OrderStatus
QUOTE_FORM_ROWS = 5


def manages_orders(actor: Actor | None) -> bool:
    """Whether the layout links the order queue: the actor works the orders of some facility."""
    return actor is not None and any(
        g.role in roles.PERMISSIONS[Action.manage_facility_orders].roles for g in actor.grants
    )


def status_label(status: OrderStatus | str) -> str:
    """An order status in the page's language."""
    return _(STATUS_LABELS[OrderStatus(status)])


_BADGES = {
    S.accepted: "booking-confirmed", S.samples_received: "booking-confirmed", S.in_progress: "booking-confirmed",
    S.results_delivered: "booking-confirmed", S.closed: "booking-completed", S.rejected: "booking-cancelled",
    S.cancelled: "booking-cancelled",
}


def status_badge(status: OrderStatus | str) -> str:
    """The badge class of a status (the booking colours: green under way, amber waiting, grey finished)."""
    return _BADGES.get(OrderStatus(status), "booking-pending")


# The layout links "My orders" and, for staff, the queue.
env.globals["manages_orders"] = manages_orders
env.globals["order_status_label"] = status_label
env.globals["order_status_badge"] = status_badge

QUOTE_STATUS_LABELS = {
    QuoteStatus.offered: N_("Offered"), QuoteStatus.accepted: N_("Accepted"), QuoteStatus.declined: N_("Declined"),
    QuoteStatus.superseded: N_("Superseded"), QuoteStatus.withdrawn: N_("Withdrawn"),
}
PRICE_UNIT_LABELS = {PriceUnit.sample: N_("per sample"), PriceUnit.project: N_("per project"),
                     PriceUnit.hour: N_("per hour")}
# What the buttons for the generic transitions say.
ACTION_LABELS = {
    S.submitted: N_("Submit order"), S.cancelled: N_("Cancel order"), S.rejected: N_("Reject order"),
    S.on_hold: N_("Put on hold"), S.samples_received: N_("Samples received"), S.in_progress: N_("Start work"),
    S.results_delivered: N_("Deliver results"), S.closed: N_("Close order"),
}


def action_label(order: ServiceOrder, target: str) -> str:
    """What the button taking the order to `target` says."""
    if order.status == S.on_hold and target == order.held_from:
        return _("Resume (%(status)s)") % {"status": status_label(target)}
    return _(ACTION_LABELS.get(OrderStatus(target), STATUS_LABELS[OrderStatus(target)]))


def error_message(exc: DomainError) -> str:
    """An order problem in the user's language."""
    details = exc.details
    texts = {
        "illegal_transition": _("This step is not possible now; the page shows what you can do."),
        "not_your_step": _("This step is for the other side of the order."),
        "order_changed": _("Someone else changed this order at the same moment; here is its current state."),
        "comment_required": _("Say why; the other side is told."),
        "no_results": _("Upload at least one result file before delivering results."),
        "no_samples_received": _("Record the receipt of at least one sample first."),
        "quote_expired": _("This quote has expired; ask the facility for a new one."),
        "quote_not_offered": _("This quote is no longer on offer; reload the page."),
        "already_rated": _("You have rated this order already."),
        "order_not_closed": _("Only a closed order can be rated."),
        "no_lines": _("A quote needs at least one line."),
        "too_many_lines": _("A quote has too many lines."),
        "missing_field": _("Fill in the required fields."),
        "too_long": _("The text is too long."),
        "out_of_range": _("Enter a number from %(min)s to %(max)s.") % {"min": details.get("min", ""),
                                                                       "max": details.get("max", "")},
        "invalid_number": _("Enter a whole number."),
        "invalid_amount": _("Enter an amount in yuan, such as 1200 or 1200.50."),
        "invalid_date": _("Enter the date as YYYY-MM-DD."),
        "date_in_past": _("The date must not be in the past."),
        "unknown_status": _("Unknown order status."),
    }
    if exc.code not in texts:
        from labcommons.billing.pages import billing_error_message  # billing's pages import this module

        return billing_error_message(exc) or _("Some of what was sent is not valid.")
    return texts[exc.code]


_YUAN = re.compile(r"^\d{1,12}(\.\d{1,2})?$")


def parse_yuan(text: str, field: str) -> int:
    """An amount in yuan as typed (1200, 1,200.5, ¥1200.50) in integer fen, exactly (no floats)."""
    cleaned = text.strip().replace(",", "").replace("¥", "").replace("￥", "").strip()
    if not _YUAN.match(cleaned):
        raise InvalidInput("Enter an amount in yuan.", field=field, code="invalid_amount")
    try:
        return int(Decimal(cleaned) * 100)
    except InvalidOperation:
        raise InvalidInput("Enter an amount in yuan.", field=field, code="invalid_amount") from None


def parse_int(text: str, field: str, default: int | None = None) -> int:
    """A whole number as typed; `default` for a blank field."""
    text = text.strip()
    if not text and default is not None:
        return default
    if not re.fullmatch(r"\d{1,9}", text):
        raise InvalidInput("Enter a whole number.", field=field, code="invalid_number")
    return int(text)


def form_version(text: str) -> int | None:
    """The order version a form was rendered at (its hidden expected_version), None when it is not a number."""
    text = text.strip()
    return int(text) if re.fullmatch(r"\d{1,9}", text) else None


def parse_day(text: str, field: str) -> date | None:
    """A YYYY-MM-DD date as typed; None for a blank field."""
    text = text.strip()
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidInput("Enter the date as YYYY-MM-DD.", field=field, code="invalid_date") from None


# --- the order form ---------------------------------------------------------------------------------------------

_ORDER_FIELDS = ("title", "description", "sample_count", "sample_description", "wanted_by", "contact_phone")


def _order_form(request: Request, svc: Service, form: dict[str, str], status_code: int = 200,
                error: str | None = None, error_field: str | None = None, expert: Any = None) -> HTMLResponse:
    return render(
        request, "orders/order_form.html", status_code, page_path=f"/services/{svc.id}/order", service=svc,
        form=form, error=error, error_field=error_field, expert=expert,
        price_unit=_(PRICE_UNIT_LABELS.get(svc.price_unit, PRICE_UNIT_LABELS[PriceUnit.sample])),
        today=service.facility_today().isoformat(),
    )


@router.get("/services/{service_id}/order", response_class=HTMLResponse)
def order_form(service_id: Id, request: Request, db: Annotated[Database, Depends(request_db)]) -> HTMLResponse:
    """The form ordering a service, with its sample requirements and price."""
    actor = require_actor(request)
    roles.require(actor, Action.order_service)
    with db.unit_of_work(write=False) as session:
        svc = service.orderable_service(session, service_id)
        expert = _consulted_expert(session, svc, request.query_params.get("expert_id", ""))
    form = dict.fromkeys(_ORDER_FIELDS, "") | {"expert_id": str(expert.id) if expert else ""}
    return _order_form(request, svc, form, expert=expert)


def _consulted_expert(session: Any, svc: Service, raw: str) -> Any:
    """The expert a consultation order names (from an expert's profile), or None when absent or not of this
    service; the order itself checks it again."""
    from labcommons.matching import experts  # matching links experts to orders, so it imports this domain

    if not raw.isdigit() or len(raw) > 12:
        return None
    try:
        expert = experts.get_expert(session, int(raw))
    except DomainError:
        return None
    fits = expert.consultation_service_id == svc.id or expert.facility_id == svc.facility_id
    return expert if fits else None


@router.post("/services/{service_id}/order", response_model=None)
def place_order(
    service_id: Id, request: Request, db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "", title: Annotated[str, Form()] = "",
    description: Annotated[str, Form()] = "", sample_count: Annotated[str, Form()] = "",
    sample_description: Annotated[str, Form()] = "", wanted_by: Annotated[str, Form()] = "",
    contact_phone: Annotated[str, Form()] = "", action: Annotated[str, Form()] = "submit",
    account_id: Annotated[str, Form()] = "", expert_id: Annotated[str, Form()] = "",
) -> Response:
    """Save the order as a draft or submit it; the form again with the problem named, else the order's page."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    form = {"title": title, "description": description, "sample_count": sample_count,
            "sample_description": sample_description, "wanted_by": wanted_by, "contact_phone": contact_phone,
            "account_id": account_id, "expert_id": expert_id}
    try:
        from labcommons.billing.pages import form_account_id  # billing's pages import this module

        account = form_account_id(account_id)
        count = parse_int(sample_count, "sample_count", default=0)
        wanted = parse_day(wanted_by, "wanted_by")
        expert = parse_int(expert_id, "expert_id") if expert_id.strip() else None
        with db.unit_of_work() as session:
            order = service.create_order(
                session, actor, service_id, title=title, description=description, sample_count=count,
                sample_description=sample_description, wanted_by=wanted, contact_phone=contact_phone,
                account_id=account, expert_id=expert,
            )
            if action != "draft":
                service.transition(session, actor, order.id, S.submitted)
            order_id, number, status = order.id, order.number, order.status
    except InvalidInput as exc:
        with db.unit_of_work(write=False) as session:
            svc = service.orderable_service(session, service_id)
            chosen = _consulted_expert(session, svc, expert_id.strip())
        form["expert_id"] = str(chosen.id) if chosen else ""
        return _order_form(request, svc, form, 422, error=error_message(exc), error_field=exc.field, expert=chosen)
    if status == S.draft:
        text = _("Draft %(number)s saved. Submit it from its page when it is ready.") % {"number": number}
    elif status == S.quoted:
        text = _("Order %(number)s submitted and quoted at the list price; you can accept the quote now.") % {
            "number": number}
    else:
        text = _("Order %(number)s submitted. The facility will send you a quote.") % {"number": number}
    return redirect(f"/orders/{order_id}", flash=text)


# --- my orders and the queue ------------------------------------------------------------------------------------


def _status_param(value: str | None) -> OrderStatus | None:
    try:
        return OrderStatus(value) if value else None
    except ValueError:
        raise InvalidInput("Unknown order status.", field="status", code="unknown_status") from None


@router.get("/orders", response_class=HTMLResponse)
def my_orders(
    request: Request, db: Annotated[Database, Depends(request_db)],
    status: Annotated[str | None, Query(max_length=32)] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> HTMLResponse:
    """The user's orders, newest first, with their status."""
    actor = require_actor(request)
    chosen = _status_param(status)
    with db.unit_of_work(write=False) as session:
        rows, next_cursor = service.list_my_orders(session, actor, status=chosen, limit=50, cursor=cursor)
    return render(request, "orders/my_orders.html", orders=rows, status=chosen,
                  next_url=url_with(request, cursor=next_cursor) if next_cursor else None,
                  statuses=[s for s in OrderStatus])


@router.get("/manage/orders", response_class=HTMLResponse)
def order_queue(
    request: Request, db: Annotated[Database, Depends(request_db)],
    status: Annotated[str | None, Query(max_length=32)] = None,
    facility: Annotated[str | None, Query(max_length=40)] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> HTMLResponse:
    """The orders of the facilities the user works for, by status, with counts per status."""
    actor = require_actor(request)
    roles.require_some(actor, Action.manage_facility_orders)
    chosen = _status_param(status)
    facility = (facility or "").strip() or None
    with db.unit_of_work(write=False) as session:
        rows, next_cursor = service.staff_queue(session, actor, status=chosen, facility=facility, limit=50,
                                                cursor=cursor)
        counts = service.queue_counts(session, actor, facility=facility)
        fast = talent.fast_tracked_orders(session, rows, service.facility_today())
    return render(request, "orders/queue.html", orders=rows, status=chosen, counts=counts, facility=facility,
                  total=sum(counts.values()), fast_track_ids=fast,
                  next_url=url_with(request, cursor=next_cursor) if next_cursor else None)


# --- the order page ------------------------------------------------------------------------------------------------


def _progress(order_status: OrderStatus, held_from: OrderStatus | None, events: list[Any]) -> list[dict[str, Any]]:
    """The main line of the life cycle with each step done, current or to come."""
    if order_status in LIFE_CYCLE:
        reached = order_status
    elif order_status == S.on_hold and held_from in LIFE_CYCLE:
        reached = held_from
    else:  # rejected or cancelled: where it left the line
        reached = next((e.to_status for e in reversed(events) if e.to_status in LIFE_CYCLE), S.draft)
    at = LIFE_CYCLE.index(reached)
    return [{"status": s.value, "label": status_label(s),
             "state": "done" if i < at else ("current" if i == at else "todo")} for i, s in enumerate(LIFE_CYCLE)]


def _quote_form(current: Quote | None) -> dict[str, Any]:
    """The quote form: a new version starts from the lines on offer, then blank rows (at least one)."""
    lines = []
    if current is not None and current.status == QuoteStatus.offered:
        lines = [{"description": x.description, "quantity": str(x.quantity),
                  "price": f"{x.unit_price_fen // 100}.{x.unit_price_fen % 100:02d}"} for x in current.lines]
    blank = max(QUOTE_FORM_ROWS - len(lines), 1)
    return {"lines": lines + [{"description": "", "quantity": "", "price": ""} for _i in range(blank)],
            "valid_until": (service.facility_today() + timedelta(days=30)).isoformat(), "note": ""}


def _order_page(request: Request, db: Database, actor: Actor, order_id: int, status_code: int = 200,
                **context: Any) -> HTMLResponse:
    with db.unit_of_work(write=False) as session:
        order = service.get_order(session, actor, order_id)
        sides = service.parties_of(actor, order)
        is_staff, is_customer = Party.staff in sides, Party.customer in sides
        events = service.events_of(session, order)
        thread = messages.messages_of(session, order)
        names = service.user_names(session, (e.actor_id for e in events))
        all_quotes = quotes.quotes_of(session, order)
        current = quotes.current_quote(session, order)
        rating = ratings.rating_of(session, order)
        sample_rows = samples.samples_with_events(session, order)
        result_rows = results.results_for(session, order, staff=is_staff)
        sample_actors = samples.sample_actor_names(session, sample_rows)
        result_uploaders = results.result_uploaders(session, result_rows)
        steps = []
        for target in service.allowed_transitions(order, sides, include_via=False):
            step = service.step_for(order, OrderStatus(target))
            steps.append({"to": target, "label": action_label(order, target),
                          "needs_comment": bool(step and step.needs_comment),
                          "danger": target in (S.cancelled.value, S.rejected.value)})
        # Staff see whether the customer's talent card puts a consultation ahead of the queue.
        fast_track = is_staff and bool(talent.fast_tracked_orders(session, [order], service.facility_today()))
    context.setdefault("error", None)
    context.setdefault("error_form", None)
    context.setdefault("error_field", None)
    context.setdefault("quote_form", _quote_form(current))
    context.setdefault("comment", "")
    context.setdefault("message_body", "")
    context.setdefault("rating_form", {"score": "", "comment": ""})
    today = service.facility_today()
    return render(
        request, "orders/order.html", status_code, page_path=f"/orders/{order_id}", order=order,
        is_staff=is_staff, is_customer=is_customer, events=events, names=names, thread=thread,
        quotes=all_quotes, current_quote=current,
        quote_expired=current is not None and current.status == QuoteStatus.offered
        and quotes.is_expired(current, today),
        quote_status_label=lambda s: _(QUOTE_STATUS_LABELS[QuoteStatus(s)]), rating=rating,
        can_rate=is_customer and ratings.may_rate(order, rating),
        may_quote=is_staff and quotes.may_quote(order),
        may_decide=is_customer and quotes.may_decide(order, current), fast_track=fast_track,
        steps=steps, progress=_progress(order.status, order.held_from, events), samples=sample_rows,
        results=result_rows, sample_actors=sample_actors, result_uploaders=result_uploaders, **context,
    )


@router.get("/orders/{order_id}", response_class=HTMLResponse)
def order_page(order_id: Id, request: Request, db: Annotated[Database, Depends(request_db)]) -> HTMLResponse:
    """One order: progress, timeline, quote, samples, results, messages and the actions the user may take."""
    return _order_page(request, db, require_actor(request), order_id)


def _back(order_id: int, anchor: str = "") -> str:
    return f"/orders/{order_id}" + (f"#{anchor}" if anchor else "")


def _refused(order_id: int, exc: DomainError, anchor: str = "") -> Response:
    return redirect(_back(order_id, anchor), flash=error_message(exc), kind="error")


@router.post("/orders/{order_id}/transitions", response_model=None)
def move_order(
    order_id: Id, request: Request, db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "", to: Annotated[str, Form(max_length=32)] = "",
    comment: Annotated[str, Form()] = "", expected_version: Annotated[str, Form()] = "",
) -> Response:
    """Take one step of the order's life (submit, cancel, start work, ...) with an optional comment."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    version = form_version(expected_version)
    try:
        with db.unit_of_work() as session:
            order = service.transition(session, actor, order_id, to, comment=comment, expected_version=version)
            text = _("Order %(number)s: %(status)s.") % {"number": order.number, "status": status_label(order.status)}
    except InvalidInput as exc:
        return _order_page(request, db, actor, order_id, 422, error=error_message(exc), error_form="transition",
                           error_field=exc.field, comment=comment)
    except (Conflict, Forbidden) as exc:
        return _refused(order_id, exc)
    return redirect(_back(order_id), flash=text)


@router.post("/orders/{order_id}/quotes", response_model=None)
def issue_quote(
    order_id: Id, request: Request, db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    line_description: Annotated[list[str] | None, Form()] = None,
    line_quantity: Annotated[list[str] | None, Form()] = None,
    line_price: Annotated[list[str] | None, Form()] = None,
    valid_until: Annotated[str, Form()] = "", note: Annotated[str, Form()] = "",
    expected_version: Annotated[str, Form()] = "",
) -> Response:
    """Offer a quote (staff) from the rows of the quote form; blank rows are skipped, prices are in yuan."""
    actor = require_actor(request)
    roles.require_some(actor, Action.manage_facility_orders)
    check_csrf(request, csrf_token)
    descriptions, quantities, prices = line_description or [], line_quantity or [], line_price or []
    rows = max(len(descriptions), len(quantities), len(prices))
    typed = [{"description": descriptions[i] if i < len(descriptions) else "",
              "quantity": quantities[i] if i < len(quantities) else "",
              "price": prices[i] if i < len(prices) else ""} for i in range(rows)]
    form = {"lines": typed + [{"description": "", "quantity": "", "price": ""}] * max(0, QUOTE_FORM_ROWS - rows),
            "valid_until": valid_until, "note": note}
    version = form_version(expected_version)
    try:
        lines = []
        for i, row in enumerate(typed):
            if not any(v.strip() for v in row.values()):
                continue
            lines.append(quotes.LineIn(row["description"], parse_int(row["quantity"], f"lines.{i}.quantity"),
                                       parse_yuan(row["price"], f"lines.{i}.unit_price_fen")))
        day = parse_day(valid_until, "valid_until")
        if day is None:
            raise InvalidInput("Give the last day the quote is valid.", field="valid_until", code="missing_field")
        with db.unit_of_work() as session:
            quote = quotes.issue_quote(session, actor, order_id, lines, day, note, expected_version=version)
            text = _("Quote version %(version)s sent: %(total)s.") % {
                "version": quote.version, "total": yuan(quote.total_fen)}
    except InvalidInput as exc:
        return _order_page(request, db, actor, order_id, 422, error=error_message(exc), error_form="quote",
                           error_field=exc.field, quote_form=form)
    except Conflict as exc:
        return _refused(order_id, exc, "quote")
    return redirect(_back(order_id, "quote"), flash=text)


@router.post("/orders/{order_id}/quotes/{quote_id}/accept", response_model=None)
def accept_quote(
    order_id: Id, quote_id: Id, request: Request, db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Accept the quote on offer (the order's user)."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    try:
        with db.unit_of_work() as session:
            quote = quotes.accept_quote(session, actor, order_id, quote_id)
            text = _("Quote version %(version)s accepted. The facility will tell you how to send the samples.") % {
                "version": quote.version}
    except (Conflict, Forbidden) as exc:
        return _refused(order_id, exc, "quote")
    return redirect(_back(order_id, "quote"), flash=text)


@router.post("/orders/{order_id}/quotes/{quote_id}/decline", response_model=None)
def decline_quote(
    order_id: Id, quote_id: Id, request: Request, db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "", reason: Annotated[str, Form()] = "",
) -> Response:
    """Decline the quote on offer (the order's user); the facility may send another."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    try:
        with db.unit_of_work() as session:
            quotes.decline_quote(session, actor, order_id, quote_id, reason)
    except InvalidInput as exc:
        return _order_page(request, db, actor, order_id, 422, error=error_message(exc), error_form="decline",
                           error_field=exc.field)
    except (Conflict, Forbidden) as exc:
        return _refused(order_id, exc, "quote")
    return redirect(_back(order_id, "quote"), flash=_("Quote declined. The facility may send a new one."))


@router.post("/orders/{order_id}/messages", response_model=None)
def post_message(
    order_id: Id, request: Request, db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "", body: Annotated[str, Form()] = "",
) -> Response:
    """Write to the order's thread; the other side is e-mailed."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    try:
        with db.unit_of_work() as session:
            messages.post_message(session, actor, order_id, body)
    except InvalidInput as exc:
        return _order_page(request, db, actor, order_id, 422, error=error_message(exc), error_form="message",
                           error_field=exc.field, message_body=body)
    return redirect(_back(order_id, "messages"), flash=_("Message sent."))


@router.post("/orders/{order_id}/rating", response_model=None)
def rate_order(
    order_id: Id, request: Request, db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "", score: Annotated[str, Form()] = "",
    comment: Annotated[str, Form()] = "",
) -> Response:
    """Rate the closed order (its user, once)."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    try:
        value = parse_int(score, "score") if score.strip() else 0
        with db.unit_of_work() as session:
            ratings.rate_order(session, actor, order_id, value, comment)
    except InvalidInput as exc:
        return _order_page(request, db, actor, order_id, 422, error=error_message(exc), error_form="rating",
                           error_field=exc.field, rating_form={"score": score, "comment": comment})
    except (Conflict, Forbidden) as exc:
        return _refused(order_id, exc, "rating")
    return redirect(_back(order_id, "rating"), flash=_("Thank you for your rating."))
