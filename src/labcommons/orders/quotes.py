"""Quotes of orders: staff offer priced versions, the user accepts or declines the current one; fixed-price
services are quoted automatically when the order is submitted. Money is integer fen throughout."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from labcommons.actor import Actor
from labcommons.catalog.models import PriceUnit, Service
from labcommons.db import utcnow
from labcommons.errors import Conflict, InvalidInput, NotFound
from labcommons.orders import service
from labcommons.orders.models import OrderStatus, Quote, QuoteLine, QuoteStatus, ServiceOrder
from labcommons.orders.service import IllegalTransition, NotYourStep, Party

S = OrderStatus
MAX_LINES = 50
MAX_QUANTITY = 1_000_000
# ¥100 million per unit; with the limits above a total stays far below the BIGINT range (no overflow anywhere).
MAX_UNIT_PRICE_FEN = 10_000_000_000
MAX_DESCRIPTION = 300
MAX_NOTE = 2000
# How long the automatic quote of a fixed-price service is valid.
AUTO_QUOTE_DAYS = 30
AUTO_QUOTE_COMMENT = "按目录价自动报价 / Quoted automatically at the list price"


class QuoteExpired(Conflict):
    code = "quote_expired"


class QuoteNotOffered(Conflict):
    """The quote is not the one on offer (superseded, declined, accepted or withdrawn)."""

    code = "quote_not_offered"


@dataclass(frozen=True)
class LineIn:
    """One line as given: what, how many, at what unit price (fen)."""

    description: str
    quantity: int
    unit_price_fen: int


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_lines(lines: Sequence[LineIn | tuple[str, int, int]]) -> list[LineIn]:
    """The lines checked and normalised; InvalidInput naming the line's field (e.g. lines.1.quantity)."""
    if not lines:
        raise InvalidInput("A quote needs at least one line.", field="lines", code="no_lines")
    if len(lines) > MAX_LINES:
        raise InvalidInput(f"A quote has at most {MAX_LINES} lines.", field="lines", code="too_many_lines")
    result = []
    for i, raw in enumerate(lines):
        line = raw if isinstance(raw, LineIn) else LineIn(*raw)
        description = (line.description or "").strip() if isinstance(line.description, str) else ""
        if not description:
            raise InvalidInput("Describe every line.", field=f"lines.{i}.description", code="missing_field")
        if len(description) > MAX_DESCRIPTION:
            raise InvalidInput(f"A line's description has at most {MAX_DESCRIPTION} characters.",
                               field=f"lines.{i}.description", code="too_long")
        if not _is_int(line.quantity) or not 0 < line.quantity <= MAX_QUANTITY:
            raise InvalidInput(f"The quantity must be a whole number from 1 to {MAX_QUANTITY}.",
                               field=f"lines.{i}.quantity", code="out_of_range", min=1, max=MAX_QUANTITY)
        if not _is_int(line.unit_price_fen) or not 0 <= line.unit_price_fen <= MAX_UNIT_PRICE_FEN:
            raise InvalidInput("The unit price must be a whole number of fen, 0 or more, within limits.",
                               field=f"lines.{i}.unit_price_fen", code="out_of_range", min=0,
                               max=MAX_UNIT_PRICE_FEN)
        result.append(LineIn(description, line.quantity, line.unit_price_fen))
    return result


def total_fen(lines: Iterable[LineIn]) -> int:
    """The exact total of the lines in fen (Python integers: no rounding, no overflow)."""
    return sum(line.quantity * line.unit_price_fen for line in lines)


# --- reading ---------------------------------------------------------------------------------------------------


def quotes_of(session: Session, order: ServiceOrder) -> list[Quote]:
    """Every quote of the order with its lines, newest version first."""
    return list(session.scalars(
        select(Quote).where(Quote.order_id == order.id).options(selectinload(Quote.lines))
        .order_by(Quote.version.desc()).execution_options(populate_existing=True)
    ))


def current_quote(session: Session, order: ServiceOrder) -> Quote | None:
    """The quote that counts now: the accepted one, else the one on offer, else None."""
    return session.scalars(
        select(Quote).where(Quote.order_id == order.id, Quote.status.in_([QuoteStatus.accepted, QuoteStatus.offered]))
        .options(selectinload(Quote.lines)).order_by(Quote.version.desc()).limit(1)
        .execution_options(populate_existing=True)
    ).first()


def list_quotes(session: Session, actor: Actor, order_id: int) -> list[Quote]:
    """The quotes of an order the actor may see (its user and the facility's staff)."""
    return quotes_of(session, service.get_order(session, actor, order_id))


