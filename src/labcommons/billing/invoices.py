"""Monthly invoices and statements of funding accounts: generating them from the charge ledger, and reading them
with everything a finance office needs on the page (what, when, where, at which price, and who paid which part).

A period is a month in the platform's zone ("2026-11"). An invoice takes every charge of its account posted before
the month's end that no earlier invoice took; the database keeps a charge on one invoice only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from sqlalchemy import ColumnElement, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session

from labcommons.actor import Actor
from labcommons.billing import accounts, ledger
from labcommons.billing.models import (
    AccountDeposit,
    BillingAccount,
    Charge,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    Payment,
    PaymentMethod,
    RateUnit,
    Voucher,
    VoucherRedemption,
)
from labcommons.catalog.models import Facility, Institution
from labcommons.db import utcnow
from labcommons.errors import Conflict, Forbidden, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity.roles import Action

PERIOD_PATTERN = re.compile(r"^(?P<year>2[0-9]{3})-(?P<month>0[1-9]|1[0-2])$")


# --- periods ----------------------------------------------------------------------------------------------------


def parse_period(period: str, field_name: str = "period") -> tuple[int, int]:
    """(year, month) of a "YYYY-MM" period; InvalidInput naming the field otherwise."""
    match = PERIOD_PATTERN.match(period.strip()) if isinstance(period, str) else None
    if match is None:
        raise InvalidInput("A period is a month written YYYY-MM, e.g. 2026-11.", field=field_name,
                           code="invalid_period")
    return int(match["year"]), int(match["month"])


def period_bounds(period: str) -> tuple[datetime, datetime]:
    """The month as a half-open UTC interval [start, end), its boundaries at midnight in the platform's zone."""
    year, month = parse_period(period)
    after = (year + 1, 1) if month == 12 else (year, month + 1)
    zone = ledger.platform_zone()
    start = datetime(year, month, 1, tzinfo=zone).astimezone(UTC)
    end = datetime(after[0], after[1], 1, tzinfo=zone).astimezone(UTC)
    return start, end


def period_of(moment: datetime) -> str:
    """The period a moment falls in (platform zone)."""
    return moment.astimezone(ledger.platform_zone()).strftime("%Y-%m")


def previous_period(moment: datetime) -> str:
    """The last month that has ended at `moment`: what a monthly run invoices."""
    local = moment.astimezone(ledger.platform_zone())
    year, month = (local.year - 1, 12) if local.month == 1 else (local.year, local.month - 1)
    return f"{year:04d}-{month:02d}"


def day_bounds(first: date, last: date) -> tuple[datetime, datetime]:
    """Whole days [first, last] in the platform's zone as a half-open UTC interval."""
    if last < first:
        raise InvalidInput("The end date is before the start date.", field="to", code="invalid_range")
    if first.year < 1900 or last.year > 9000:
        field = "from" if first.year < 1900 else "to"
        raise InvalidInput("Dates lie between the years 1900 and 9000.", field=field, code="out_of_range")
    zone = ledger.platform_zone()
    start = datetime(first.year, first.month, first.day, tzinfo=zone).astimezone(UTC)
    after = date.fromordinal(last.toordinal() + 1)
    return start, datetime(after.year, after.month, after.day, tzinfo=zone).astimezone(UTC)


def invoice_number(period: str, account_id: int) -> str:
    # One invoice per account and period, so the account id makes the number unique without a sequence.
    year, month = parse_period(period)
    return f"INV-{year:04d}{month:02d}-{account_id:06d}"


# --- how each charge was paid --------------------------------------------------------------------------------------


@dataclass
class Parts:
    """How one charge was paid, in fen (signed like the charge)."""

    voucher_fen: int = 0
    prepaid_fen: int = 0
    due_fen: int = 0
    voucher_codes: list[str] = field(default_factory=list)

    @property
    def total_fen(self) -> int:
        return self.voucher_fen + self.prepaid_fen + self.due_fen


