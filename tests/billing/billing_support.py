"""Builders for billing tests through the real billing services: a company, a charging facility with a rate card,
funding accounts, deposits and vouchers, bookings charged to them, and a checker of the ledger's invariants."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from labcommons.billing import accounts, ledger, rates, vouchers
from labcommons.billing.models import (
    AccountDeposit,
    AccountKind,
    BillingAccount,
    Charge,
    Payment,
    PaymentMethod,
    SourceKind,
    Voucher,
    VoucherRecognition,
    VoucherRedemption,
)
from labcommons.booking import service as booking_service
from labcommons.booking.models import Booking
from labcommons.catalog.models import Institution, InstitutionKind
from labcommons.db import Database
from labcommons.identity import service as identity
from labcommons.orders.models import ServiceOrder
from tests.factories import World

# Hourly CONF prices by payer category (fen per hour): deliberately odd so rounding shows.
CONF_RATES: dict[str, int] = {
    "internal": 6_000,
    "academic_region": 10_000,
    "academic_other": 12_345,
    "industry": 30_001,
}
COMPANY = "CQ-CO"  # a company institution in Chongqing; its user is "dave"
LONG_AGO = date(2020, 1, 1)


def today() -> date:
    """The platform's today (the day billing uses for validity and rates)."""
    return ledger.local_day(datetime.now(ledger.platform_zone()))


def add_company(world: World, code: str = COMPANY, region: str = "CQ", user: str = "dave") -> int:
    """A company institution with one user (`user`@example.org, an actor and a token in `world`)."""
    with world.db.unit_of_work() as s:
        inst = Institution(code=code, region_code=region, kind=InstitutionKind.company, name_zh=f"{code} 公司",
                           name_en=f"{code} Ltd")
        s.add(inst)
        s.flush()
        world.institutions[code] = inst.id
        created = identity.create_user(s, email=f"{user}@example.org", name=user.title(), institution_code=code,
                                       password="correct horse")
        world.tokens[user] = identity.create_api_token(s, created, name="test")
    with world.db.unit_of_work(write=False) as s:
        world.actors[user] = identity.actor_for(identity.find_user(s, f"{user}@example.org"))
    return world.institutions[code]


def charging(world: World, facility: str = "CQ-LAB", **policy: Any) -> None:
    """Make a facility charge (a BillingPolicy row), with optional rules (basis, increment_minutes, ...)."""
    with world.db.unit_of_work() as s:
        rates.save_policy(s, None, world.facilities[facility], **policy)


def add_rate(world: World, *, instrument: str | None = "CONF", service_id: int | None = None,
             category: str = "academic_other", amount_fen: int = 12_345, unit: str = "hour", assisted: bool = False,
             effective_from: date = LONG_AGO) -> int:
    """One rate-card price (by the platform, so any start day is allowed); its id."""
    with world.db.unit_of_work() as s:
        rate = rates.set_rate(
            s, None, instrument_id=None if service_id is not None else world.instruments[str(instrument)],
            service_id=service_id, category=category, assisted=assisted, unit=unit, amount_fen=amount_fen,
            effective_from=effective_from,
        )
        return rate.id


def rate_card(world: World, instrument: str = "CONF", prices: dict[str, int] | None = None) -> None:
    """Hourly prices of an instrument for every payer category (default CONF_RATES), in force since LONG_AGO."""
    for category, amount in (prices or CONF_RATES).items():
        add_rate(world, instrument=instrument, category=category, amount_fen=amount)


def open_account(world: World, owner: str, code: str, *, kind: AccountKind | str = AccountKind.grant,
                 prepaid: bool = False, limit_fen: int | None = None, valid_until: date | None = None,
                 members: tuple[str, ...] = (), member_limit_fen: int | None = None) -> int:
    """An account `owner` opens for themselves, with `members` added by the owner (approved); its id."""
    actor = world.actors[owner]
    with world.db.unit_of_work() as s:
        account = accounts.create_account(s, actor, code=code, name=f"Account {code}", kind=kind, prepaid=prepaid,
                                          limit_fen=limit_fen, valid_until=valid_until)
        for name in members:
            accounts.add_member(s, actor, account.id, world.actors[name].user_id, limit_fen=member_limit_fen)
        return account.id


def fund(world: World, account_id: int, amount_fen: int, reference: str = "bank transfer") -> None:
    """A deposit into a prepaid account (recorded by the platform)."""
    with world.db.unit_of_work() as s:
        accounts.record_deposit(s, None, account_id, amount_fen, reference=reference)


def give_voucher(world: World, account_id: int, amount_fen: int, *, issuer: str = "CQ", share_bp: int = 5000,
                 kinds: str | None = None, categories: str | None = None, valid_from: date | None = None,
                 valid_until: date | None = None, code: str | None = None) -> int:
    """A voucher issued by the platform on behalf of `issuer`, valid from yesterday for a year by default; its id."""
    now = today()
    with world.db.unit_of_work() as s:
        voucher = vouchers.issue_voucher(
            s, None, issuer_region_code=issuer, account_id=account_id, amount_fen=amount_fen,
            valid_from=valid_from or now - timedelta(days=1), valid_until=valid_until or now + timedelta(days=365),
            share_bp=share_bp, eligible_kinds=kinds, eligible_categories=categories, code=code,
        )
        return voucher.id


def book(world: World, user: str, start: datetime, minutes: int = 120, *, instrument: str = "CONF",
         account_id: int | None = None) -> int:
    """A booking of `user` through the real booking service (holding its estimate when the facility charges)."""
    with world.db.unit_of_work() as s:
        booking = booking_service.reserve_slot(s, world.actors[user], world.instruments[instrument], start,
                                               start + timedelta(minutes=minutes), account_id=account_id)
        return booking.id