def is_expired(quote: Quote, today: date | None = None) -> bool:
    """Whether an offered quote is past its last valid day (the facility's day)."""
    return quote.valid_until < (today or service.facility_today())


# Staff quote a submitted order, or replace the offer of a quoted one.
QUOTABLE = frozenset({S.submitted, S.quoted})


def may_quote(order: ServiceOrder) -> bool:
    """Whether the order's status lets staff send a (new) quote."""
    return order.status in QUOTABLE


def may_decide(order: ServiceOrder, quote: Quote | None) -> bool:
    """Whether the user can accept or decline `quote` now: it is on offer for a quoted order."""
    return order.status == S.quoted and quote is not None and quote.status == QuoteStatus.offered


# --- writing ---------------------------------------------------------------------------------------------------


def _insert_quote(session: Session, order: ServiceOrder, lines: list[LineIn], valid_until: date, note: str,
                  created_by_id: int | None) -> Quote:
    # The new version replaces the one on offer; the caller holds the order (row lock or serialised write).
    session.execute(
        update(Quote).where(Quote.order_id == order.id, Quote.status == QuoteStatus.offered)
        .values(status=QuoteStatus.superseded).execution_options(synchronize_session=False)
    )
    version = (session.scalar(select(func.max(Quote.version)).where(Quote.order_id == order.id)) or 0) + 1
    quote = Quote(order_id=order.id, version=version, status=QuoteStatus.offered, total_fen=total_fen(lines),
                  valid_until=valid_until, note=note, created_by_id=created_by_id, created_at=utcnow(),
                  decision_note="")
    session.add(quote)
    session.flush()
    rows = [
        QuoteLine(quote_id=quote.id, position=i + 1, description=line.description, quantity=line.quantity,
                  unit_price_fen=line.unit_price_fen, amount_fen=line.quantity * line.unit_price_fen)
        for i, line in enumerate(lines)
    ]
    session.add_all(rows)
    session.flush()
    set_committed_value(quote, "lines", rows)
    return quote


def issue_quote(
    session: Session,
    actor: Actor,
    order_id: int,
    lines: Sequence[LineIn | tuple[str, int, int]],
    valid_until: date,
    note: str = "",
    *,
    expected_version: int | None = None,
    today: date | None = None,
) -> Quote:
    """Offer a quote (staff): the first moves a submitted order to quoted, a later one replaces the offered
    version (recorded as quoted → quoted). 409 illegal_transition in other statuses."""
    order = service.get_order(session, actor, order_id, staff=True, for_update=True)
    sides = service.parties_of(actor, order)
    if not may_quote(order):
        raise IllegalTransition(
            f"An order that is {order.status.value} cannot be quoted.", field="to", status=order.status.value,
            allowed=service.allowed_transitions(order, sides, include_via=False),
        )
    checked = validate_lines(lines)
    today = today or service.facility_today()
    if not isinstance(valid_until, date) or valid_until < today:
        raise InvalidInput("The quote must be valid until today or later.", field="valid_until",
                           code="date_in_past")
    if valid_until > today + timedelta(days=366):
        raise InvalidInput("A quote is valid for a year at most.", field="valid_until", code="out_of_range")
    note = (note or "").strip()
    if len(note) > MAX_NOTE:
        raise InvalidInput(f"The note has at most {MAX_NOTE} characters.", field="note", code="too_long")
    quote = _insert_quote(session, order, checked, valid_until, note, actor.user_id)
    service.transition(session, actor, order.id, S.quoted, comment=note, expected_version=expected_version,
                       via="quote")
    return quote


def _offered_quote(session: Session, order: ServiceOrder, quote_id: int) -> Quote:
    quote = session.get(Quote, quote_id)
    if quote is None or quote.order_id != order.id:
        raise NotFound(f"Quote {quote_id} does not exist.", field="quote_id")
    if quote.status != QuoteStatus.offered:
        raise QuoteNotOffered(f"Quote version {quote.version} is {quote.status.value}, not on offer.",
                              field="quote_id", quote_status=quote.status.value)
    return quote


def _customer_order(session: Session, actor: Actor, order_id: int, what: str) -> ServiceOrder:
    order = service.get_order(session, actor, order_id, for_update=True)
    if Party.customer not in service.parties_of(actor, order):
        raise NotYourStep(f"Only the user who placed the order may {what} its quote.", field="quote_id",
                          status=order.status.value)
    return order