def parts_of(session: Session, charge_ids: Sequence[int]) -> dict[int, Parts]:
    """The payment parts of each charge (the ledger's sums) with the codes of the vouchers that paid."""
    result = {
        charge_id: Parts(voucher_fen=p.voucher_fen, prepaid_fen=p.prepaid_fen, due_fen=p.invoice_fen)
        for charge_id, p in ledger.parts_of_charges(session, charge_ids).items()
    }
    for start in range(0, len(charge_ids), 500):
        chunk = list(charge_ids[start:start + 500])
        for charge_id, code in session.execute(
            select(VoucherRedemption.charge_id, Voucher.code)
            .join(Voucher, Voucher.id == VoucherRedemption.voucher_id)
            .where(VoucherRedemption.charge_id.in_(chunk))
            .order_by(VoucherRedemption.id)
        ):
            if code not in result[charge_id].voucher_codes:
                result[charge_id].voucher_codes.append(code)
    return result


def _balanced_parts(charge: Charge, parts: Parts) -> Parts:
    if parts.total_fen != charge.amount_fen:
        # The ledger writes a charge and its parts in one transaction; a gap means a bug upstream, and an invoice
        # must never paper over it.
        raise Conflict(f"Charge {charge.id} is not fully paid for in the ledger ({parts.total_fen} of "
                       f"{charge.amount_fen} fen).", code="ledger_unbalanced", charge_id=charge.id)
    return parts


# --- generating -----------------------------------------------------------------------------------------------


def _not_invoiced() -> ColumnElement[bool]:
    return ~exists().where(InvoiceLine.charge_id == Charge.id)


def accounts_to_invoice(session: Session, period: str, *, account_id: int | None = None) -> list[int]:
    """Accounts with charges posted before the period's end that no invoice has taken yet."""
    _start, end = period_bounds(period)
    stmt = (select(Charge.account_id).where(Charge.posted_at < end, _not_invoiced())
            .distinct().order_by(Charge.account_id))
    if account_id is not None:
        stmt = stmt.where(Charge.account_id == account_id)
    return list(session.scalars(stmt))


def check_period_closed(period: str, now: datetime, allow_open: bool) -> None:
    _start, end = period_bounds(period)
    if end > now and not allow_open:
        raise InvalidInput(f"The month {period} has not ended yet; invoices are made once it has.", field="period",
                           code="period_not_ended")


def invoice_account(session: Session, account_id: int, period: str, *, now: datetime | None = None) -> Invoice | None:
    """The account's invoice for the period, made now from its un-invoiced charges; None when it already has one
    or has nothing to invoice."""
    now = now or utcnow()
    _start, end = period_bounds(period)
    # Serialises invoicing (and charge posting, which takes the same lock) of one account across processes.
    accounts.get_account(session, account_id, lock=True)
    taken = session.scalar(select(Invoice.id).where(Invoice.account_id == account_id, Invoice.period == period))
    if taken is not None:
        return None
    charges = list(session.scalars(
        select(Charge).where(Charge.account_id == account_id, Charge.posted_at < end, _not_invoiced())
        .order_by(Charge.posted_at, Charge.id)
    ))
    if not charges:
        return None
    parts = parts_of(session, [c.id for c in charges])
    lines = [(c, _balanced_parts(c, parts[c.id])) for c in charges]
    invoice = Invoice(
        number=invoice_number(period, account_id), account_id=account_id, period=period,
        total_fen=sum(c.amount_fen for c, _p in lines), voucher_fen=sum(p.voucher_fen for _c, p in lines),
        prepaid_fen=sum(p.prepaid_fen for _c, p in lines), due_fen=sum(p.due_fen for _c, p in lines),
        status=InvoiceStatus.issued, issued_at=now,
    )
    try:
        # A savepoint: a run that loses to another process (same account and period, or a charge it took first)
        # leaves neither the invoice nor any of its lines behind.
        with session.begin_nested():
            session.add(invoice)
            session.flush()
            session.add_all([
                InvoiceLine(invoice_id=invoice.id, charge_id=c.id, amount_fen=c.amount_fen, voucher_fen=p.voucher_fen,
                            prepaid_fen=p.prepaid_fen, due_fen=p.due_fen)
                for c, p in lines
            ])
            session.flush()
    except IntegrityError:
        return None
    return invoice


