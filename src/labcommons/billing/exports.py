"""Invoices, statements and the settlement report as PDF and XLSX, the settlement report and the charge ledger as
CSV for finance systems.

Amounts are computed in integer fen; a spreadsheet gets yuan as Decimal with two places (never a float sum) and a
fen column beside them. PDFs have bilingual (zh-CN and English) headings; with no CJK font installed the Chinese
glyphs render as boxes but the document is still made.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from openpyxl import Workbook
from openpyxl.styles import Font
from openpyxl.worksheet.worksheet import Worksheet
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, aliased

from labcommons.actor import Actor
from labcommons.billing import accounts
from labcommons.billing.invoices import InvoiceView, LineView, StatementView, Totals, day_bounds
from labcommons.billing.models import BillingAccount, Charge, Payment, PaymentMethod, Voucher, VoucherRedemption
from labcommons.billing.settlement import SettlementReport
from labcommons.catalog.models import Facility, Institution
from labcommons.db import Database
from labcommons.errors import Forbidden, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity.roles import Action

XLSX_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
PDF_TYPE = "application/pdf"
CSV_TYPE = "text/csv; charset=utf-8"
MONEY_FORMAT = "#,##0.00"
BATCH = 500


def yuan_decimal(fen: int) -> Decimal:
    """Fen as yuan with exactly two decimal places, without floats."""
    return Decimal(fen).scaleb(-2).quantize(Decimal("0.01"))


def yuan_text(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    return f"{sign}{abs(fen) // 100:,}.{abs(fen) % 100:02d}"


def safe_cell(text: str) -> str:
    # A spreadsheet would run text starting with these as a formula (CSV injection); a leading apostrophe keeps it
    # text. Only free text gets this: numbers are written as numbers.
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


# --- PDF --------------------------------------------------------------------------------------------------------


def render_pdf(template: str, **context: Any) -> bytes:
    """An HTML template rendered by WeasyPrint into PDF bytes."""
    from weasyprint import HTML

    from labcommons.pages import env

    html = env.get_template(template).render(yuan=yuan_text, **context)
    pdf: bytes = HTML(string=html).write_pdf()
    return pdf


def invoice_pdf(view: InvoiceView) -> bytes:
    return render_pdf("billing/invoice_print.html", doc=view, kind="invoice")


def statement_pdf(view: StatementView) -> bytes:
    return render_pdf("billing/invoice_print.html", doc=view, kind="statement")


def settlement_pdf(report: SettlementReport) -> bytes:
    return render_pdf("billing/settlement_print.html", report=report)


# --- XLSX -------------------------------------------------------------------------------------------------------

LINE_HEADINGS = (
    "费用号 Charge", "服务日期 Service date", "摘要 Description", "平台 Facility", "提供方 Provider", "单位 Unit",
    "数量 Quantity", "单价 Unit price", "原价 List", "优惠 Discount", "优惠原因 Discount reason", "应收 Net",
    "创新券 Voucher", "券号 Voucher codes", "预付 Prepaid", "待付 Due", "应收（分） Net (fen)",
)
# Columns of LINE_HEADINGS holding yuan amounts (1-based), and the ones summed on the totals row.
MONEY_COLUMNS = (8, 9, 10, 12, 13, 15, 16)
SUM_COLUMNS = {9: "list_fen", 10: "discount_fen", 12: "amount_fen", 13: "voucher_fen", 15: "prepaid_fen",
               16: "due_fen", 17: "amount_fen"}


def _workbook() -> tuple[Workbook, Worksheet]:
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    return book, sheet


def _bytes(book: Workbook) -> bytes:
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


def _bold_row(sheet: Worksheet, values: list[Any]) -> None:
    sheet.append(values)
    for cell in sheet[sheet.max_row]:
        cell.font = Font(bold=True)


def _line_row(line: LineView) -> list[Any]:
    return [
        line.charge_id, line.service_date, line.description, f"{line.facility_code} {line.facility_name_zh}",
        f"{line.provider_code} {line.provider_name_zh}", line.unit,
        Decimal(line.quantity_text) if line.unit == "hour" else line.quantity, yuan_decimal(line.unit_amount_fen),
        yuan_decimal(line.list_amount_fen), yuan_decimal(line.discount_fen), line.discount_reason,
        yuan_decimal(line.amount_fen), yuan_decimal(line.voucher_fen), " ".join(line.voucher_codes),
        yuan_decimal(line.prepaid_fen), yuan_decimal(line.due_fen), line.amount_fen,
    ]


def _lines_table(sheet: Worksheet, lines: list[LineView], totals: Totals) -> None:
    _bold_row(sheet, list(LINE_HEADINGS))
    first = sheet.max_row + 1
    for line in lines:
        sheet.append(_line_row(line))
    totals_row: list[Any] = ["合计 Total"] + [None] * (len(LINE_HEADINGS) - 1)
    for column, name in SUM_COLUMNS.items():
        fen = getattr(totals, name)
        totals_row[column - 1] = fen if column == 17 else yuan_decimal(fen)
    _bold_row(sheet, totals_row)
    for row in sheet.iter_rows(min_row=first, max_row=sheet.max_row):
        for cell in row:
            if cell.column in MONEY_COLUMNS:
                cell.number_format = MONEY_FORMAT
            elif cell.column == 2 and isinstance(cell.value, date):
                cell.number_format = "yyyy-mm-dd"
    widths = {"A": 10, "B": 12, "C": 40, "D": 28, "E": 28, "K": 20, "N": 18}
    for letter, width in widths.items():
        sheet.column_dimensions[letter].width = width


def _account_rows(sheet: Worksheet, doc: InvoiceView | StatementView) -> None:
    account = doc.account
    sheet.append(["账户 Account", account.code, account.name])
    sheet.append(["付款单位 Payer", account.institution_code, account.institution_name_zh, account.institution_name_en])
    sheet.append(["账期 Period", doc.period])


def invoice_xlsx(view: InvoiceView) -> bytes:
    book, sheet = _workbook()
    sheet.title = "Invoice"
    _bold_row(sheet, ["发票 Invoice", view.number])
    _account_rows(sheet, view)
    sheet.append(["开具 Issued", view.issued_at.strftime("%Y-%m-%d %H:%M UTC"), "状态 Status", view.status])
    sheet.append([])
    _lines_table(sheet, view.lines, view.totals)
    return _bytes(book)


def statement_xlsx(view: StatementView) -> bytes:
    book, sheet = _workbook()
    sheet.title = "Statement"
    _bold_row(sheet, ["对账单 Statement", view.account.code, view.period])
    _account_rows(sheet, view)
    money = [
        ("期初预付余额 Opening prepaid balance", view.opening_balance_fen),
        ("本期充值 Deposits", view.deposits_fen),
        ("本期预付扣款 Paid from prepaid", view.prepaid_used_fen),
        ("期末预付余额 Closing prepaid balance", view.closing_balance_fen),
    ]
    for label, fen in money:
        sheet.append([label, yuan_decimal(fen), fen])
        sheet.cell(sheet.max_row, 2).number_format = MONEY_FORMAT
    sheet.append(["发票 Invoices", " ".join(view.invoice_numbers)])
    sheet.append([])
    _lines_table(sheet, view.lines, view.totals)
    deposits = book.create_sheet("Deposits")
    _bold_row(deposits, ["时间 (UTC) Time", "金额 Amount", "分 Fen", "凭证 Reference"])
    for d in view.deposits:
        deposits.append([d.created_at.strftime("%Y-%m-%d %H:%M"), yuan_decimal(d.amount_fen), d.amount_fen,
                         safe_cell(d.reference)])
    vouchers = book.create_sheet("Vouchers")
    _bold_row(vouchers, ["券号 Code", "名称 Name", "发放地区 Issuer", "面额 Amount", "本期使用 Used",
                         "期末余额 Balance", "有效期至 Valid until"])
    for v in view.vouchers:
        vouchers.append([v.code, v.name, v.issuer_region_code, yuan_decimal(v.amount_fen),
                         yuan_decimal(v.used_in_period_fen), yuan_decimal(v.balance_end_fen), v.valid_until])
    return _bytes(book)


SETTLEMENT_HEADINGS = ("debtor_kind", "debtor", "debtor_name", "debtor_region", "creditor_institution",
                       "creditor_name", "creditor_region", "amount_fen", "amount_yuan")


def _settlement_values(row: Any) -> list[Any]:
    return [row.debtor_kind, row.debtor_code, row.debtor_name_zh, row.debtor_region, row.creditor_code,
            row.creditor_name_zh, row.creditor_region, row.amount_fen]


def settlement_xlsx(report: SettlementReport) -> bytes:
    book, sheet = _workbook()
    sheet.title = "Settlement"
    _bold_row(sheet, ["结算报表 Settlement report", report.period])
    _bold_row(sheet, ["债务方类型 Debtor kind", "债务方 Debtor", "名称 Name", "地区 Region", "债权机构 Creditor",
                      "名称 Name", "地区 Region", "金额 Amount", "分 Fen"])
    for row in report.rows:
        values = _settlement_values(row)
        sheet.append([*values[:7], yuan_decimal(row.amount_fen), row.amount_fen])
        sheet.cell(sheet.max_row, 8).number_format = MONEY_FORMAT
    _bold_row(sheet, ["合计 Total", None, None, None, None, None, None, yuan_decimal(report.total_fen),
                      report.total_fen])
    if report.charges_fen is not None:
        sheet.append(["本期费用合计 Charges of the period", None, None, None, None, None, None,
                      yuan_decimal(report.charges_fen), report.charges_fen])
    matrix = book.create_sheet("Regions")
    _bold_row(matrix, ["欠 owes → 债权地区 creditor region", *report.regions])
    for debtor in report.regions:
        matrix.append([debtor, *[yuan_decimal(report.matrix.get(debtor, {}).get(c, 0)) for c in report.regions]])
    return _bytes(book)


# --- CSV --------------------------------------------------------------------------------------------------------


def _csv_line(values: list[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(values)
    return buffer.getvalue()


def settlement_csv(report: SettlementReport) -> bytes:
    """The settlement rows as CSV (UTF-8 with a byte-order mark, so spreadsheet programs read the Chinese names)."""
    out = [_csv_line(list(SETTLEMENT_HEADINGS))]
    for row in report.rows:
        out.append(_csv_line([*[safe_cell(str(v)) if isinstance(v, str) else v for v in _settlement_values(row)],
                              yuan_text(row.amount_fen).replace(",", "")]))
    return ("\ufeff" + "".join(out)).encode()


CHARGE_COLUMNS = (
    "charge_id", "posted_at", "service_date", "account_code", "payer_institution", "payer_region",
    "provider_institution", "provider_region", "facility", "source_kind", "source_id", "seq", "reverses_id",
    "description", "quantity", "unit", "unit_price_fen", "list_fen", "discount_fen", "net_fen", "method",
    "voucher_code", "part_fen",
)


@dataclass(frozen=True)
class ChargeScope:
    """Which charges an export covers: posted in [start, end), optionally of one account, facility, or
    institution (as payer or provider)."""

    start: datetime
    end: datetime
    account_id: int | None = None
    facility_id: int | None = None
    institution_id: int | None = None


def _charge_batch(session: Session, scope: ChargeScope, after_id: int) -> list[tuple[Any, ...]]:
    payer, provider = aliased(Institution), aliased(Institution)
    stmt = (
        select(Charge, BillingAccount.code, payer.code, provider.code, Facility.code)
        .join(BillingAccount, BillingAccount.id == Charge.account_id)
        .join(payer, payer.id == Charge.payer_institution_id)
        .join(provider, provider.id == Charge.provider_institution_id)
        .join(Facility, Facility.id == Charge.facility_id)
        .where(Charge.posted_at >= scope.start, Charge.posted_at < scope.end, Charge.id > after_id)
        .order_by(Charge.id).limit(BATCH)
    )
    if scope.account_id is not None:
        stmt = stmt.where(Charge.account_id == scope.account_id)
    if scope.facility_id is not None:
        stmt = stmt.where(Charge.facility_id == scope.facility_id)
    if scope.institution_id is not None:
        stmt = stmt.where(or_(Charge.payer_institution_id == scope.institution_id,
                              Charge.provider_institution_id == scope.institution_id))
    return [tuple(r) for r in session.execute(stmt).all()]


def _parts(session: Session, charge_ids: list[int]) -> dict[int, list[tuple[str, str, int]]]:
    parts: dict[int, list[tuple[str, str, int]]] = {i: [] for i in charge_ids}
    for charge_id, code, amount in session.execute(
        select(VoucherRedemption.charge_id, Voucher.code, VoucherRedemption.amount_fen)
        .join(Voucher, Voucher.id == VoucherRedemption.voucher_id)
        .where(VoucherRedemption.charge_id.in_(charge_ids)).order_by(VoucherRedemption.id)
    ):
        parts[charge_id].append(("voucher", code, amount))
    payments = session.execute(
        select(Payment.charge_id, Payment.method, Payment.amount_fen).where(Payment.charge_id.in_(charge_ids))
    ).all()
    # The order money is taken in: vouchers, then the prepaid balance, then the invoice.
    for charge_id, method, amount in sorted(payments, key=lambda p: (p[0], p[1] != PaymentMethod.prepaid)):
        parts[charge_id].append((PaymentMethod(method).value, "", amount))
    return parts


def charge_rows(session: Session, scope: ChargeScope) -> Iterator[list[Any]]:
    """One row per payment part of every charge in scope, by charge id, read in batches; a charge with no part (a
    zero amount) gets one row with method "none"."""
    after = 0
    while True:
        batch = _charge_batch(session, scope, after)
        if not batch:
            return
        parts = _parts(session, [c.id for c, *_rest in batch])
        for charge, account_code, payer_code, provider_code, facility_code in batch:
            common = [
                charge.id, charge.posted_at.isoformat(), charge.service_date.isoformat(), safe_cell(account_code),
                safe_cell(payer_code), charge.payer_region_code, safe_cell(provider_code),
                charge.provider_region_code, safe_cell(facility_code), charge.source_kind.value, charge.source_id,
                charge.seq, charge.reverses_id if charge.reverses_id is not None else "",
                safe_cell(charge.description), charge.quantity, charge.unit.value, charge.unit_amount_fen,
                charge.list_amount_fen, charge.discount_fen, charge.amount_fen,
            ]
            for method, code, amount in parts[charge.id] or [("none", "", 0)]:
                yield [*common, method, safe_cell(code), amount]
        after = batch[-1][0].id


def charges_csv_stream(db: Database, scope: ChargeScope) -> Iterator[bytes]:
    """The charge export as CSV bytes, streamed batch by batch from one read transaction (a consistent view)."""
    yield ("\ufeff" + _csv_line(list(CHARGE_COLUMNS))).encode()
    with db.unit_of_work(write=False) as session:
        pending: list[str] = []
        for row in charge_rows(session, scope):
            pending.append(_csv_line(row))
            if len(pending) >= BATCH:
                yield "".join(pending).encode()
                pending = []
        if pending:
            yield "".join(pending).encode()


def charge_scope_for(session: Session, actor: Actor, *, first: date, last: date, account_id: int | None = None,
                     facility_id: int | None = None, institution_id: int | None = None) -> ChargeScope:
    """The charges an actor may export for days [first, last] (platform zone): an account's (its owner or
    administrators), a facility's (its staff), an institution's as payer or provider (its administrator), or
    everything (platform administrators)."""
    start, end = day_bounds(first, last)
    named = [v for v in (account_id, facility_id, institution_id) if v is not None]
    if len(named) > 1:
        raise InvalidInput("Name one account, one facility or one institution.", field="account_id",
                           code="one_scope")
    if account_id is not None:
        account = accounts.visible_account(session, actor, account_id)
        if not accounts.may_manage(actor, account):
            raise Forbidden("Only the account's owner or its institution's administrator exports its charges.")
    elif facility_id is not None:
        facility = session.get(Facility, facility_id)
        if facility is None:
            raise NotFound(f"Facility {facility_id} does not exist.", field="facility_id")
        roles.require(actor, Action.manage_facility_billing, facility=roles.FacilityRef.of(facility))
    elif institution_id is not None:
        if session.get(Institution, institution_id) is None:
            raise NotFound(f"Institution {institution_id} does not exist.", field="institution_id")
        roles.require(actor, Action.manage_institution_accounts, institution_id=institution_id)
    elif not roles.is_platform_admin(actor):
        raise Forbidden("Name your account, facility or institution; only platform administrators export every "
                        "charge.", field="account_id")
    return ChargeScope(start=start, end=end, account_id=account_id, facility_id=facility_id,
                       institution_id=institution_id)
