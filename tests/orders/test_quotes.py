"""Quotes: versions and supersession, exact totals in fen, validation, expiry, accept and decline, immutability
enforced by the database, and the automatic quote of fixed-price services; on both databases."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from labcommons.catalog.models import PriceUnit
from labcommons.errors import DomainError, Forbidden, InvalidInput, NotFound
from labcommons.orders import quotes, service
from labcommons.orders.models import OrderStatus, Quote, QuoteLine, QuoteStatus
from labcommons.orders.quotes import LineIn
from tests.factories import World, grant
from tests.orders.order_support import add_service, events_of, far_day, new_order, status_of

S = OrderStatus


def quote(world: World, order_id: int, lines: list[tuple[str, int, int]], **kw: object) -> Quote:
    staff = grant(world, "alice")
    with world.db.unit_of_work() as s:
        return quotes.issue_quote(s, staff, order_id, lines, kw.pop("valid_until", far_day()), **kw)  # type: ignore[arg-type]


def quote_rows(world: World, order_id: int) -> list[tuple[int, QuoteStatus, int]]:
    with world.db.unit_of_work(write=False) as s:
        return [(q.version, q.status, q.total_fen) for q in s.scalars(
            select(Quote).where(Quote.order_id == order_id).order_by(Quote.version))]


def test_versions_supersede_and_totals_are_exact(world: World) -> None:
    order_id = new_order(world, add_service(world), submit=True)
    first = quote(world, order_id, [("Library prep", 3, 33333), ("Shipping", 7, 1)], note="incl. VAT")
    assert first.version == 1 and first.total_fen == 3 * 33333 + 7
    assert [(x.position, x.amount_fen) for x in first.lines] == [(1, 99999), (2, 7)]
    assert status_of(world, order_id) == S.quoted
    second = quote(world, order_id, [("Library prep", 3, 30000)])
    assert second.version == 2 and second.total_fen == 90000
    assert quote_rows(world, order_id) == [(1, QuoteStatus.superseded, 100006), (2, QuoteStatus.offered, 90000)]
    # The new version is recorded as quoted → quoted, after submitted → quoted.
    assert [(e.from_status, e.to_status) for e in events_of(world, order_id)][-2:] == [
        (S.submitted, S.quoted), (S.quoted, S.quoted)]
    with world.db.unit_of_work(write=False) as s:
        current = quotes.current_quote(s, service.get_order(s, world.actors["bob"], order_id))
        assert current is not None and current.id == second.id and len(current.lines) == 1
    # The largest amounts stay exact integers (no float, no overflow).
    big = quote(world, order_id, [("Big", quotes.MAX_QUANTITY, quotes.MAX_UNIT_PRICE_FEN)] * quotes.MAX_LINES)
    assert big.total_fen == quotes.MAX_LINES * quotes.MAX_QUANTITY * quotes.MAX_UNIT_PRICE_FEN
    with world.db.unit_of_work(write=False) as s:
        stored = s.get(Quote, big.id)
        assert stored is not None and stored.total_fen == big.total_fen


@pytest.mark.parametrize(("lines", "field", "code"), [
    ([], "lines", "no_lines"),
    ([("x", 1, 1)] * (quotes.MAX_LINES + 1), "lines", "too_many_lines"),
    ([("  ", 1, 100)], "lines.0.description", "missing_field"),
    ([("x" * 301, 1, 100)], "lines.0.description", "too_long"),
    ([("ok", 1, 100), ("x", 0, 100)], "lines.1.quantity", "out_of_range"),
    ([("x", quotes.MAX_QUANTITY + 1, 100)], "lines.0.quantity", "out_of_range"),
    ([("x", 1, -1)], "lines.0.unit_price_fen", "out_of_range"),
    ([("x", 1, 12.5)], "lines.0.unit_price_fen", "out_of_range"),
    ([("x", True, 100)], "lines.0.quantity", "out_of_range"),
    ([("x", 1, quotes.MAX_UNIT_PRICE_FEN + 1)], "lines.0.unit_price_fen", "out_of_range"),
])
def test_bad_lines_are_refused_naming_the_field(world: World, lines: list[tuple[str, object, object]], field: str,
                                                code: str) -> None:
    order_id = new_order(world, add_service(world), submit=True)
    with pytest.raises(InvalidInput) as caught:
        quote(world, order_id, lines)  # type: ignore[arg-type]
    assert (caught.value.field, caught.value.code) == (field, code)
    assert quote_rows(world, order_id) == [] and status_of(world, order_id) == S.submitted


def test_validity_note_status_and_permission(world: World) -> None:
    order_id = new_order(world, add_service(world), submit=True)
    today = service.facility_today()
    for day, code in ((today - timedelta(days=1), "date_in_past"), (today + timedelta(days=400), "out_of_range")):
        with pytest.raises(InvalidInput) as caught:
            quote(world, order_id, [("x", 1, 1)], valid_until=day)
        assert (caught.value.field, caught.value.code) == ("valid_until", code)
    with pytest.raises(InvalidInput) as caught:
        quote(world, order_id, [("x", 1, 1)], note="n" * 2001)
    assert caught.value.field == "note"
    assert quote(world, order_id, [("x", 1, 1)], valid_until=today).valid_until == today
    # Plain users are refused before anything is looked up; staff of another facility see nothing.
    with pytest.raises(Forbidden), world.db.unit_of_work() as s:
        quotes.issue_quote(s, world.actors["bob"], order_id, [("x", 1, 1)], far_day())
    with pytest.raises(NotFound), world.db.unit_of_work() as s:
        quotes.issue_quote(s, grant(world, "carol", facility="SC-UNI"), order_id, [("x", 1, 1)], far_day())
    draft = new_order(world, add_service(world))
    with pytest.raises(DomainError) as refused:
        quote(world, draft, [("x", 1, 1)])
    assert refused.value.code == "illegal_transition" and refused.value.details["allowed"] == []


def test_accept_makes_the_order_accepted_and_only_the_offered_version_counts(world: World) -> None:
    order_id = new_order(world, add_service(world), submit=True)
    old = quote(world, order_id, [("Library prep", 2, 50000)])
    new = quote(world, order_id, [("Library prep", 2, 45000)])
    bob, alice = world.actors["bob"], grant(world, "alice")
    with pytest.raises(DomainError) as caught, world.db.unit_of_work() as s:
        quotes.accept_quote(s, bob, order_id, old.id)
    assert caught.value.status_code == 409 and caught.value.code == "quote_not_offered"
    with pytest.raises(Forbidden) as forbidden, world.db.unit_of_work() as s:
        quotes.accept_quote(s, alice, order_id, new.id)
    assert forbidden.value.code == "not_your_step"
    with pytest.raises(NotFound), world.db.unit_of_work() as s:
        quotes.accept_quote(s, world.actors["carol"], order_id, new.id)
    other_order = new_order(world, add_service(world), submit=True)
    with pytest.raises(NotFound), world.db.unit_of_work() as s:
        quotes.accept_quote(s, bob, other_order, new.id)
    with world.db.unit_of_work() as s:
        accepted = quotes.accept_quote(s, bob, order_id, new.id)
        assert accepted.status == QuoteStatus.accepted and accepted.decided_by_id == bob.user_id
    assert status_of(world, order_id) == S.accepted
    assert quote_rows(world, order_id) == [(1, QuoteStatus.superseded, 100000), (2, QuoteStatus.accepted, 90000)]
    # Accepted work is not re-quoted.
    with pytest.raises(DomainError) as again:
        quote(world, order_id, [("more", 1, 1)])
    assert again.value.code == "illegal_transition"


def test_an_expired_quote_cannot_be_accepted_but_can_be_declined(world: World) -> None:
    order_id = new_order(world, add_service(world), submit=True)
    today = service.facility_today()
    offered = quote(world, order_id, [("x", 1, 100)], valid_until=today)
    bob = world.actors["bob"]
    with pytest.raises(DomainError) as caught, world.db.unit_of_work() as s:
        quotes.accept_quote(s, bob, order_id, offered.id, today=today + timedelta(days=1))
    assert caught.value.status_code == 409 and caught.value.code == "quote_expired"
    assert caught.value.details["valid_until"] == today.isoformat()
    assert status_of(world, order_id) == S.quoted
    with world.db.unit_of_work() as s:
        declined = quotes.decline_quote(s, bob, order_id, offered.id, "  too expensive ")
        assert declined.status == QuoteStatus.declined and declined.decision_note == "too expensive"
    assert status_of(world, order_id) == S.submitted
    last = events_of(world, order_id)[-1]
    assert (last.from_status, last.to_status, last.comment) == (S.quoted, S.submitted, "too expensive")
    # Declined: a new version may be offered and accepted on its last valid day.
    again = quote(world, order_id, [("x", 1, 80)], valid_until=today)
    assert again.version == 2
    with world.db.unit_of_work() as s:
        quotes.accept_quote(s, bob, order_id, again.id, today=today)
    assert status_of(world, order_id) == S.accepted


def test_the_database_refuses_to_change_an_accepted_quote(world: World) -> None:
    order_id = new_order(world, add_service(world), submit=True)
    offered = quote(world, order_id, [("Library prep", 2, 50000)])
    with world.db.unit_of_work() as s:
        quotes.accept_quote(s, world.actors["bob"], order_id, offered.id)
    statements = [
        ("UPDATE quote SET total_fen = 1 WHERE id = :id", {}),
        ("UPDATE quote SET status = 'offered' WHERE id = :id", {}),
        ("UPDATE quote SET note = 'changed' WHERE id = :id", {}),
        ("UPDATE quote_line SET unit_price_fen = 1, amount_fen = 2 WHERE quote_id = :id", {}),
        ("INSERT INTO quote_line (quote_id, position, description, quantity, unit_price_fen, amount_fen) "
         "VALUES (:id, 9, 'extra', 1, 5, 5)", {}),
        ("DELETE FROM quote_line WHERE quote_id = :id", {}),
    ]
    for sql, extra in statements:
        with pytest.raises(DBAPIError) as caught, world.db.unit_of_work() as s:
            s.execute(text(sql), {"id": offered.id, **extra})
        assert "quote_frozen" in str(caught.value), sql
    with world.db.unit_of_work(write=False) as s:
        stored = s.get(Quote, offered.id)
        lines = list(s.scalars(select(QuoteLine).where(QuoteLine.quote_id == offered.id)))
        assert stored is not None and (stored.status, stored.total_fen, stored.note) == (
            QuoteStatus.accepted, 100000, "")
        assert [(x.unit_price_fen, x.amount_fen) for x in lines] == [(50000, 100000)]


def test_the_database_refuses_amounts_that_do_not_add_up(world: World) -> None:
    order_id = new_order(world, add_service(world), submit=True)
    offered = quote(world, order_id, [("x", 1, 100)])
    with pytest.raises(DBAPIError), world.db.unit_of_work() as s:
        s.add(QuoteLine(quote_id=offered.id, position=5, description="bad", quantity=2, unit_price_fen=100,
                        amount_fen=199))
        s.flush()


@pytest.mark.parametrize(("unit", "samples", "quantity"), [
    (PriceUnit.sample, 3, 3), (PriceUnit.sample, 0, 1), (PriceUnit.project, 5, 1),
])
def test_fixed_price_services_are_quoted_on_submission(world: World, unit: PriceUnit, samples: int,
                                                       quantity: int) -> None:
    service_id = add_service(world, price_fen=12_050, unit=unit)
    order_id = new_order(world, service_id, submit=True, sample_count=samples)
    assert status_of(world, order_id) == S.quoted
    last = events_of(world, order_id)[-1]
    assert (last.from_status, last.to_status, last.actor_id) == (S.submitted, S.quoted, None)
    assert last.comment == quotes.AUTO_QUOTE_COMMENT
    with world.db.unit_of_work(write=False) as s:
        [auto] = quotes.list_quotes(s, world.actors["bob"], order_id)
        assert (auto.version, auto.status, auto.created_by_id) == (1, QuoteStatus.offered, None)
        assert [(x.quantity, x.unit_price_fen) for x in auto.lines] == [(quantity, 12_050)]
        assert auto.total_fen == quantity * 12_050
        assert auto.lines[0].description == "单细胞测序 / Single-cell sequencing"
        assert auto.valid_until == service.facility_today() + timedelta(days=quotes.AUTO_QUOTE_DAYS)
    with world.db.unit_of_work() as s:
        quotes.accept_quote(s, world.actors["bob"], order_id, auto.id)
    assert status_of(world, order_id) == S.accepted


@pytest.mark.parametrize("price", [None, 5000])
def test_quote_on_request_and_hourly_services_wait_for_staff(world: World, price: int | None) -> None:
    service_id = add_service(world, price_fen=price, unit=PriceUnit.hour)
    order_id = new_order(world, service_id, submit=True)
    assert status_of(world, order_id) == S.submitted
    assert quote_rows(world, order_id) == []


def test_a_declined_auto_quote_is_not_offered_again(world: World) -> None:
    order_id = new_order(world, add_service(world, price_fen=100), submit=True)
    with world.db.unit_of_work(write=False) as s:
        [auto] = quotes.list_quotes(s, world.actors["bob"], order_id)
    with world.db.unit_of_work() as s:
        quotes.decline_quote(s, world.actors["bob"], order_id, auto.id, "need more samples")
    assert status_of(world, order_id) == S.submitted
    assert quote_rows(world, order_id) == [(1, QuoteStatus.declined, 200)]


def test_lines_given_as_line_objects() -> None:
    checked = quotes.validate_lines([LineIn(" a ", 2, 5), ("b", 1, 0)])
    assert checked == [LineIn("a", 2, 5), LineIn("b", 1, 0)] and quotes.total_fen(checked) == 10
