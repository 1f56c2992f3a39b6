"""The charge ledger: pricing bookings and orders by the rate card, posting charges, splitting each into voucher,
prepaid and invoice parts, and correcting by reversal only.

Rounding (docs/billing.md): billed minutes are rounded to the facility's increment (up, or to the nearest);
an hourly price is rate × minutes / 60 rounded half up to the fen; a talent discount is rounded half up; a
voucher pays at most floor(net × share) and never more than its balance; the prepaid balance pays what it can;
the rest goes on the invoice. Every charge satisfies net = list − discount = voucher + prepaid + invoice parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.billing import accounts, rates, talent, vouchers
from labcommons.billing.models import (
    BillingAccount,
    BillingHold,
    BillingPolicy,
    Charge,
    PayerCategory,
    Payment,
    PaymentMethod,
    RateUnit,
    SourceKind,
    VoucherRedemption,
)
from labcommons.booking.models import Booking, BookingKind, BookingStatus
from labcommons.catalog.models import Facility, Institution, Instrument, Service
from labcommons.config import get_settings
from labcommons.db import utcnow
from labcommons.errors import Conflict, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity.roles import Action
from labcommons.orders.models import OrderStatus, Quote, QuoteStatus, ServiceOrder
from labcommons.pagination import decode_keyset, encode_cursor

# A booking nobody checked out is charged this long after its end (it may still be checked out before).
CHECKOUT_GRACE = timedelta(hours=1)
MAX_QUANTITY = 1_000_000
# PostgreSQL advisory lock key serialising the numbering of manual charges ("LCMC").
MANUAL_SOURCE_LOCK = 0x4C434D43


class ChargeNotCorrectable(Conflict):
    code = "charge_not_correctable"


@dataclass(frozen=True)
class Priced:
    """A charge before it is posted: which rate, how much of it, and the discount."""

    category: PayerCategory
    assisted: bool
    rate_id: int | None
    unit: RateUnit
    quantity: int
    unit_amount_fen: int
    list_amount_fen: int
    discount_fen: int
    discount_reason: str

    @property
    def amount_fen(self) -> int:
        return self.list_amount_fen - self.discount_fen


def platform_zone() -> ZoneInfo:
    return ZoneInfo(get_settings().default_timezone)


def local_day(moment: datetime) -> date:
    return moment.astimezone(platform_zone()).date()


def _amount(unit: RateUnit, unit_fen: int, quantity: int) -> int:
    return rates.hourly_amount(unit_fen, quantity) if unit == RateUnit.hour else unit_fen * quantity


def _discount(session: Session, user_id: int, provider_region: str, on: date, list_fen: int) -> tuple[int, str]:
    basis_points, reason = talent.fee_discount(session, user_id, provider_region, on)
    if basis_points <= 0 or list_fen <= 0:
        return 0, ""
    return rates.discount_amount(list_fen, min(basis_points, 10000)), reason


def price_instrument(session: Session, instrument: Instrument, account: BillingAccount, user_id: int, *,
                     minutes: int, samples: int | None = None, assisted: bool, on: date) -> Priced | None:
    """Price instrument use for a payer on a day; None when the instrument has no rate for them."""
    payer = session.get(Institution, account.institution_id)
    assert payer is not None
    category = rates.payer_category(payer, instrument.institution_id, instrument.region_code)
    rate = rates.rate_on(session, rates.target_key(instrument_id=instrument.id), category, assisted, on)
    if rate is None:
        return None
    quantity = samples if rate.unit == RateUnit.sample and samples is not None else minutes
    if rate.unit != RateUnit.hour and samples is None:
        quantity = 1
    list_fen = _amount(rate.unit, rate.amount_fen, quantity)
    discount, reason = _discount(session, user_id, instrument.region_code, on, list_fen)
    return Priced(category, rate.assisted, rate.id, rate.unit, quantity, rate.amount_fen, list_fen, discount, reason)


def _provider(session: Session, facility_id: int) -> Institution:
    facility = session.get(Facility, facility_id)
    assert facility is not None
    institution = session.get(Institution, facility.institution_id)
    assert institution is not None
    return institution


def service_rate(session: Session, service: Service, account: BillingAccount, on: date) -> tuple[int, RateUnit] | None:
    """The rate-card price of a service for the account's category (per its unit), if the card has one."""
    payer = session.get(Institution, account.institution_id)
    assert payer is not None
    provider = _provider(session, service.facility_id)
    category = rates.payer_category(payer, provider.id, provider.region_code)
    rate = rates.rate_on(session, rates.target_key(service_id=service.id), category, False, on)
    return None if rate is None else (rate.amount_fen, rate.unit)


