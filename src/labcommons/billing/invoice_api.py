"""Invoice, statement, settlement and charge-export endpoints under /api/v1/billing.

Reads need the token scope `billing:read`, writes `billing:write`. Documents download as attachments (PDF, XLSX,
CSV); the charge export streams.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.billing import exports, invoices
from labcommons.billing.invoices import InvoiceView, LineView
from labcommons.billing.models import Invoice, InvoiceStatus
from labcommons.billing.settlement import SettlementReport, SettlementRow, settlement_report
from labcommons.db import MAX_ID, Database
from labcommons.http import Day, Db, Id, IdempotencyKey, idempotent_post, require_role_for, require_scope
from labcommons.idempotency import Outcome
from labcommons.identity.roles import Action

router = APIRouter(tags=["billing"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API token"},
    403: {"description": "Your roles do not allow this, or the token lacks the scope (`insufficient_scope`)"},
    404: {"description": "Unknown invoice or account, or not yours to see"},
    409: {"description": "Conflicts with the current state: `already_paid`, `ledger_unbalanced`"},
    422: {"description": "Invalid input; `field` names it (`invalid_period`, `period_not_ended`, `invalid_range`)"},
}
Reader = Annotated[Actor, Depends(require_scope("billing:read"))]
Writer = Annotated[Actor, Depends(require_scope("billing:write"))]
Period = Annotated[str, Query(max_length=7, description="A month, YYYY-MM (platform time zone)",
                              examples=["2026-11"])]


SettlementReader = Annotated[Actor, Depends(require_role_for("billing:read", Action.view_settlement))]
AccountsAdmin = Annotated[Actor, Depends(require_role_for("billing:write", Action.manage_institution_accounts))]


# --- schemas ----------------------------------------------------------------------------------------------------


class InvoiceRead(BaseModel):
    id: int
    number: str
    account_id: int
    period: str
    status: InvoiceStatus
    total_fen: int
    voucher_fen: int
    prepaid_fen: int
    due_fen: int
    issued_at: datetime
    paid_at: datetime | None
    pdf_url: str
    xlsx_url: str

    @classmethod
    def of(cls, row: Invoice) -> InvoiceRead:
        base = f"/api/v1/billing/invoices/{row.id}"
        return cls(id=row.id, number=row.number, account_id=row.account_id, period=row.period, status=row.status,
                   total_fen=row.total_fen, voucher_fen=row.voucher_fen, prepaid_fen=row.prepaid_fen,
                   due_fen=row.due_fen, issued_at=row.issued_at, paid_at=row.paid_at, pdf_url=f"{base}.pdf",
                   xlsx_url=f"{base}.xlsx")


class InvoiceDetail(InvoiceRead):
    account_code: str
    account_name: str
    payer_institution: str
    # The service's line type: quantity_text is hours with two decimals for hourly charges, the count otherwise.
    lines: list[LineView]

    @classmethod
    def of_view(cls, row: Invoice, view: InvoiceView) -> InvoiceDetail:
        return cls(**InvoiceRead.of(row).model_dump(), account_code=view.account.code,
                   account_name=view.account.name, payer_institution=view.account.institution_code,
                   lines=view.lines)


class InvoiceList(BaseModel):
    items: list[InvoiceRead]


class InvoiceGenerate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    period: str = Field(max_length=7, description="The month to invoice, YYYY-MM", examples=["2026-11"])
    account_id: int | None = Field(default=None, ge=1, le=MAX_ID, description=(
        "Only this account (institution admins must name one of their institution's accounts)"))
    allow_open: bool = Field(default=False, description="Invoice a month that has not ended yet")


class SettlementRowRead(BaseModel):
    debtor_kind: Literal["institution", "region_authority"]
    debtor: str
    debtor_name_zh: str
    debtor_name_en: str
    debtor_region: str
    creditor_institution: str
    creditor_name_zh: str
    creditor_name_en: str
    creditor_region: str
    amount_fen: int

    @classmethod
    def of(cls, row: SettlementRow) -> SettlementRowRead:
        return cls(debtor_kind=row.debtor_kind, debtor=row.debtor_code,
                   debtor_name_zh=row.debtor_name_zh, debtor_name_en=row.debtor_name_en,
                   debtor_region=row.debtor_region, creditor_institution=row.creditor_code,
                   creditor_name_zh=row.creditor_name_zh, creditor_name_en=row.creditor_name_en,
                   creditor_region=row.creditor_region, amount_fen=row.amount_fen)


class SettlementRead(BaseModel):
    period: str
    rows: list[SettlementRowRead]
    regions: list[str]
    matrix: dict[str, dict[str, int]] = Field(description="matrix[debtor region][creditor region] in fen")
    account_fen: int
    voucher_fen: int
    total_fen: int
    complete: bool = Field(description="Whether every row is shown (platform administrators)")
    charges_fen: int | None = Field(description="The sum of the period's charges; equals total_fen when complete")

    @classmethod
    def of(cls, report: SettlementReport) -> SettlementRead:
        return cls(period=report.period, rows=[SettlementRowRead.of(r) for r in report.rows], regions=report.regions,
                   matrix=report.matrix, account_fen=report.account_fen, voucher_fen=report.voucher_fen,
                   total_fen=report.total_fen, complete=report.complete, charges_fen=report.charges_fen)


# --- downloads --------------------------------------------------------------------------------------------------


def disposition(filename: str) -> str:
    """An attachment header with an ASCII fallback name and the RFC 5987 UTF-8 one."""
    ascii_name = "".join(c if c.isascii() and c.isprintable() and c not in '"\\;' else "_" for c in filename)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"


def attachment(content: bytes, media_type: str, filename: str) -> Response:
    return Response(content, media_type=media_type, headers={
        "Content-Disposition": disposition(filename), "Cache-Control": "private, no-cache",
        "X-Content-Type-Options": "nosniff",
    })


MEDIA = {"pdf": exports.PDF_TYPE, "xlsx": exports.XLSX_TYPE, "csv": exports.CSV_TYPE}
DOWNLOAD = {200: {"description": "The document", "content": {t: {} for t in MEDIA.values()}}, **ERRORS}


def invoice_file(view: InvoiceView, fmt: Literal["pdf", "xlsx"]) -> Response:
    """The invoice as a PDF or XLSX attachment named after its number."""
    content = exports.invoice_pdf(view) if fmt == "pdf" else exports.invoice_xlsx(view)
    return attachment(content, MEDIA[fmt], f"{view.number}.{fmt}")


def statement_file(view: invoices.StatementView, fmt: Literal["pdf", "xlsx"]) -> Response:
    content = exports.statement_pdf(view) if fmt == "pdf" else exports.statement_xlsx(view)
    return attachment(content, MEDIA[fmt], f"statement-{view.account.code}-{view.period}.{fmt}")


def settlement_file(report: SettlementReport, fmt: Literal["pdf", "xlsx", "csv"]) -> Response:
    if fmt == "pdf":
        content = exports.settlement_pdf(report)
    elif fmt == "xlsx":
        content = exports.settlement_xlsx(report)
    else:
        content = exports.settlement_csv(report)
    return attachment(content, MEDIA[fmt], f"settlement-{report.period}.{fmt}")


def charges_response(db: Database, scope: exports.ChargeScope, first: date, last: date) -> StreamingResponse:
    return StreamingResponse(exports.charges_csv_stream(db, scope), media_type=exports.CSV_TYPE, headers={
        "Content-Disposition": disposition(f"charges-{first.isoformat()}-{last.isoformat()}.csv"),
        "Cache-Control": "private, no-cache",
    })


# --- routes: invoices -------------------------------------------------------------------------------------------


@router.get("/billing/invoices", response_model=InvoiceList, responses=ERRORS)
def list_invoices(actor: Reader, db: Db, account_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
                  status: InvoiceStatus | None = None) -> InvoiceList:
    """Invoices of the accounts you own, administer or are an approved member of; newest month first."""
    with db.unit_of_work(write=False) as session:
        rows = invoices.my_invoices(session, actor, account_id=account_id, status=status)
        return InvoiceList(items=[InvoiceRead.of(r) for r in rows])


@router.post("/billing/invoices/generate", status_code=201, response_model=InvoiceList, responses=ERRORS)
def generate_invoices(body: InvoiceGenerate, request: Request, actor: AccountsAdmin, db: Db,
                      idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Invoice a month that has ended: one invoice per account with un-invoiced charges. Running it again makes
    nothing new (an empty list). Platform administrators, or an institution's administrator for one account."""

    def work(session: Session) -> Outcome:
        made = invoices.generate_as(session, actor, body.period, account_id=body.account_id,
                                    allow_open=body.allow_open)
        return Outcome(201, InvoiceList(items=[InvoiceRead.of(i) for i in made]).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.get("/billing/invoices/{invoice_id}.{fmt}", response_class=Response, responses=DOWNLOAD)
def download_invoice(invoice_id: Id, fmt: Literal["pdf", "xlsx"], actor: Reader, db: Db) -> Response:
    """The invoice as PDF (bilingual headings) or XLSX (yuan with two decimals and a fen column)."""
    with db.unit_of_work(write=False) as session:
        row = invoices.visible_invoice(session, actor, invoice_id)
        view = invoices.invoice_view(session, row)
    return invoice_file(view, fmt)


@router.get("/billing/invoices/{invoice_id}", response_model=InvoiceDetail, responses=ERRORS)
def get_invoice(invoice_id: Id, actor: Reader, db: Db) -> InvoiceDetail:
    """One invoice with its lines: what, when, where, the price, the discount and who paid which part."""
    with db.unit_of_work(write=False) as session:
        row = invoices.visible_invoice(session, actor, invoice_id)
        return InvoiceDetail.of_view(row, invoices.invoice_view(session, row))


@router.post("/billing/invoices/{invoice_id}/pay", response_model=InvoiceRead, responses=ERRORS)
def pay_invoice(invoice_id: Id, request: Request, actor: AccountsAdmin, db: Db,
                idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Mark an invoice paid, as the paying institution's administrator (or a platform administrator)."""

    def work(session: Session) -> Outcome:
        return Outcome(200, InvoiceRead.of(invoices.mark_paid(session, actor, invoice_id)).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, {}, work)


# --- routes: statements, charges, settlement --------------------------------------------------------------------


@router.get("/billing/statements/{account_id}/{period}.{fmt}", response_class=Response, responses=DOWNLOAD)
def download_statement(account_id: Id, period: Annotated[str, Path(max_length=7)], fmt: Literal["pdf", "xlsx"],
                       actor: Reader, db: Db) -> Response:
    """An account's statement for a month: its charges, deposits, prepaid balances and vouchers."""
    with db.unit_of_work(write=False) as session:
        view = invoices.visible_statement(session, actor, account_id, period)
    return statement_file(view, fmt)


@router.get("/billing/charges.csv", response_class=StreamingResponse, responses={
    200: {"description": "One row per payment part of each charge", "content": {exports.CSV_TYPE: {}}}, **ERRORS})
def export_charges(
    actor: Reader, db: Db,
    first: Annotated[Day, Query(alias="from", description="First day (platform time zone)")],
    last: Annotated[Day, Query(alias="to", description="Last day, included")],
    account_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    facility_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    institution_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> StreamingResponse:
    """The charges posted in [from, to] as CSV for finance systems, streamed: an account's (its owner), a
    facility's (its staff), an institution's as payer or provider (its administrator), or all (platform
    administrators)."""
    with db.unit_of_work(write=False) as session:
        scope = exports.charge_scope_for(session, actor, first=first, last=last, account_id=account_id,
                                         facility_id=facility_id, institution_id=institution_id)
    return charges_response(db, scope, first, last)


@router.get("/billing/settlement", response_model=SettlementRead, responses=ERRORS)
def get_settlement(actor: SettlementReader, db: Db, period: Period) -> SettlementRead:
    """Who owes whom for the month's charges: payer institutions for what accounts paid, region authorities for
    their vouchers. Institution admins see rows touching their institution, region authorities their region."""
    with db.unit_of_work(write=False) as session:
        return SettlementRead.of(settlement_report(session, period, actor=actor))


@router.get("/billing/settlement.{fmt}", response_class=Response, responses=DOWNLOAD)
def download_settlement(fmt: Literal["pdf", "xlsx", "csv"], actor: SettlementReader, db: Db,
                        period: Period) -> Response:
    """The settlement report as PDF, XLSX (with the region matrix) or CSV."""
    with db.unit_of_work(write=False) as session:
        report = settlement_report(session, period, actor=actor)
    return settlement_file(report, fmt)