def generate_invoices(session: Session, period: str, *, now: datetime | None = None, account_id: int | None = None,
                      allow_open: bool = False) -> list[Invoice]:
    """One invoice per account with un-invoiced charges posted before the period's end; the ones made now.

    Running it again makes nothing new. A month that has not ended is refused unless `allow_open`.
    """
    now = now or utcnow()
    check_period_closed(period, now, allow_open)
    made = []
    for candidate in accounts_to_invoice(session, period, account_id=account_id):
        invoice = invoice_account(session, candidate, period, now=now)
        if invoice is not None:
            made.append(invoice)
    return made


def may_generate(actor: Actor, account: BillingAccount | None) -> bool:
    """Platform admins invoice everyone; an institution's admin its institution's accounts."""
    if roles.is_platform_admin(actor):
        return True
    return account is not None and roles.authorize(actor, Action.manage_institution_accounts,
                                                   institution_id=account.institution_id)


def generate_as(session: Session, actor: Actor, period: str, *, account_id: int | None = None,
                now: datetime | None = None, allow_open: bool = False) -> list[Invoice]:
    """generate_invoices for an actor: a platform admin for any or all accounts, an institution admin for one of
    the institution's accounts (named by account_id)."""
    parse_period(period)
    account = accounts.get_account(session, account_id) if account_id is not None else None
    if not may_generate(actor, account):
        if account is not None and not roles.is_platform_admin(actor):
            accounts.visible_account(session, actor, account.id)  # 404 for accounts the actor may not even see
        raise Forbidden("Only a platform administrator, or the administrator of the account's institution, may "
                        "generate invoices.", field="account_id" if account_id is None else None)
    return generate_invoices(session, period, now=now, account_id=account_id, allow_open=allow_open)


# --- reading ----------------------------------------------------------------------------------------------------


def hours_text(minutes: int) -> str:
    """Minutes as hours with two decimals, rounded half away from zero in integer arithmetic (90 → "1.50")."""
    sign = "-" if minutes < 0 else ""
    hundredths = (abs(minutes) * 100 + 30) // 60
    return f"{sign}{hundredths // 100}.{hundredths % 100:02d}"


def quantity_text(unit: RateUnit | str, quantity: int) -> str:
    """A charge's quantity as printed: hours for hourly rates, the count otherwise."""
    return hours_text(quantity) if RateUnit(unit) == RateUnit.hour else str(quantity)


@dataclass
class LineView:
    """One line of an invoice or statement, with the names a reader needs."""

    charge_id: int
    posted_at: datetime
    service_date: date
    description: str
    facility_code: str
    facility_name_zh: str
    facility_name_en: str
    provider_code: str
    provider_name_zh: str
    provider_name_en: str
    unit: str
    quantity: int
    quantity_text: str
    unit_amount_fen: int
    list_amount_fen: int
    discount_fen: int
    discount_reason: str
    amount_fen: int
    voucher_fen: int
    voucher_codes: list[str]
    prepaid_fen: int
    due_fen: int
    reverses_id: int | None
    source_kind: str
    source_id: int
    user_id: int


@dataclass
class Totals:
    list_fen: int = 0
    discount_fen: int = 0
    amount_fen: int = 0
    voucher_fen: int = 0
    prepaid_fen: int = 0
    due_fen: int = 0

    @classmethod
    def of(cls, lines: Iterable[LineView]) -> Totals:
        totals = cls()
        for line in lines:
            totals.list_fen += line.list_amount_fen
            totals.discount_fen += line.discount_fen
            totals.amount_fen += line.amount_fen
            totals.voucher_fen += line.voucher_fen
            totals.prepaid_fen += line.prepaid_fen
            totals.due_fen += line.due_fen
        return totals


