"""The demo's month of billing: charged through the ledger, balanced to the fen, invoiced, and seeded only once."""

from __future__ import annotations

from sqlalchemy import func, select

from labcommons.billing import demo as billing_demo
from labcommons.billing import invoices
from labcommons.billing.models import (
    AccountDeposit,
    BillingAccount,
    BillingHold,
    BillingPolicy,
    Charge,
    Invoice,
    InvoiceLine,
    Payment,
    Rate,
    Voucher,
    VoucherRedemption,
)
from labcommons.billing.talent import seed_talent
from labcommons.booking.models import Booking
from labcommons.catalog import demo
from labcommons.db import Database, utcnow
from labcommons.orders.demo import seed_orders
from tests.billing.billing_support import check_ledger

COUNTED = (BillingPolicy, Rate, BillingAccount, AccountDeposit, Voucher, Booking, BillingHold, Charge, Payment,
           VoucherRedemption, Invoice, InvoiceLine)


def _counts(db: Database) -> dict[str, int]:
    with db.unit_of_work(write=False) as s:
        return {model.__name__: int(s.scalar(select(func.count()).select_from(model)) or 0) for model in COUNTED}


def test_demo_month_balances_is_invoiced_and_seeds_once(db: Database) -> None:
    now = utcnow()
    with db.unit_of_work() as s:
        demo.seed_demo(s, bookings=0)
        seed_orders(s)
        seed_talent(s)
        seeded = billing_demo.seed_billing(s, now=now)
    assert seeded.accounts == 2 and len(seeded.invoices) == 2
    period = invoices.previous_period(now)
    start, end = invoices.period_bounds(period)

    with db.unit_of_work(write=False) as s:
        check_ledger(s)
        charged = int(s.scalar(select(func.sum(Charge.amount_fen))) or 0)
        paid = int(s.scalar(select(func.sum(Payment.amount_fen))) or 0)
        redeemed = int(s.scalar(select(func.sum(VoucherRedemption.amount_fen))) or 0)
        assert charged == paid + redeemed and redeemed > 0
        # Every charge is last month's, and every one is on last month's invoices.
        for charge in s.scalars(select(Charge)):
            assert start <= charge.posted_at < end, charge.description
        assert s.scalar(select(func.count()).select_from(InvoiceLine)) == s.scalar(
            select(func.count()).select_from(Charge))
        assert s.scalar(select(func.count()).where(Charge.reverses_id.is_not(None))) == 1  # the correction
        assert any("no-show" in c.description for c in s.scalars(select(Charge)))

        company = s.scalars(select(BillingAccount).where(BillingAccount.code == billing_demo.COMPANY_CODE)).one()
        invoice = s.scalars(select(Invoice).where(Invoice.account_id == company.id)).one()
        assert invoice.period == period
        assert invoice.voucher_fen > 0 and invoice.prepaid_fen > 0
        assert invoice.total_fen == invoice.voucher_fen + invoice.prepaid_fen + invoice.due_fen
        view = invoices.invoice_view(s, invoice)
        assert sum(line.amount_fen for line in view.lines) == invoice.total_fen
        grant = s.scalars(select(BillingAccount).where(BillingAccount.code == billing_demo.GRANT_CODE)).one()
        grant_invoice = s.scalars(select(Invoice).where(Invoice.account_id == grant.id)).one()
        assert grant_invoice.due_fen == grant_invoice.total_fen > 0  # a grant is billed, not prepaid
        assert s.scalar(select(func.count()).select_from(BillingHold).where(BillingHold.released_at.is_(None))) == 0

    before = _counts(db)
    with db.unit_of_work() as s:
        again = billing_demo.seed_billing(s, now=now)
    assert again.accounts == 0 and again.invoices == []
    assert _counts(db) == before
