"""Two invoice runs at once on PostgreSQL, each in its own thread and session: every account gets exactly one
invoice and every charge one line, whoever wins. (SQLite serialises writers outright.)"""

from __future__ import annotations

from functools import partial

import pytest
from sqlalchemy import func, select

from labcommons.billing import invoices
from labcommons.billing.models import Charge, Invoice, InvoiceLine
from tests.billing.invoice_support import AFTER_NOV, ledger_world
from tests.factories import World
from tests.orders.order_support import at_once

ROUNDS = 5


@pytest.fixture
def pg_world(world: World) -> World:
    if world.db.is_sqlite:
        pytest.skip("SQLite serialises write transactions; the race needs PostgreSQL")
    return world


def _run(world: World, period: str) -> list[str]:
    with world.db.unit_of_work() as s:
        return [i.number for i in invoices.generate_invoices(s, period, now=AFTER_NOV)]


def test_concurrent_runs_make_one_invoice_per_account(pg_world: World) -> None:
    ledger_world(pg_world)
    for period in ("2026-10", "2026-11"):
        for _ in range(ROUNDS):
            outcomes = at_once(partial(_run, pg_world, period), partial(_run, pg_world, period))
            assert not [o for o in outcomes if isinstance(o, Exception)], outcomes
        with pg_world.db.unit_of_work(write=False) as s:
            numbers = list(s.scalars(select(Invoice.number).where(Invoice.period == period)))
            assert len(numbers) == len(set(numbers)) == (3 if period == "2026-10" else 1)
    with pg_world.db.unit_of_work(write=False) as s:
        assert s.scalar(select(func.count()).select_from(InvoiceLine)) == s.scalar(
            select(func.count()).select_from(Charge))
        for invoice in s.scalars(select(Invoice)):
            lines = s.scalar(select(func.sum(InvoiceLine.amount_fen)).where(InvoiceLine.invoice_id == invoice.id))
            assert lines == invoice.total_fen


def test_a_losing_insert_leaves_no_half_invoice(pg_world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = ledger_world(pg_world)
    # Without the account lock, another run commits the invoice after this one has looked and before it inserts:
    # the insert collides inside its savepoint, and this transaction goes on as if it had found the invoice.
    monkeypatch.setattr(invoices.accounts, "get_account", lambda *a, **k: None)
    original = invoices.parts_of
    interleaved: list[str] = []

    def other_run_first(session: object, charge_ids: list[int]) -> object:
        if not interleaved:
            interleaved.append("other")
            with pg_world.db.unit_of_work() as other:
                made = invoices.invoice_account(other, ids["grant"], "2026-10", now=AFTER_NOV)
                assert made is not None
        return original(session, charge_ids)

    monkeypatch.setattr(invoices, "parts_of", other_run_first)
    with pg_world.db.unit_of_work() as s:
        assert invoices.invoice_account(s, ids["grant"], "2026-10", now=AFTER_NOV) is None
        assert s.scalar(select(func.count()).select_from(Invoice)) == 1  # the transaction is still usable
    with pg_world.db.unit_of_work(write=False) as s:
        (invoice,) = s.scalars(select(Invoice))
        lines = list(s.scalars(select(InvoiceLine).where(InvoiceLine.invoice_id == invoice.id)))
        assert [line.charge_id for line in lines] == [ids["g1"], ids["g2"]]
        assert s.scalar(select(func.count()).select_from(InvoiceLine)) == 2