@dataclass
class AccountHeader:
    id: int
    code: str
    name: str
    kind: str
    institution_code: str
    institution_name_zh: str
    institution_name_en: str
    region_code: str

    @classmethod
    def of(cls, session: Session, account: BillingAccount) -> AccountHeader:
        institution = session.get(Institution, account.institution_id)
        assert institution is not None  # a foreign key
        return cls(id=account.id, code=account.code, name=account.name, kind=account.kind.value,
                   institution_code=institution.code, institution_name_zh=institution.name_zh,
                   institution_name_en=institution.name_en, region_code=account.region_code)


@dataclass
class InvoiceView:
    """An invoice as read and printed: header, account, lines, totals (which equal the stored ones)."""

    id: int
    number: str
    period: str
    status: str
    issued_at: datetime
    paid_at: datetime | None
    account: AccountHeader
    lines: list[LineView]
    totals: Totals
    total_fen: int
    voucher_fen: int
    prepaid_fen: int
    due_fen: int


def line_views(session: Session, charges: Sequence[Charge], parts: dict[int, Parts] | None = None) -> list[LineView]:
    """Charges as lines with facility and provider names and their payment parts."""
    if parts is None:
        parts = parts_of(session, [c.id for c in charges])
    facility_ids = {c.facility_id for c in charges}
    institution_ids = {c.provider_institution_id for c in charges}
    facilities = {f.id: f for f in session.scalars(select(Facility).where(Facility.id.in_(facility_ids or [-1])))}
    providers = {i.id: i for i in session.scalars(select(Institution).where(Institution.id.in_(institution_ids
                                                                                                 or [-1])))}
    result = []
    for c in charges:
        p = parts.get(c.id) or Parts()
        fac, prov = facilities[c.facility_id], providers[c.provider_institution_id]
        result.append(LineView(
            charge_id=c.id, posted_at=c.posted_at, service_date=c.service_date, description=c.description,
            facility_code=fac.code, facility_name_zh=fac.name_zh, facility_name_en=fac.name_en,
            provider_code=prov.code, provider_name_zh=prov.name_zh, provider_name_en=prov.name_en,
            unit=RateUnit(c.unit).value, quantity=c.quantity, quantity_text=quantity_text(c.unit, c.quantity),
            unit_amount_fen=c.unit_amount_fen, list_amount_fen=c.list_amount_fen, discount_fen=c.discount_fen,
            discount_reason=c.discount_reason, amount_fen=c.amount_fen, voucher_fen=p.voucher_fen,
            voucher_codes=list(p.voucher_codes), prepaid_fen=p.prepaid_fen, due_fen=p.due_fen,
            reverses_id=c.reverses_id, source_kind=c.source_kind.value, source_id=c.source_id, user_id=c.user_id,
        ))
    return result


def invoice_view(session: Session, invoice: Invoice) -> InvoiceView:
    """The invoice with its lines as they were invoiced (the parts stored on each line)."""
    rows = session.execute(
        select(InvoiceLine, Charge).join(Charge, Charge.id == InvoiceLine.charge_id)
        .where(InvoiceLine.invoice_id == invoice.id).order_by(Charge.posted_at, Charge.id)
    ).all()
    charges = [c for _l, c in rows]
    codes = parts_of(session, [c.id for c in charges])
    stored = {
        line.charge_id: Parts(voucher_fen=line.voucher_fen, prepaid_fen=line.prepaid_fen, due_fen=line.due_fen,
                              voucher_codes=codes[line.charge_id].voucher_codes if line.charge_id in codes else [])
        for line, _c in rows
    }
    lines = line_views(session, charges, stored)
    account = accounts.get_account(session, invoice.account_id)
    return InvoiceView(
        id=invoice.id, number=invoice.number, period=invoice.period, status=invoice.status.value,
        issued_at=invoice.issued_at, paid_at=invoice.paid_at, account=AccountHeader.of(session, account),
        lines=lines, totals=Totals.of(lines), total_fen=invoice.total_fen, voucher_fen=invoice.voucher_fen,
        prepaid_fen=invoice.prepaid_fen, due_fen=invoice.due_fen,
    )


