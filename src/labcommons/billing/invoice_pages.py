"""Invoice and settlement pages: my invoices, one invoice with its downloads, the settlement report."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, Response

from labcommons.billing import accounts, invoices
from labcommons.billing.models import InvoiceStatus
from labcommons.billing.settlement import REGION_AUTHORITY, settlement_report
from labcommons.db import MAX_ID, Database, utcnow
from labcommons.errors import Conflict, InvalidInput
from labcommons.http import Id, request_db
from labcommons.i18n import gettext_ as _
from labcommons.identity import roles
from labcommons.identity.roles import Action
from labcommons.pages import N_, check_csrf, redirect, render, require_actor

router = APIRouter(include_in_schema=False)

STATUS_LABELS = {InvoiceStatus.issued: N_("Open"), InvoiceStatus.paid: N_("Paid")}
UNIT_LABELS = {"hour": N_("h"), "sample": N_("samples"), "project": N_("projects")}


def status_label(status: InvoiceStatus | str) -> str:
    return _(STATUS_LABELS[InvoiceStatus(status)])


@router.get("/billing/invoices", response_class=HTMLResponse)
def invoices_page(request: Request, db: Annotated[Database, Depends(request_db)],
                  account: Annotated[str, Query(max_length=20)] = "") -> HTMLResponse:
    """My invoices: those of accounts I own, administer or am a member of, optionally of one account."""
    actor = require_actor(request)
    digits = account.isascii() and account.isdigit() and len(account) <= 10
    account_id = int(account) if digits and int(account) <= MAX_ID else None
    with db.unit_of_work(write=False) as session:
        visible = invoices.visible_account_ids(session, actor)
        rows = invoices.my_invoices(session, actor, account_id=account_id)
        codes = invoices.account_codes(session, visible)
    return render(request, "billing/invoices.html", invoices=rows, account_codes=codes, account_id=account_id,
                  status_label=status_label, period=invoices.previous_period(utcnow()))


@router.get("/billing/invoices/{invoice_id}", response_class=HTMLResponse)
def invoice_page(invoice_id: Id, request: Request, db: Annotated[Database, Depends(request_db)]) -> HTMLResponse:
    """One invoice: its lines and totals, downloads, and "mark paid" for the paying institution's administrator."""
    actor = require_actor(request)
    with db.unit_of_work(write=False) as session:
        row = invoices.visible_invoice(session, actor, invoice_id)
        view = invoices.invoice_view(session, row)
        may_pay = row.status == InvoiceStatus.issued and invoices.may_mark_paid(
            actor, accounts.get_account(session, row.account_id))
    return render(request, "billing/invoice.html", invoice=view, may_pay=may_pay, status_label=status_label,
                  unit_labels=UNIT_LABELS)


@router.post("/billing/invoices/{invoice_id}/pay")
def pay_invoice_page(invoice_id: Id, request: Request, db: Annotated[Database, Depends(request_db)],
                     csrf_token: Annotated[str, Form()] = "") -> Response:
    """Mark the invoice paid; back to it with a flash."""
    actor = require_actor(request)
    roles.require_some(actor, Action.manage_institution_accounts)
    check_csrf(request, csrf_token)
    try:
        with db.unit_of_work() as session:
            row = invoices.mark_paid(session, actor, invoice_id)
    except Conflict:
        return redirect(f"/billing/invoices/{invoice_id}", flash=_("This invoice is already marked paid."),
                        kind="error")
    return redirect(f"/billing/invoices/{invoice_id}", flash=_("Invoice %(number)s is marked paid.")
                    % {"number": row.number})


@router.get("/billing/settlement", response_class=HTMLResponse)
def settlement_page(request: Request, db: Annotated[Database, Depends(request_db)],
                    period: Annotated[str, Query(max_length=20)] = "") -> HTMLResponse:
    """The settlement report of a month (the last one that ended, unless chosen) with its downloads."""
    actor = require_actor(request)
    roles.require_some(actor, Action.view_settlement)
    chosen = period.strip() or invoices.previous_period(utcnow())
    error = None
    report = None
    try:
        with db.unit_of_work(write=False) as session:
            report = settlement_report(session, chosen, actor=actor)
    except InvalidInput:
        error = _("Choose a month, written YYYY-MM.")
    return render(request, "billing/settlement.html", status_code=422 if error else 200, report=report,
                  period=chosen, error=error, region_authority=REGION_AUTHORITY)
