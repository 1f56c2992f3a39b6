"""The settlement report of a month: who owes whom for the charges posted in it.

What an account paid (prepaid or on its invoice) its payer institution owes the provider institution; what a voucher
paid, the region authority that issued the voucher owes the provider institution. The rows add up to the charges
of the month to the fen.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.billing.invoices import period_bounds
from labcommons.billing.models import Charge, Payment, Voucher, VoucherRedemption
from labcommons.catalog.models import Institution, Region
from labcommons.identity import roles
from labcommons.identity.models import Role
from labcommons.identity.roles import Action

INSTITUTION = "institution"
REGION_AUTHORITY = "region_authority"


@dataclass(frozen=True)
class SettlementRow:
    """One debt: the debtor (an institution, or a region's authority for its vouchers) owes the creditor."""

    debtor_kind: str
    debtor_code: str
    debtor_name_zh: str
    debtor_name_en: str
    debtor_region: str
    creditor_code: str
    creditor_name_zh: str
    creditor_name_en: str
    creditor_region: str
    amount_fen: int
    debtor_institution_id: int | None = None
    creditor_institution_id: int = 0


@dataclass
class SettlementReport:
    """The rows, the region-by-region matrix and the totals. `complete` when the reader sees every row, and then
    `charges_fen` (the sum of the month's charges) equals `total_fen`."""

    period: str
    start: datetime
    end: datetime
    rows: list[SettlementRow]
    regions: list[str]
    # matrix[debtor_region][creditor_region]: what that region's payers and authority owe that region's providers.
    matrix: dict[str, dict[str, int]]
    account_fen: int
    voucher_fen: int
    total_fen: int
    complete: bool
    charges_fen: int | None = None
    region_names: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def reconciled(self) -> bool:
        return self.charges_fen is None or self.charges_fen == self.total_fen

    def net(self, a: str, b: str) -> int:
        """What region a's debtors owe region b's creditors less what b's owe a's."""
        return self.matrix.get(a, {}).get(b, 0) - self.matrix.get(b, {}).get(a, 0)


def _in_period(start: datetime, end: datetime) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    return Charge.posted_at >= start, Charge.posted_at < end


def _raw_rows(session: Session, start: datetime, end: datetime) -> list[tuple[str, int | None, str, int, str, int]]:
    """(kind, debtor institution id, debtor region, creditor institution id, creditor region, fen)."""
    period = _in_period(start, end)
    account_parts = session.execute(
        select(Charge.payer_institution_id, Charge.payer_region_code, Charge.provider_institution_id,
               Charge.provider_region_code, func.sum(Payment.amount_fen))
        .join(Charge, Charge.id == Payment.charge_id).where(*period)
        .group_by(Charge.payer_institution_id, Charge.payer_region_code, Charge.provider_institution_id,
                  Charge.provider_region_code)
    ).all()
    voucher_parts = session.execute(
        select(Voucher.issuer_region_code, Charge.provider_institution_id, Charge.provider_region_code,
               func.sum(VoucherRedemption.amount_fen))
        .join(Charge, Charge.id == VoucherRedemption.charge_id)
        .join(Voucher, Voucher.id == VoucherRedemption.voucher_id)
        .where(*period)
        .group_by(Voucher.issuer_region_code, Charge.provider_institution_id, Charge.provider_region_code)
    ).all()
    rows: list[tuple[str, int | None, str, int, str, int]] = [
        (INSTITUTION, payer, payer_region, provider, provider_region, int(amount))
        for payer, payer_region, provider, provider_region, amount in account_parts
    ]
    rows += [(REGION_AUTHORITY, None, issuer, provider, provider_region, int(amount))
             for issuer, provider, provider_region, amount in voucher_parts]
    return [r for r in rows if r[5] != 0]


def _visible(actor: Actor | None, kind: str, debtor_id: int | None, debtor_region: str, creditor_id: int,
             creditor_region: str) -> bool:
    if actor is None or roles.is_platform_admin(actor):
        return True
    for g in actor.grants:
        if g.role == Role.institution_admin and g.institution_id in (debtor_id, creditor_id):
            return True
        if g.role == Role.region_authority and g.region_code in (debtor_region, creditor_region):
            return True
    return False


def settlement_report(session: Session, period: str, *, actor: Actor | None = None) -> SettlementReport:
    """The month's report; with an actor, the rows that touch them only (their institution or their region).

    `actor` None is the platform operator (the command line) and sees everything.
    """
    start, end = period_bounds(period)
    if actor is not None:
        roles.require_some(actor, Action.view_settlement)
    complete = actor is None or roles.is_platform_admin(actor)
    raw = [r for r in _raw_rows(session, start, end) if complete or _visible(actor, *r[:5])]
    institution_ids = {r[1] for r in raw if r[1] is not None} | {r[3] for r in raw}
    institutions = {i.id: i for i in session.scalars(select(Institution).where(Institution.id.in_(
        institution_ids or {-1})))}
    region_rows = {r.code: r for r in session.scalars(select(Region))}
    rows = []
    for kind, debtor_id, debtor_region, creditor_id, creditor_region, amount in raw:
        creditor = institutions[creditor_id]
        if debtor_id is not None:
            debtor = institutions[debtor_id]
            names = (debtor.code, debtor.name_zh, debtor.name_en)
        else:
            region = region_rows.get(debtor_region)
            names = (debtor_region, region.name_zh if region else debtor_region,
                     region.name_en if region else debtor_region)
        rows.append(SettlementRow(
            debtor_kind=kind, debtor_code=names[0], debtor_name_zh=names[1], debtor_name_en=names[2],
            debtor_region=debtor_region, creditor_code=creditor.code, creditor_name_zh=creditor.name_zh,
            creditor_name_en=creditor.name_en, creditor_region=creditor_region, amount_fen=amount,
            debtor_institution_id=debtor_id, creditor_institution_id=creditor_id,
        ))
    rows.sort(key=lambda r: (r.debtor_region, r.debtor_kind, r.debtor_code, r.creditor_region, r.creditor_code))
    matrix: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in rows:
        matrix[r.debtor_region][r.creditor_region] += r.amount_fen
    regions = sorted({r.debtor_region for r in rows} | {r.creditor_region for r in rows})
    charges_fen = None
    if complete:
        charges_fen = int(session.scalar(
            select(func.coalesce(func.sum(Charge.amount_fen), 0)).where(*_in_period(start, end))
        ) or 0)
    account_fen = sum(r.amount_fen for r in rows if r.debtor_kind == INSTITUTION)
    voucher_fen = sum(r.amount_fen for r in rows if r.debtor_kind == REGION_AUTHORITY)
    return SettlementReport(
        period=period, start=start, end=end, rows=rows, regions=regions,
        matrix={a: dict(b) for a, b in matrix.items()}, account_fen=account_fen, voucher_fen=voucher_fen,
        total_fen=account_fen + voucher_fen, complete=complete, charges_fen=charges_fen,
        region_names={code: (r.name_zh, r.name_en) for code, r in region_rows.items()},
    )