def visible_invoice(session: Session, actor: Actor, invoice_id: int) -> Invoice:
    """An invoice of an account the actor owns, is an approved member of, or administers; NotFound otherwise."""
    invoice = session.get(Invoice, invoice_id)
    if invoice is None:
        raise NotFound(f"Invoice {invoice_id} does not exist.", field="invoice_id")
    try:
        accounts.visible_account(session, actor, invoice.account_id)
    except NotFound:
        raise NotFound(f"Invoice {invoice_id} does not exist.", field="invoice_id") from None
    return invoice


def visible_account_ids(session: Session, actor: Actor) -> list[int]:
    """Accounts whose invoices the actor sees: owned or administered ones and approved memberships."""
    ids = {a.id for a in accounts.managed_accounts(session, actor)}
    ids |= {a.id for a in accounts.accounts_of(session, actor.user_id)}
    return sorted(ids)


def my_invoices(session: Session, actor: Actor, *, account_id: int | None = None, status: InvoiceStatus | None = None,
                limit: int = 200) -> list[Invoice]:
    """Invoices of the accounts the actor sees, newest period first; optionally of one account (404 if unseen)."""
    if account_id is not None:
        accounts.visible_account(session, actor, account_id)
        wanted = [account_id]
    else:
        wanted = visible_account_ids(session, actor)
    if not wanted:
        return []
    stmt = select(Invoice).where(Invoice.account_id.in_(wanted))
    if status is not None:
        stmt = stmt.where(Invoice.status == status)
    return list(session.scalars(stmt.order_by(Invoice.period.desc(), Invoice.id.desc()).limit(limit)))


def account_codes(session: Session, account_ids: Iterable[int]) -> dict[int, str]:
    ids = list(set(account_ids))
    if not ids:
        return {}
    return dict(session.execute(select(BillingAccount.id, BillingAccount.code).where(BillingAccount.id.in_(ids)))
                .all())


def may_mark_paid(actor: Actor, account: BillingAccount) -> bool:
    """Platform admins, and the administrators of the paying account's institution."""
    return roles.authorize(actor, Action.manage_institution_accounts, institution_id=account.institution_id)


def mark_paid(session: Session, actor: Actor, invoice_id: int, *, now: datetime | None = None) -> Invoice:
    """Record that the payer's finance office settled the invoice; Conflict when it already is."""
    invoice = visible_invoice(session, actor, invoice_id)
    account = accounts.get_account(session, invoice.account_id)
    if not may_mark_paid(actor, account):
        raise Forbidden("Only the administrator of the paying institution marks its invoices paid.")
    # Compare-and-set: two clicks at once mark it once.
    stmt = (update(Invoice).where(Invoice.id == invoice.id, Invoice.status == InvoiceStatus.issued)
            .values(status=InvoiceStatus.paid, paid_at=now or utcnow())
            .execution_options(synchronize_session=False))
    if session.execute(stmt).rowcount != 1:  # type: ignore[attr-defined]
        raise Conflict("This invoice is already marked paid.", field="invoice_id", code="already_paid")
    session.refresh(invoice)
    return invoice


# --- statements -------------------------------------------------------------------------------------------------


@dataclass
class VoucherLine:
    code: str
    name: str
    issuer_region_code: str
    amount_fen: int
    used_in_period_fen: int
    balance_end_fen: int
    valid_until: date


@dataclass
class DepositLine:
    created_at: datetime
    amount_fen: int
    reference: str


@dataclass
class StatementView:
    """An account's month: its charges with their parts, the prepaid balance from opening to closing, and its
    vouchers."""

    account: AccountHeader
    period: str
    start: datetime
    end: datetime
    lines: list[LineView]
    totals: Totals
    prepaid: bool
    opening_balance_fen: int
    deposits: list[DepositLine]
    deposits_fen: int
    prepaid_used_fen: int
    closing_balance_fen: int
    vouchers: list[VoucherLine]
    invoice_numbers: list[str]