def _decide(session: Session, quote: Quote, status: QuoteStatus, actor: Actor, note: str = "") -> None:
    # Conditional, so of two decisions racing on one quote only one is recorded.
    result = session.execute(
        update(Quote).where(Quote.id == quote.id, Quote.status == QuoteStatus.offered)
        .values(status=status, decided_by_id=actor.user_id, decided_at=utcnow(), decision_note=note)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise QuoteNotOffered("Someone else decided this quote at the same moment; reload it.", field="quote_id")
    session.refresh(quote, ["status", "decided_by_id", "decided_at", "decision_note"])


def accept_quote(session: Session, actor: Actor, order_id: int, quote_id: int, *,
                 today: date | None = None) -> Quote:
    """The user accepts the quote on offer (not expired: valid_until ≥ the facility's today); the order becomes
    accepted and the quote can never change again (the database refuses it)."""
    order = _customer_order(session, actor, order_id, "accept")
    quote = _offered_quote(session, order, quote_id)
    if is_expired(quote, today):
        raise QuoteExpired(f"This quote was valid until {quote.valid_until.isoformat()}; ask for a new one.",
                           field="quote_id", valid_until=quote.valid_until.isoformat())
    service.transition(session, actor, order.id, S.accepted, via="accept_quote")
    _decide(session, quote, QuoteStatus.accepted, actor)
    from labcommons.billing import ledger  # billing reads quotes, so it imports this module

    ledger.quote_accepted(session, order, quote, now=utcnow())
    return quote


def decline_quote(session: Session, actor: Actor, order_id: int, quote_id: int, reason: str = "") -> Quote:
    """The user declines the quote on offer; the order goes back to submitted for a new quote."""
    order = _customer_order(session, actor, order_id, "decline")
    quote = _offered_quote(session, order, quote_id)
    reason = (reason or "").strip()
    if len(reason) > MAX_NOTE:
        raise InvalidInput(f"The reason has at most {MAX_NOTE} characters.", field="reason", code="too_long")
    service.transition(session, actor, order.id, S.submitted, comment=reason, via="decline_quote")
    _decide(session, quote, QuoteStatus.declined, actor, reason)
    return quote


def auto_quote(session: Session, order: ServiceOrder) -> Quote | None:
    """Quote a just-submitted order of a fixed-price service at its list price (actor: the platform).

    Per-sample prices are multiplied by the sample count (at least one), per-project prices count once; per-hour
    services are left to staff, who know how many hours the work takes.
    """
    from labcommons.billing import ledger  # billing reads quotes, so it imports this module

    svc = order.service
    # The rate card's price for the payer's category (own institution, academic, industry) beats the list price.
    price = ledger.order_unit_price(session, order)
    if price is None:
        price = svc.list_price_fen
    if price is None or order.status != S.submitted or svc.price_unit == PriceUnit.hour:
        return None
    quantity = max(1, order.sample_count) if svc.price_unit == PriceUnit.sample else 1
    name = svc.name_zh if not svc.name_en or svc.name_en == svc.name_zh else f"{svc.name_zh} / {svc.name_en}"
    line = LineIn(name[:MAX_DESCRIPTION], quantity, price)
    valid_until = service.facility_today() + timedelta(days=AUTO_QUOTE_DAYS)
    quote = _insert_quote(session, order, validate_lines([line]), valid_until, "", None)
    service.apply_transition(session, order, S.quoted, actor_id=None, comment=AUTO_QUOTE_COMMENT)
    return quote


def quote_agreed_price(session: Session, order: ServiceOrder, amount_fen: int, *, note: str,
                       created_by_id: int | None) -> Quote:
    """Quote a just-submitted order at a price its facility agreed beforehand (an accepted offer on a posted
    demand): one line for the whole work; the user accepts it as any quote, which holds it on their account."""
    if order.status != S.submitted:
        raise IllegalTransition(f"An order that is {order.status.value} cannot be quoted.", field="to",
                                status=order.status.value, allowed=[])
    svc = session.get(Service, order.service_id)
    assert svc is not None
    name = svc.name_zh if not svc.name_en or svc.name_en == svc.name_zh else f"{svc.name_zh} / {svc.name_en}"
    lines = validate_lines([LineIn(name[:MAX_DESCRIPTION], 1, amount_fen)])
    valid_until = service.facility_today() + timedelta(days=AUTO_QUOTE_DAYS)
    quote = _insert_quote(session, order, lines, valid_until, note[:MAX_NOTE], created_by_id)
    service.apply_transition(session, order, S.quoted, actor_id=created_by_id, comment=note[:MAX_NOTE])
    return quote


def withdraw_offered(session: Session, order: ServiceOrder) -> int:
    """Withdraw the quote on offer (the order was cancelled or rejected); how many were."""
    result = session.execute(
        update(Quote).where(Quote.order_id == order.id, Quote.status == QuoteStatus.offered)
        .values(status=QuoteStatus.withdrawn, decided_at=utcnow()).execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