def order_unit_price(session: Session, order: ServiceOrder) -> int | None:
    """The rate-card price per the service's price unit for the order's account, if the card has one."""
    hold = accounts.hold_for(session, (SourceKind.order, order.id))
    service = session.get(Service, order.service_id)
    if hold is None or service is None:
        return None
    found = service_rate(session, service, accounts.get_account(session, hold.account_id),
                         local_day(order.submitted_at or utcnow()))
    if found is None or found[1].value != service.price_unit.value:
        return None
    return found[0]


def _booking_minutes(booking: Booking) -> tuple[int, int | None]:
    booked = int((booking.ends_at - booking.starts_at).total_seconds() // 60)
    actual = None
    if booking.checked_in_at is not None:
        end = booking.checked_out_at or booking.ends_at
        actual = max(0, int((end - booking.checked_in_at).total_seconds() // 60))
    return booked, actual


def _assisted(session: Session, booking: Booking, instrument: Instrument) -> bool:
    from labcommons.booking import policy as booking_policy
    from labcommons.booking.models import QualificationLevel

    level = booking_policy.live_qualification_level(session, booking.user_id, instrument, now=booking.starts_at)
    return level == QualificationLevel.assisted


def estimate_booking(session: Session, booking: Booking, instrument: Instrument, account: BillingAccount,
                     policy: BillingPolicy) -> int:
    """What a new booking will likely cost: its booked time under the facility's rounding."""
    booked, _ = _booking_minutes(booking)
    minutes = rates.billed_minutes(policy, booked=booked, actual=None, no_show=False)
    priced = price_instrument(session, instrument, account, booking.user_id, minutes=minutes,
                              assisted=_assisted(session, booking, instrument), on=local_day(booking.starts_at))
    return 0 if priced is None else max(0, priced.amount_fen)


def booking_created(session: Session, actor: Actor, booking: Booking, account_id: int | None, *,
                    now: datetime) -> BillingHold | None:
    """Attach a new booking to its funding account and hold its estimate, when its facility charges.

    Raises (and so rolls the booking back) when no usable account is named or a limit would be passed.
    """
    instrument = session.get(Instrument, booking.instrument_id)
    assert instrument is not None
    policy = rates.policy_for(session, instrument.facility_id)
    if policy is None:
        return None
    # Usable on the booking's day: an account that expires before then cannot pay for it.
    account = accounts.resolve_account(session, actor.user_id, account_id, required=policy.require_account,
                                       today=max(local_day(now), local_day(booking.starts_at)))
    if account is None:
        return None
    account = accounts.get_account(session, account.id, lock=True)
    amount = estimate_booking(session, booking, instrument, account, policy)
    return accounts.place_hold(session, account, booking.user_id, (SourceKind.booking, booking.id), amount,
                               today=local_day(now))


def _next_seq(session: Session, source: tuple[SourceKind, int]) -> int:
    last = session.scalar(select(func.max(Charge.seq)).where(Charge.source_kind == source[0],
                                                             Charge.source_id == source[1]))
    return int(last or 0) + 1


def post_charge(
    session: Session,
    *,
    account: BillingAccount,
    user_id: int,
    facility: Facility,
    provider_region_code: str,
    source: tuple[SourceKind, int],
    item_kind: str,
    category_code: str | None,
    priced: Priced,
    description: str,
    service_date: date,
    posted_by_id: int | None = None,
    note: str = "",
    seq: int | None = None,
) -> Charge:
    """Append a charge and pay it: vouchers first (up to their share), then the prepaid balance, then the invoice.

    The caller holds the account's row lock. `seq` 1 is the first charge of a source, so posting it twice fails
    on the unique (source, seq) key instead of charging twice.
    """
    charge = Charge(
        account_id=account.id, user_id=user_id, facility_id=facility.id,
        provider_institution_id=facility.institution_id, provider_region_code=provider_region_code,
        payer_institution_id=account.institution_id, payer_region_code=account.region_code,
        source_kind=source[0], source_id=source[1], seq=seq or _next_seq(session, source), item_kind=item_kind,
        category_code=category_code, payer_category=priced.category, assisted=priced.assisted,
        rate_id=priced.rate_id, unit=priced.unit, quantity=priced.quantity, unit_amount_fen=priced.unit_amount_fen,
        list_amount_fen=priced.list_amount_fen, discount_fen=priced.discount_fen,
        discount_reason=priced.discount_reason, amount_fen=priced.amount_fen, description=description[:300],
        service_date=service_date, posted_by_id=posted_by_id, note=note,
    )
    session.add(charge)
    session.flush()
    _pay(session, charge, account)
    return charge


def _pay(session: Session, charge: Charge, account: BillingAccount) -> None:
    rest = charge.amount_fen
    if rest > 0:
        cap = charge.amount_fen
        covered = 0
        for voucher in vouchers.applicable(session, account.id, provider_region_code=charge.provider_region_code,
                                           item_kind=charge.item_kind, category_code=charge.category_code,
                                           on=charge.service_date):
            taken = vouchers.take(session, voucher.id,
                                  min(vouchers.share_cap(charge.amount_fen, voucher.share_bp, covered), cap - covered))
            if taken > 0:
                session.add(VoucherRedemption(voucher_id=voucher.id, charge_id=charge.id, amount_fen=taken))
                covered += taken
        rest -= covered
    if rest > 0 and account.prepaid:
        prepaid = _take_prepaid(session, account.id, rest)
        if prepaid:
            session.add(Payment(charge_id=charge.id, account_id=account.id, method=PaymentMethod.prepaid,
                                amount_fen=prepaid))
            rest -= prepaid
    if rest != 0:
        session.add(Payment(charge_id=charge.id, account_id=account.id, method=PaymentMethod.invoice,
                            amount_fen=rest))
    session.flush()


def _take_prepaid(session: Session, account_id: int, wanted: int) -> int:
    while wanted > 0:
        balance = int(session.scalar(select(BillingAccount.balance_fen).where(BillingAccount.id == account_id)) or 0)
        amount = min(wanted, balance)
        if amount <= 0:
            return 0
        result = session.execute(
            update(BillingAccount).where(BillingAccount.id == account_id, BillingAccount.balance_fen >= amount)
            .values(balance_fen=BillingAccount.balance_fen - amount).execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            return amount
    return 0


def charge_booking(session: Session, booking: Booking, *, now: datetime | None = None) -> Charge | None:
    """Charge a finished booking to the account its hold names, once; releases the hold.

    None when the booking has no hold (its facility did not charge when it was made), is cancelled or was never
    approved, or costs nothing under the rate card.
    """
    now = now or utcnow()
    source = (SourceKind.booking, booking.id)
    hold = accounts.hold_for(session, source)
    if hold is None or hold.released_at is not None:
        return None
    if booking.kind != BookingKind.use or booking.status == BookingStatus.cancelled:
        accounts.release_hold(session, source, now=now)
        return None
    if booking.status == BookingStatus.pending:
        # A request never approved: the user never had the instrument. Once its time is over it holds nothing.
        if booking.ends_at <= now:
            accounts.release_hold(session, source, now=now)
        return None
    account = accounts.get_account(session, hold.account_id, lock=True)
    if session.scalar(select(Charge.id).where(Charge.source_kind == source[0], Charge.source_id == source[1])):
        accounts.release_hold(session, source, now=now)
        return None
    instrument = session.get(Instrument, booking.instrument_id)
    assert instrument is not None
    facility = session.get(Facility, instrument.facility_id)
    policy = rates.policy_for(session, instrument.facility_id)
    assert facility is not None
    accounts.release_hold(session, source, now=now)
    if policy is None:
        return None
    booked, actual = _booking_minutes(booking)
    minutes = rates.billed_minutes(policy, booked=booked, actual=actual, no_show=booking.no_show)
    on = local_day(booking.starts_at)
    priced = price_instrument(session, instrument, account, booking.user_id, minutes=minutes,
                              assisted=_assisted(session, booking, instrument), on=on)
    if priced is None or minutes == 0:
        return None
    what = "no-show" if booking.no_show else "use"
    return post_charge(
        session, account=account, user_id=booking.user_id, facility=facility,
        provider_region_code=instrument.region_code, source=source, item_kind="instrument",
        category_code=instrument.category_code, priced=priced, seq=1,
        description=f"{instrument.code} {instrument.name_en}: {what} {booking.starts_at.isoformat()}",
        service_date=on,
    )


def charge_due_bookings(session: Session, *, now: datetime | None = None, limit: int = 500) -> list[Charge]:
    """Charge bookings that have finished (checked out, or ended more than the grace period ago)."""
    now = now or utcnow()
    rows = session.scalars(
        select(Booking).join(BillingHold, (BillingHold.source_kind == SourceKind.booking)
                             & (BillingHold.source_id == Booking.id))
        .where(BillingHold.released_at.is_(None),
               (Booking.status == BookingStatus.completed) | (Booking.status == BookingStatus.cancelled)
               | (Booking.ends_at <= now - CHECKOUT_GRACE))
        # By account, like invoice runs: two transactions locking several accounts take them in one order.
        .order_by(BillingHold.account_id, Booking.ends_at).limit(limit)
    ).all()
    return [c for b in rows if (c := charge_booking(session, b, now=now)) is not None]


def order_account(session: Session, actor: Actor, order: ServiceOrder, account_id: int | None, *,
                  now: datetime) -> BillingHold | None:
    """Attach a new order to the account it will be charged to (no estimate until a quote is accepted)."""
    policy = rates.policy_for(session, order.facility_id)
    if policy is None:
        return None
    account = accounts.resolve_account(session, actor.user_id, account_id, required=policy.require_account,
                                       today=local_day(now))
    if account is None:
        return None
    account = accounts.get_account(session, account.id, lock=True)
    return accounts.place_hold(session, account, order.user_id, (SourceKind.order, order.id), 0,
                               today=local_day(now))


def quote_accepted(session: Session, order: ServiceOrder, quote: Quote, *, now: datetime) -> None:
    """Hold the accepted quote's total on the order's account; refuses (rolling back the acceptance) past a limit."""
    source = (SourceKind.order, order.id)
    hold = accounts.hold_for(session, source)
    if hold is None:
        return
    account = accounts.get_account(session, hold.account_id, lock=True)
    if account.id not in {a.id for a in accounts.accounts_of(session, order.user_id, usable_on=local_day(now))}:
        # The member was removed, or the account suspended, closed or expired since the order was placed.
        raise accounts.AccountNotUsable("The order's funding account can no longer be charged by you.",
                                        field="account_id")
    amount = max(0, quote.total_fen - _order_discount(session, order, quote.total_fen, now)[0])
    accounts.place_hold(session, account, order.user_id, source, amount, today=local_day(now))


def _order_discount(session: Session, order: ServiceOrder, list_fen: int, now: datetime) -> tuple[int, str]:
    return _discount(session, order.user_id, _provider(session, order.facility_id).region_code, local_day(now),
                     list_fen)


def charge_order(session: Session, order: ServiceOrder, *, now: datetime | None = None) -> Charge | None:
    """Charge a delivered order its accepted quote, once, to the account its hold names; releases the hold."""
    now = now or utcnow()
    source = (SourceKind.order, order.id)
    hold = accounts.hold_for(session, source)
    if hold is None or hold.released_at is not None:
        return None
    account = accounts.get_account(session, hold.account_id, lock=True)
    accounts.release_hold(session, source, now=now)
    if order.status in (OrderStatus.cancelled, OrderStatus.rejected):
        # Like a cancelled booking: whatever path ended the order, it is not charged.
        return None
    if session.scalar(select(Charge.id).where(Charge.source_kind == source[0], Charge.source_id == source[1])):
        return None
    quote = session.scalars(select(Quote).where(Quote.order_id == order.id, Quote.status == QuoteStatus.accepted)
                            .order_by(Quote.version.desc())).first()
    if quote is None or quote.total_fen <= 0:
        return None
    service = session.get(Service, order.service_id)
    facility = session.get(Facility, order.facility_id)
    payer = session.get(Institution, account.institution_id)
    assert service is not None and facility is not None and payer is not None
    discount, reason = _order_discount(session, order, quote.total_fen, now)
    provider = _provider(session, order.facility_id)
    priced = Priced(
        category=rates.payer_category(payer, provider.id, provider.region_code), assisted=False,
        rate_id=None, unit=RateUnit.project, quantity=1, unit_amount_fen=quote.total_fen,
        list_amount_fen=quote.total_fen, discount_fen=discount, discount_reason=reason,
    )
    return post_charge(
        session, account=account, user_id=order.user_id, facility=facility, provider_region_code=provider.region_code,
        source=source, item_kind=service.kind.value, category_code=None, priced=priced, seq=1,
        description=f"{order.number or order.id} {service.name_en} (quote v{quote.version})",
        service_date=local_day(now),
    )


def get_charge(session: Session, charge_id: int) -> Charge:
    charge = session.get(Charge, charge_id)
    if charge is None:
        raise NotFound(f"Charge {charge_id} does not exist.", field="charge_id")
    return charge


def require_facility_billing(session: Session, actor: Actor | None, facility_id: int) -> Facility:
    facility = session.get(Facility, facility_id)
    if facility is None:
        raise NotFound(f"Facility {facility_id} does not exist.", field="facility_id")
    if actor is not None:
        roles.require(actor, Action.manage_facility_billing, facility=roles.FacilityRef.of(facility))
    return facility


def reverse_charge(session: Session, actor: Actor | None, charge_id: int, *, note: str,
                   now: datetime | None = None) -> Charge:
    """Cancel a charge by a reversing entry that gives back exactly what each part paid."""
    original = get_charge(session, charge_id)
    require_facility_billing(session, actor, original.facility_id)
    if not note.strip():
        raise InvalidInput("Say why the charge is corrected.", field="note", code="missing_field")
    if original.reverses_id is not None:
        raise ChargeNotCorrectable("A reversal is not reversed; post a new charge instead.", field="charge_id")
    # Locked before looking for an earlier reversal: two concurrent corrections then take turns, and the second
    # sees the first's reversal (409) instead of failing on the unique reverses_id.
    accounts.get_account(session, original.account_id, lock=True)
    if session.scalar(select(Charge.id).where(Charge.reverses_id == original.id)) is not None:
        raise ChargeNotCorrectable("This charge was reversed already.", field="charge_id", code="already_reversed")
    reversal = Charge(
        account_id=original.account_id, user_id=original.user_id, facility_id=original.facility_id,
        provider_institution_id=original.provider_institution_id,
        provider_region_code=original.provider_region_code, payer_institution_id=original.payer_institution_id,
        payer_region_code=original.payer_region_code, source_kind=original.source_kind,
        source_id=original.source_id, seq=_next_seq(session, (original.source_kind, original.source_id)),
        reverses_id=original.id, item_kind=original.item_kind, category_code=original.category_code,
        payer_category=original.payer_category, assisted=original.assisted, rate_id=original.rate_id,
        unit=original.unit, quantity=-original.quantity, unit_amount_fen=original.unit_amount_fen,
        list_amount_fen=-original.list_amount_fen, discount_fen=-original.discount_fen,
        discount_reason=original.discount_reason, amount_fen=-original.amount_fen,
        description=f"Reversal of charge {original.id}: {original.description}"[:300],
        service_date=original.service_date, posted_at=now or utcnow(),
        posted_by_id=actor.user_id if actor else None, note=note.strip(),
    )
    session.add(reversal)
    session.flush()
    for redemption in session.scalars(select(VoucherRedemption).where(VoucherRedemption.charge_id == original.id)):
        vouchers.give_back(session, redemption.voucher_id, redemption.amount_fen)
        session.add(VoucherRedemption(voucher_id=redemption.voucher_id, charge_id=reversal.id,
                                      amount_fen=-redemption.amount_fen))
    for payment in session.scalars(select(Payment).where(Payment.charge_id == original.id)):
        if payment.method == PaymentMethod.prepaid:
            session.execute(update(BillingAccount).where(BillingAccount.id == payment.account_id)
                            .values(balance_fen=BillingAccount.balance_fen + payment.amount_fen)
                            .execution_options(synchronize_session=False))
        session.add(Payment(charge_id=reversal.id, account_id=payment.account_id, method=payment.method,
                            amount_fen=-payment.amount_fen))
    session.flush()
    return reversal


def correct_charge(session: Session, actor: Actor | None, charge_id: int, *, note: str,
                   quantity: int | None = None, amount_fen: int | None = None,
                   now: datetime | None = None) -> tuple[Charge, Charge | None]:
    """Reverse a charge and post its corrected replacement (a new quantity at the same rate, or a new net
    amount); quantity 0 or amount 0 only reverses."""
    original = get_charge(session, charge_id)
    if quantity is not None and (isinstance(quantity, bool) or not 0 <= quantity <= MAX_QUANTITY):
        raise InvalidInput("The quantity must be 0 to 1,000,000.", field="quantity", code="out_of_range")
    if amount_fen is not None and (isinstance(amount_fen, bool) or not 0 <= amount_fen <= 10_000_000_000):
        raise InvalidInput("The amount must be 0 or more fen.", field="amount_fen", code="out_of_range")
    if quantity is None and amount_fen is None:
        raise InvalidInput("Give the corrected quantity or amount.", field="quantity", code="missing_field")
    reversal = reverse_charge(session, actor, charge_id, note=note, now=now)
    if quantity is not None:
        list_fen = _amount(original.unit, original.unit_amount_fen, quantity)
        discount, reason = (0, "")
        if original.discount_fen:
            discount, reason = _discount(session, original.user_id, original.provider_region_code,
                                         original.service_date, list_fen)
        priced = Priced(original.payer_category, original.assisted, original.rate_id, original.unit, quantity,
                        original.unit_amount_fen, list_fen, discount, reason)
    else:
        # A corrected amount is a lump sum: one unit at that price, no rate behind it (so a later correction by
        # quantity cannot multiply it as if it were the hourly rate).
        list_fen, discount = int(amount_fen or 0), 0
        priced = Priced(original.payer_category, original.assisted, None, RateUnit.project, 1, list_fen, list_fen,
                        0, "")
    if list_fen - discount <= 0:
        return reversal, None
    account = accounts.get_account(session, original.account_id, lock=True)
    facility = session.get(Facility, original.facility_id)
    assert facility is not None
    replacement = post_charge(
        session, account=account, user_id=original.user_id, facility=facility,
        provider_region_code=original.provider_region_code, source=(original.source_kind, original.source_id),
        item_kind=original.item_kind, category_code=original.category_code, priced=priced,
        description=original.description, service_date=original.service_date,
        posted_by_id=actor.user_id if actor else None, note=note.strip(),
    )
    return reversal, replacement


def post_manual_charge(
    session: Session, actor: Actor | None, *, facility_id: int, account_id: int, user_id: int, description: str,
    amount_fen: int, service_date: date, item_kind: str = "consultation", note: str = "",
) -> Charge:
    """Staff charge something outside bookings and orders (consumables, a consultation hour) to an account the
    user is a member of."""
    facility = require_facility_billing(session, actor, facility_id)
    if isinstance(amount_fen, bool) or not isinstance(amount_fen, int) or not 0 < amount_fen <= 10_000_000_000:
        raise InvalidInput("The amount must be a positive whole number of fen.", field="amount_fen",
                           code="out_of_range")
    description = (description or "").strip()
    if not description or len(description) > 300:
        raise InvalidInput("Describe the charge (300 characters at most).", field="description",
                           code="missing_field")
    if item_kind not in vouchers.ITEM_KINDS:
        raise InvalidInput("Unknown kind.", field="item_kind", code="invalid_choice", allowed=list(vouchers.ITEM_KINDS))
    if account_id not in {a.id for a in accounts.accounts_of(session, user_id, usable_on=service_date)}:
        raise InvalidInput("The user is not a member of this account.", field="account_id",
                           code="account_not_usable")
    account = accounts.get_account(session, account_id, lock=True)
    institution = session.get(Institution, facility.institution_id)
    payer = session.get(Institution, account.institution_id)
    assert institution is not None and payer is not None
    if session.get_bind().dialect.name == "postgresql":
        # The source number is max + 1: postings to different accounts (different row locks) would read the same
        # max and one would fail on the unique (source, seq) key, so they take turns on one advisory lock, held to
        # the end of the transaction. SQLite writers are serialised already.
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MANUAL_SOURCE_LOCK})
    source_id = int(session.scalar(select(func.coalesce(func.max(Charge.source_id), 0))
                                   .where(Charge.source_kind == SourceKind.manual)) or 0) + 1
    priced = Priced(rates.payer_category(payer, institution.id, institution.region_code), False, None,
                    RateUnit.project, 1, amount_fen, amount_fen, 0, "")
    return post_charge(
        session, account=account, user_id=user_id, facility=facility, provider_region_code=institution.region_code,
        source=(SourceKind.manual, source_id), item_kind=item_kind, category_code=None, priced=priced,
        description=description, service_date=service_date, posted_by_id=actor.user_id if actor else None,
        note=note, seq=1,
    )


def charges_of_account(session: Session, account_id: int, *, limit: int = 200) -> Sequence[Charge]:
    return session.scalars(select(Charge).where(Charge.account_id == account_id)
                           .order_by(Charge.posted_at.desc(), Charge.id.desc()).limit(limit)).all()


def charges_of_facility(session: Session, actor: Actor, facility_id: int, *, limit: int = 200) -> Sequence[Charge]:
    require_facility_billing(session, actor, facility_id)
    return session.scalars(select(Charge).where(Charge.facility_id == facility_id)
                           .order_by(Charge.posted_at.desc(), Charge.id.desc()).limit(limit)).all()


@dataclass(frozen=True)
class ChargeParts:
    voucher_fen: int
    prepaid_fen: int
    invoice_fen: int


def parts_of_charges(session: Session, charge_ids: Sequence[int]) -> dict[int, ChargeParts]:
    """How each charge was paid, by part: two grouped queries per 500 charges, for lists and invoices."""
    sums: dict[int, dict[str, int]] = {i: {"voucher": 0, PaymentMethod.prepaid: 0, PaymentMethod.invoice: 0}
                                       for i in charge_ids}
    for start in range(0, len(charge_ids), 500):
        chunk = list(charge_ids[start:start + 500])
        for charge_id, amount in session.execute(
            select(VoucherRedemption.charge_id, func.sum(VoucherRedemption.amount_fen))
            .where(VoucherRedemption.charge_id.in_(chunk)).group_by(VoucherRedemption.charge_id)
        ):
            sums[charge_id]["voucher"] = int(amount)
        for charge_id, method, amount in session.execute(
            select(Payment.charge_id, Payment.method, func.sum(Payment.amount_fen))
            .where(Payment.charge_id.in_(chunk)).group_by(Payment.charge_id, Payment.method)
        ):
            sums[charge_id][method] = int(amount)
    return {i: ChargeParts(s["voucher"], s[PaymentMethod.prepaid], s[PaymentMethod.invoice]) for i, s in sums.items()}


def parts_of(session: Session, charge_id: int) -> ChargeParts:
    """How a charge was paid, by part."""
    return parts_of_charges(session, [charge_id])[charge_id]


def charges_page(session: Session, *, account_id: int | None = None, facility_id: int | None = None,
                 limit: int, cursor: str | None = None) -> tuple[list[Charge], str | None]:
    """An account's or a facility's charges, newest first by id, keyset-paged (ids only grow, so the order is
    posting order); returns the rows and the next page's cursor."""
    stmt = select(Charge)
    if account_id is not None:
        stmt = stmt.where(Charge.account_id == account_id)
    if facility_id is not None:
        stmt = stmt.where(Charge.facility_id == facility_id)
    if cursor:
        _rank, last_id = decode_keyset(cursor)
        stmt = stmt.where(Charge.id < last_id)
    rows = list(session.scalars(stmt.order_by(Charge.id.desc()).limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    return rows[:limit], encode_cursor([rows[limit - 1].id])


def require_account_reader(session: Session, actor: Actor, account_id: int) -> BillingAccount:
    """The account if the actor may read its ledger (owner, approved member, its admins); else 404."""
    return accounts.visible_account(session, actor, account_id)