def _sum(session: Session, column: InstrumentedAttribute[int], *where: ColumnElement[bool]) -> int:
    return int(session.scalar(select(func.coalesce(func.sum(column), 0)).where(*where)) or 0)


def prepaid_balance_at(session: Session, account: BillingAccount, moment: datetime) -> int:
    """The prepaid balance at `moment`: today's balance with later deposits taken out and later prepaid payments
    (signed: reversals gave money back) put back."""
    deposits_after = _sum(session, AccountDeposit.amount_fen, AccountDeposit.account_id == account.id,
                          AccountDeposit.created_at >= moment)
    paid_after = _sum(session, Payment.amount_fen, Payment.account_id == account.id,
                      Payment.method == PaymentMethod.prepaid, Payment.created_at >= moment)
    return account.balance_fen - deposits_after + paid_after


def statement(session: Session, account_id: int, period: str) -> StatementView:
    """The account's statement for a month: charges posted in it, deposits, prepaid balances, vouchers."""
    start, end = period_bounds(period)
    account = accounts.get_account(session, account_id)
    charges = list(session.scalars(
        select(Charge).where(Charge.account_id == account_id, Charge.posted_at >= start, Charge.posted_at < end)
        .order_by(Charge.posted_at, Charge.id)
    ))
    lines = line_views(session, charges)
    deposits = [DepositLine(created_at=d.created_at, amount_fen=d.amount_fen, reference=d.reference)
                for d in session.scalars(select(AccountDeposit).where(
                    AccountDeposit.account_id == account_id, AccountDeposit.created_at >= start,
                    AccountDeposit.created_at < end).order_by(AccountDeposit.created_at, AccountDeposit.id))]
    prepaid_used = _sum(session, Payment.amount_fen, Payment.account_id == account_id,
                        Payment.method == PaymentMethod.prepaid, Payment.created_at >= start,
                        Payment.created_at < end)
    vouchers = []
    for v in session.scalars(select(Voucher).where(Voucher.account_id == account_id).order_by(Voucher.code)):
        used = _sum(session, VoucherRedemption.amount_fen, VoucherRedemption.voucher_id == v.id,
                    VoucherRedemption.created_at >= start, VoucherRedemption.created_at < end)
        used_after = _sum(session, VoucherRedemption.amount_fen, VoucherRedemption.voucher_id == v.id,
                          VoucherRedemption.created_at >= end)
        vouchers.append(VoucherLine(code=v.code, name=v.name, issuer_region_code=v.issuer_region_code,
                                    amount_fen=v.amount_fen, used_in_period_fen=used,
                                    balance_end_fen=v.balance_fen + used_after, valid_until=v.valid_until))
    numbers = list(session.scalars(
        select(Invoice.number).join(InvoiceLine, InvoiceLine.invoice_id == Invoice.id)
        .where(InvoiceLine.charge_id.in_([c.id for c in charges] or [-1])).distinct().order_by(Invoice.number)
    ))
    return StatementView(
        account=AccountHeader.of(session, account), period=period, start=start, end=end, lines=lines,
        totals=Totals.of(lines), prepaid=account.prepaid,
        opening_balance_fen=prepaid_balance_at(session, account, start), deposits=deposits,
        deposits_fen=sum(d.amount_fen for d in deposits), prepaid_used_fen=prepaid_used,
        closing_balance_fen=prepaid_balance_at(session, account, end), vouchers=vouchers, invoice_numbers=numbers,
    )


def visible_statement(session: Session, actor: Actor, account_id: int, period: str) -> StatementView:
    """The statement of an account the actor may see (404 otherwise)."""
    parse_period(period)
    accounts.visible_account(session, actor, account_id)
    return statement(session, account_id, period)
