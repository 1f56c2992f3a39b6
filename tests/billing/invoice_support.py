"""Ledger rows for invoice and settlement tests, written directly (independent of billing/ledger.py): accounts,
vouchers, charges with their payments and voucher redemptions."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from labcommons.billing.models import (
    AccountDeposit,
    AccountKind,
    AccountMember,
    BillingAccount,
    Charge,
    MemberStatus,
    PayerCategory,
    Payment,
    PaymentMethod,
    RateUnit,
    SourceKind,
    Voucher,
    VoucherRedemption,
)
from labcommons.catalog.models import Facility, Institution
from labcommons.identity.models import User
from tests.factories import World

_sources = itertools.count(1)

# Moments in Beijing time (UTC+8) written in UTC: October 2026 runs from 2026-09-30 16:00 UTC to 2026-10-31 16:00.
OCT = datetime(2026, 10, 10, 2, 0, tzinfo=UTC)
OCT_LAST_MINUTE = datetime(2026, 10, 31, 15, 59, tzinfo=UTC)  # 23:59 on 31 October in Beijing
NOV_FIRST_MINUTE = datetime(2026, 10, 31, 16, 0, tzinfo=UTC)  # 00:00 on 1 November in Beijing
NOV = datetime(2026, 11, 12, 3, 0, tzinfo=UTC)
AFTER_NOV = datetime(2026, 12, 3, 1, 0, tzinfo=UTC)
AFTER_OCT = datetime(2026, 11, 3, 1, 0, tzinfo=UTC)


def user_id(session: Session, name: str) -> int:
    uid = session.scalar(select(User.id).where(User.email == f"{name}@example.org"))
    assert uid is not None
    return uid


def add_account(session: Session, world: World, code: str, *, owner: str = "bob", institution: str = "CQ-UNI",
                prepaid: bool = False, balance_fen: int = 0, kind: AccountKind = AccountKind.grant,
                members: tuple[str, ...] = ()) -> BillingAccount:
    inst = session.get(Institution, world.institutions[institution])
    assert inst is not None
    account = BillingAccount(code=code, name=f"Account {code}", kind=kind, institution_id=inst.id,
                             region_code=inst.region_code, owner_id=user_id(session, owner), prepaid=prepaid,
                             balance_fen=balance_fen)
    session.add(account)
    session.flush()
    for name in members:
        session.add(AccountMember(account_id=account.id, user_id=user_id(session, name), status=MemberStatus.approved))
    session.flush()
    return account


def add_voucher(session: Session, account: BillingAccount, code: str, *, issuer: str = "CQ",
                amount_fen: int = 1_000_000, share_bp: int = 5000) -> Voucher:
    voucher = Voucher(code=code, issuer_region_code=issuer, account_id=account.id, name=f"Voucher {code}",
                      amount_fen=amount_fen, balance_fen=amount_fen, share_bp=share_bp,
                      valid_from=date(2026, 1, 1), valid_until=date(2027, 12, 31))
    session.add(voucher)
    session.flush()
    return voucher


def deposit(session: Session, account: BillingAccount, amount_fen: int, at: datetime, reference: str = "") -> None:
    session.add(AccountDeposit(account_id=account.id, amount_fen=amount_fen, reference=reference, created_at=at))
    session.execute(update(BillingAccount).where(BillingAccount.id == account.id)
                    .values(balance_fen=BillingAccount.balance_fen + amount_fen))
    session.flush()


def post_charge(
    session: Session, world: World, account: BillingAccount, amount_fen: int, *, at: datetime,
    facility: str = "SC-UNI", voucher: Voucher | None = None, voucher_fen: int = 0, prepaid_fen: int = 0,
    discount_fen: int = 0, reverses: Charge | None = None, user: str = "bob", unit: RateUnit = RateUnit.hour,
    quantity: int = 90, description: str = "Confocal microscope 1.5 h", **extra: Any,
) -> Charge:
    """A charge of `amount_fen` (net) paid by `voucher_fen` from the voucher, `prepaid_fen` from the balance and the
    rest on the invoice. A reversal (negative) repeats the source of the charge it reverses."""
    fac = session.get(Facility, world.facilities[facility])
    assert fac is not None
    provider = session.get(Institution, fac.institution_id)
    payer = session.get(Institution, account.institution_id)
    assert provider is not None and payer is not None
    if reverses is not None:
        source_kind, source_id = reverses.source_kind, reverses.source_id
        seq = int(session.scalar(select(Charge.seq).where(Charge.source_kind == source_kind,
                                                          Charge.source_id == source_id)
                                 .order_by(Charge.seq.desc())) or 0) + 1
    else:
        source_kind, source_id, seq = SourceKind.manual, next(_sources), 1
    charge = Charge(
        account_id=account.id, user_id=user_id(session, user), facility_id=fac.id,
        provider_institution_id=provider.id, provider_region_code=provider.region_code,
        payer_institution_id=payer.id, payer_region_code=payer.region_code, source_kind=source_kind,
        source_id=source_id, seq=seq, reverses_id=reverses.id if reverses is not None else None,
        item_kind="instrument", category_code="MIC.CONF", payer_category=PayerCategory.academic_other,
        unit=unit, quantity=quantity, unit_amount_fen=abs(amount_fen + discount_fen),
        list_amount_fen=amount_fen + discount_fen, discount_fen=discount_fen, amount_fen=amount_fen,
        discount_reason="talent:tianfu 10%" if discount_fen else "", description=description,
        service_date=at.date(), posted_at=at, **extra,
    )
    session.add(charge)
    session.flush()
    if voucher_fen:
        assert voucher is not None
        session.add(VoucherRedemption(voucher_id=voucher.id, charge_id=charge.id, amount_fen=voucher_fen,
                                      created_at=at))
        session.execute(update(Voucher).where(Voucher.id == voucher.id)
                        .values(balance_fen=Voucher.balance_fen - voucher_fen))
    if prepaid_fen:
        session.add(Payment(charge_id=charge.id, account_id=account.id, method=PaymentMethod.prepaid,
                            amount_fen=prepaid_fen, created_at=at))
        session.execute(update(BillingAccount).where(BillingAccount.id == account.id)
                        .values(balance_fen=BillingAccount.balance_fen - prepaid_fen))
    due = amount_fen - voucher_fen - prepaid_fen
    if due:
        session.add(Payment(charge_id=charge.id, account_id=account.id, method=PaymentMethod.invoice,
                            amount_fen=due, created_at=at))
    session.flush()
    return charge


def reverse(session: Session, world: World, original: Charge, *, at: datetime, voucher: Voucher | None = None,
            facility: str = "SC-UNI") -> Charge:
    """The reversing charge of `original`, giving every part back."""
    parts = {p.method: p.amount_fen for p in session.scalars(select(Payment).where(Payment.charge_id == original.id))}
    redeemed = sum(session.scalars(select(VoucherRedemption.amount_fen)
                                   .where(VoucherRedemption.charge_id == original.id)))
    account = session.get(BillingAccount, original.account_id)
    assert account is not None
    return post_charge(
        session, world, account, -original.amount_fen, at=at, facility=facility, voucher=voucher,
        voucher_fen=-redeemed, prepaid_fen=-parts.get(PaymentMethod.prepaid, 0), reverses=original,
        discount_fen=-original.discount_fen, quantity=original.quantity,
        description=f"Reversal: {original.description}",
    )


def ledger_world(world: World) -> dict[str, int]:
    """A month of activity on three accounts of both regions; ids by name.

    - CQ-GRANT (bob, CQ-UNI): two SC charges in October on the invoice, one in November;
    - CO-PREPAID (company-ish prepaid account of CQ-LAB, owner alice): a CQ voucher pays half at SC, the rest prepaid;
    - SC-GRANT (carol, SC-UNI): uses a CQ facility, paid by an SC voucher and the invoice.
    """
    ids: dict[str, int] = {}
    with world.db.unit_of_work() as s:
        grant = add_account(s, world, "CQ-GRANT", owner="bob", institution="CQ-UNI")
        prepaid = add_account(s, world, "CO-PREPAID", owner="alice", institution="CQ-LAB", prepaid=True)
        deposit(s, prepaid, 500_000, datetime(2026, 9, 20, tzinfo=UTC), "bank 0920")
        deposit(s, prepaid, 100_000, datetime(2026, 10, 20, tzinfo=UTC), "bank 1020")
        cq_voucher = add_voucher(s, prepaid, "CQV-0001", issuer="CQ")
        sc = add_account(s, world, "SC-GRANT", owner="carol", institution="SC-UNI")
        sc_voucher = add_voucher(s, sc, "SCV-0001", issuer="SC", amount_fen=200_000)
        ids["grant"], ids["prepaid"], ids["sc"] = grant.id, prepaid.id, sc.id
        ids["cq_voucher"], ids["sc_voucher"] = cq_voucher.id, sc_voucher.id
        ids["g1"] = post_charge(s, world, grant, 45_000, at=OCT).id
        ids["g2"] = post_charge(s, world, grant, 12_345, at=OCT_LAST_MINUTE, discount_fen=1_372,
                                unit=RateUnit.sample, quantity=3, description="高分辨质谱 3 个样品").id
        ids["g3"] = post_charge(s, world, grant, 30_001, at=NOV_FIRST_MINUTE).id
        ids["p1"] = post_charge(s, world, prepaid, 80_001, at=OCT, voucher=cq_voucher, voucher_fen=40_000,
                                prepaid_fen=40_001).id
        ids["p2"] = post_charge(s, world, prepaid, 20_000, at=OCT_LAST_MINUTE, voucher=cq_voucher, voucher_fen=10_000,
                                prepaid_fen=5_000).id  # 5,000 fen more than the balance covered: on the invoice
        ids["s1"] = post_charge(s, world, sc, 66_667, at=OCT, facility="CQ-LAB", voucher=sc_voucher, voucher_fen=33_333,
                                user="carol").id
    return ids


def give_role(world: World, name: str, role: str, **scope: Any) -> None:
    """`name` holds `role` over the scope (facility=CODE, institution=CODE, region=CODE, or none for platform)."""
    from labcommons.identity import roles
    from labcommons.identity import service as identity

    ids: dict[str, Any] = {}
    if "facility" in scope:
        ids["facility_id"] = world.facilities[scope["facility"]]
    if "institution" in scope:
        ids["institution_id"] = world.institutions[scope["institution"]]
    if "region" in scope:
        ids["region_code"] = scope["region"]
    with world.db.unit_of_work() as s:
        roles.grant_role(s, None, identity.find_user(s, f"{name}@example.org"), role, **ids)


def add_user(world: World, name: str, institution: str = "CQ-UNI") -> dict[str, str]:
    """A new user with an API token; the headers carrying it."""
    from labcommons.identity import service as identity

    with world.db.unit_of_work() as s:
        user = identity.create_user(s, email=f"{name}@example.org", name=name.title(), institution_code=institution,
                                    password="correct horse")
        world.tokens[name] = identity.create_api_token(s, user, name="test")
    return world.headers(name)