def charge_of(session: Session, kind: SourceKind | str, source_id: int) -> list[Charge]:
    """The charges of one source, in sequence order."""
    return list(session.scalars(select(Charge).where(Charge.source_kind == SourceKind(kind),
                                                     Charge.source_id == source_id).order_by(Charge.seq)))


def balance_of(world: World, *, account_id: int | None = None, voucher_id: int | None = None) -> int:
    """The prepaid balance of an account or the balance of a voucher, read fresh."""
    with world.db.unit_of_work(write=False) as s:
        if voucher_id is not None:
            return int(s.scalar(select(Voucher.balance_fen).where(Voucher.id == voucher_id)) or 0)
        return int(s.scalar(select(BillingAccount.balance_fen).where(BillingAccount.id == account_id)) or 0)


@dataclass
class BillingWorld:
    """The standard billing set-up on top of `world`: CQ-LAB charges for CONF at CONF_RATES.

    Accounts: carol's SC grant (academic_other at CQ-LAB), bob's CQ grant (academic_region), alice's CQ-LAB grant
    (internal), dave's prepaid company account (industry).
    """

    world: World
    carol_grant: int
    bob_grant: int
    alice_grant: int
    company: int


def billing_world(world: World, *, policy: dict[str, Any] | None = None) -> BillingWorld:
    """Build the standard billing set-up (see BillingWorld)."""
    add_company(world)
    charging(world, **(policy or {}))
    rate_card(world)
    return BillingWorld(
        world=world,
        carol_grant=open_account(world, "carol", "SC-GRANT-1"),
        bob_grant=open_account(world, "bob", "CQ-GRANT-1"),
        alice_grant=open_account(world, "alice", "LAB-GRANT-1"),
        company=open_account(world, "dave", "CO-ACC-1", kind=AccountKind.company, prepaid=True),
    )


@contextmanager
def recognition_restored(db: Database) -> Iterator[None]:
    """Put voucher_recognition back as it was afterwards (it is reference data, kept between PostgreSQL tests)."""
    with db.unit_of_work(write=False) as s:
        saved = [(r.issuer_region_code, r.provider_region_code) for r in s.scalars(select(VoucherRecognition))]
    try:
        yield
    finally:
        with db.unit_of_work() as s:
            s.execute(delete(VoucherRecognition))
            s.add_all([VoucherRecognition(issuer_region_code=i, provider_region_code=p) for i, p in saved])


def _sums(session: Session, column: Any, key: Any) -> dict[int, int]:
    return {int(k): int(v) for k, v in session.execute(select(key, func.sum(column)).group_by(key)).all()}


def check_ledger(session: Session) -> None:
    """Assert the ledger's invariants over the whole database.

    Every charge is paid exactly (Σ payments + Σ redemptions = amount); each voucher's balance is its amount less
    its redemptions, within [0, amount]; each prepaid balance is its deposits less its prepaid payments, ≥ 0; a
    reversal mirrors its original; every charge's booking or order exists.
    """
    paid = _sums(session, Payment.amount_fen, Payment.charge_id)
    redeemed = _sums(session, VoucherRedemption.amount_fen, VoucherRedemption.charge_id)
    charges = list(session.scalars(select(Charge)))
    by_id = {c.id: c for c in charges}
    for charge in charges:
        assert charge.amount_fen == paid.get(charge.id, 0) + redeemed.get(charge.id, 0), charge.id
        assert charge.amount_fen == charge.list_amount_fen - charge.discount_fen
        if charge.reverses_id is not None:
            original = by_id[charge.reverses_id]
            assert charge.amount_fen == -original.amount_fen
            assert (charge.source_kind, charge.source_id) == (original.source_kind, original.source_id)
            assert redeemed.get(charge.id, 0) == -redeemed.get(original.id, 0)
        else:
            assert charge.amount_fen >= 0
        model = {SourceKind.booking: Booking, SourceKind.order: ServiceOrder}.get(charge.source_kind)
        if model is not None:
            assert session.get(model, charge.source_id) is not None, f"charge {charge.id} without its source"
    total = sum(c.amount_fen for c in charges)
    assert total == sum(paid.values()) + sum(redeemed.values())
    by_voucher = _sums(session, VoucherRedemption.amount_fen, VoucherRedemption.voucher_id)
    for voucher in session.scalars(select(Voucher).execution_options(populate_existing=True)):
        assert voucher.balance_fen == voucher.amount_fen - by_voucher.get(voucher.id, 0), voucher.code
        assert 0 <= voucher.balance_fen <= voucher.amount_fen
    deposited = _sums(session, AccountDeposit.amount_fen, AccountDeposit.account_id)
    prepaid = {int(k): int(v) for k, v in session.execute(
        select(Payment.account_id, func.sum(Payment.amount_fen)).where(Payment.method == PaymentMethod.prepaid)
        .group_by(Payment.account_id)).all()}
    for account in session.scalars(select(BillingAccount).execution_options(populate_existing=True)):
        assert account.balance_fen == deposited.get(account.id, 0) - prepaid.get(account.id, 0), account.code
        assert account.balance_fen >= 0


def net_of_source(session: Session, kind: SourceKind | str, source_id: int) -> int:
    """What a booking, order or manual source has been charged in total (reversals net to zero)."""
    return int(session.scalar(select(func.coalesce(func.sum(Charge.amount_fen), 0))
                              .where(Charge.source_kind == SourceKind(kind), Charge.source_id == source_id)) or 0)
