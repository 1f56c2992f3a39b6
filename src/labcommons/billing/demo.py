"""A month of demo billing: facilities that charge, their rate cards, a Sichuan grant and a Chongqing company's
prepaid account with an innovation voucher, last month's bookings and orders charged through the ledger, one
correction, and last month's invoices. Everything goes through the billing services, so the parts are real."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from labcommons.billing import accounts, invoices, ledger, rates, vouchers
from labcommons.billing.models import (
    AccountDeposit,
    AccountKind,
    AccountMember,
    BillingAccount,
    BillingHold,
    Charge,
    PayerCategory,
    Payment,
    RateUnit,
    SourceKind,
    Voucher,
    VoucherRedemption,
)
from labcommons.booking import usage
from labcommons.booking.models import Booking, BookingStatus
from labcommons.catalog.models import Facility, Instrument, InstrumentStatus, Service
from labcommons.orders import quotes, results, samples
from labcommons.orders import service as orders
from labcommons.orders.demo import _actor, _staff_of
from labcommons.orders.models import OrderStatus

S = OrderStatus

# (facility, basis, increment minutes, rounding): two facilities per region, each rule shown once.
POLICIES: tuple[tuple[str, str, int, str], ...] = (
    ("SC-SHU-LIFE", "actual", 15, "up"),
    ("SC-SHU-ATC", "booked", 30, "nearest"),
    ("SC-SCC-HPC", "greater", 60, "up"),
    ("CQ-LAKE-BIO", "actual", 15, "up"),
    ("CQ-LAKE-STO", "booked", 60, "up"),
)
# Unassisted hourly price for an academic of the provider's region, by top-level category (fen per hour).
HOURLY_BASE_FEN = {"MIC": 40_000, "CYT": 30_000, "GEN": 50_000, "ANA": 35_000, "CMP": 2_000}
DEFAULT_HOURLY_FEN = 30_000
# Each category's price relative to the academic price of the region, in percent; assisted use costs half more.
CATEGORY_PERCENT = {
    PayerCategory.internal: 60,
    PayerCategory.academic_region: 100,
    PayerCategory.academic_other: 120,
    PayerCategory.industry: 200,
}
SERVICE_PERCENT = {
    PayerCategory.internal: 70,
    PayerCategory.academic_region: 100,
    PayerCategory.academic_other: 110,
    PayerCategory.industry: 150,
}
ASSISTED_PERCENT = 150

GRANT_CODE = "SCNSF-2026-0417"
COMPANY_CODE = "JLBIO-PRE-001"
VOUCHER_CODE = "CQ-IV-2026-0088"
PI = "liu.zimo@xlut.example.cn"
GRANT_MEMBERS = (("zhao.xue@jincheng-hosp.example.cn", 800_000), ("emily.carter@shudu-univ.example.org", 500_000))
COMPANY_OWNER = "zhou.hang@jialingbio.example.com"
DEPOSIT_FEN = 2_000_000
VOUCHER_FEN = 3_000_000

# Last month's instrument use: (day of the month, local start, minutes booked, who, instrument, account,
# minutes actually used or None for a no-show, purpose).
BOOKINGS: tuple[tuple[int, time, int, str, str, str, int | None, str], ...] = (
    (3, time(10), 120, COMPANY_OWNER, "SC-SHU-LIFE-003", COMPANY_CODE, 110, "Organoid imaging, batch 7"),
    (5, time(9), 180, PI, "SC-SHU-ATC-003", GRANT_CODE, 170, "Photoresist degradation products"),
    (8, time(14), 90, COMPANY_OWNER, "SC-SHU-LIFE-002", COMPANY_CODE, 95, "CAR-T phenotyping panel"),
    (10, time(9), 120, GRANT_MEMBERS[0][0], "SC-SHU-LIFE-001", GRANT_CODE, 100, "Cohort PBMC sorting"),
    (12, time(8), 480, GRANT_MEMBERS[1][0], "SC-SCC-HPC-001", GRANT_CODE, 500, "Molecular dynamics, 2 µs"),
    (15, time(9), 60, COMPANY_OWNER, "SC-SHU-LIFE-003", COMPANY_CODE, None, "Follow-up imaging"),
    (18, time(10), 60, GRANT_MEMBERS[0][0], "SC-SHU-ATC-005", GRANT_CODE, 60, "Bone mineral phase check"),
    (20, time(13), 120, COMPANY_OWNER, "CQ-LAKE-BIO-001", COMPANY_CODE, 115, "Live-cell time-lapse"),
)
# The booking whose charge staff correct, the minutes it really took, the day of the correction and why.
CORRECTED = ("SC-SHU-ATC-005", 30, 24, "The diffractometer stopped after 30 minutes (X-ray tube fault).")
# Last month's delivered orders: (day delivered, who, service, account, samples, quote line or None for the rate
# card's price, title).
ORDERS: tuple[tuple[int, str, str, str, int, tuple[str, int, int] | None, str], ...] = (
    (22, COMPANY_OWNER, "CQ-LAKE-STO-S01", COMPANY_CODE, 1, None, "Stereo-seq of one tumour section"),
    (26, PI, "SC-SCC-HPC-S01", GRANT_CODE, 0, ("Code porting and profiling, hours", 3, 200_000),
     "Porting a laser-ablation solver to the domestic accelerator"),
)

_STAMPED = (Charge, Payment, VoucherRedemption, BillingHold, AccountDeposit, AccountMember, BillingAccount, Voucher)


@dataclass
class BillingSeed:
    accounts: int = 0
    charges: int = 0
    invoices: list[str] = field(default_factory=list)


class _Clock:
    """The demo's moment: ledger rows written inside `running` carry it instead of the wall clock."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def _stamp(self, session: Session, _context: Any, _instances: Any) -> None:
        for row in session.new:
            if not isinstance(row, _STAMPED):
                continue
            for name in ("posted_at", "created_at", "requested_at"):
                if hasattr(row, name) and getattr(row, name) is None:
                    setattr(row, name, self.at)

    @contextmanager
    def running(self, session: Session) -> Iterator[_Clock]:
        # post_charge stamps posted_at with the wall clock and the ledger is append-only, so a month in the past
        # can only be written by setting the time before the rows are inserted.
        event.listen(session, "before_flush", self._stamp)
        try:
            yield self
        finally:
            event.remove(session, "before_flush", self._stamp)


def _month_start(now: datetime) -> date:
    """The first day of the month before `now`'s, in the platform's zone."""
    local = now.astimezone(ledger.platform_zone()).date()
    return (local.replace(day=1) - timedelta(days=1)).replace(day=1)


def _moment(day: date, at: time) -> datetime:
    return datetime.combine(day, at, tzinfo=ledger.platform_zone()).astimezone(UTC)


def _round_yuan(fen: int) -> int:
    return (fen + 50) // 100 * 100


def _set_rate_cards(session: Session, facility: Facility, since: date) -> None:
    with session.no_autoflush:  # set_rate flushes each new price itself; autoflushing its lookups too is slow
        _set_rates(session, facility, since)


def _set_rates(session: Session, facility: Facility, since: date) -> None:
    for instrument in session.scalars(select(Instrument).where(Instrument.facility_id == facility.id,
                                                               Instrument.status != InstrumentStatus.retired)):
        base = HOURLY_BASE_FEN.get(instrument.category_code.split(".")[0], DEFAULT_HOURLY_FEN)
        for category, percent in CATEGORY_PERCENT.items():
            price = base * percent // 100
            for assisted, amount in ((False, price), (True, price * ASSISTED_PERCENT // 100)):
                rates.set_rate(session, None, instrument_id=instrument.id, category=category, assisted=assisted,
                               unit=RateUnit.hour, amount_fen=_round_yuan(amount), effective_from=since)
    for service in session.scalars(select(Service).where(Service.facility_id == facility.id)):
        if service.list_price_fen is None:
            continue
        for category, percent in SERVICE_PERCENT.items():
            rates.set_rate(session, None, service_id=service.id, category=category,
                           unit=RateUnit(service.price_unit.value),
                           amount_fen=_round_yuan(service.list_price_fen * percent // 100), effective_from=since)


def _open_accounts(session: Session, first: date) -> dict[str, int]:
    pi = _actor(session, PI)
    grant = accounts.create_account(
        session, pi, code=GRANT_CODE,
        name="四川省自然科学基金：超快激光加工的界面表征 / Interfaces in ultrafast laser machining",
        kind=AccountKind.grant, limit_fen=5_000_000, valid_until=date(first.year + 2, 12, 31),
    )
    for email, limit in GRANT_MEMBERS:
        accounts.add_member(session, pi, grant.id, _actor(session, email).user_id, limit_fen=limit)
    owner = _actor(session, COMPANY_OWNER)
    company = accounts.create_account(session, owner, code=COMPANY_CODE, name="嘉陵生物研发服务预付账户 / Jialing "
                                      "Biopharma prepaid account", kind=AccountKind.company, prepaid=True)
    accounts.record_deposit(session, None, company.id, DEPOSIT_FEN, reference="Bank transfer JL-2026-031")
    # A Chongqing voucher, recognised by Sichuan's providers through the default mutual-recognition policy.
    vouchers.issue_voucher(
        session, None, issuer_region_code="CQ", account_id=company.id, amount_fen=VOUCHER_FEN, share_bp=5000,
        valid_from=first, valid_until=first + timedelta(days=365), name="重庆市科技创新券 2026 / Chongqing innovation "
        "voucher 2026", eligible_kinds="instrument testing", code=VOUCHER_CODE,
    )
    return {GRANT_CODE: grant.id, COMPANY_CODE: company.id}


def _book_and_use(session: Session, clock: _Clock, first: date, account_ids: dict[str, int]) -> dict[str, int]:
    """Last month's bookings, made three days ahead, used (or missed) and charged; booking id per instrument."""
    made: dict[str, int] = {}
    for day, at, minutes, email, code, account, used, purpose in BOOKINGS:
        actor = _actor(session, email)
        instrument = session.scalars(select(Instrument).where(Instrument.code == code)).one()
        starts_at = _moment(first + timedelta(days=day - 1), at)
        ends_at = starts_at + timedelta(minutes=minutes)
        clock.at = starts_at - timedelta(days=3)
        # Written directly: the booking rules refuse starts in the past; billing is attached as reserve_slot does.
        booking = Booking(instrument_id=instrument.id, user_id=actor.user_id, starts_at=starts_at, ends_at=ends_at,
                          status=BookingStatus.confirmed, purpose=purpose, created_at=clock.at)
        session.add(booking)
        session.flush()
        ledger.booking_created(session, actor, booking, account_ids[account], now=clock.at)
        made[code] = booking.id
        if used is None:
            clock.at = ends_at + ledger.CHECKOUT_GRACE + timedelta(minutes=5)
            usage.mark_no_shows(session, now=starts_at + timedelta(minutes=usage.DEFAULT_NO_SHOW_GRACE_MINUTES + 1))
            ledger.charge_due_bookings(session, now=clock.at)
            continue
        usage.check_in(session, booking, now=starts_at + timedelta(minutes=3))
        clock.at = starts_at + timedelta(minutes=3 + used)
        usage.check_out(session, booking, now=clock.at)
    return made


def _deliver_orders(session: Session, clock: _Clock, first: date, account_ids: dict[str, int]) -> None:
    """Orders placed today through the order services, then charged on their (last month's) delivery day."""
    for day, email, code, account, sample_count, line, title in ORDERS:
        service = session.scalars(select(Service).where(Service.code == code)).one()
        customer = _actor(session, email)
        order = orders.create_order(session, customer, service.id, title=title, sample_count=sample_count,
                                    description="Demo order charged to a funding account.",
                                    account_id=account_ids[account])
        orders.transition(session, customer, order.id, S.submitted)
        staff = _staff_of(session, order)
        assert staff is not None, code
        quote = quotes.current_quote(session, order)
        if quote is None:
            assert line is not None, code
            quote = quotes.issue_quote(session, staff, order.id, [line], orders.facility_today() + timedelta(days=30),
                                       note="Demo quote")
        quotes.accept_quote(session, customer, order.id, quote.id)
        samples.register_samples(session, staff, order.id, count=max(sample_count, 1), receive=True,
                                 location="Sample room, shelf B2")
        orders.transition(session, staff, order.id, S.in_progress)
        results.store_result(session, staff, order.id, filename="report-demo.txt", content_type="text/plain",
                             kind="report", stream=b"Demo report\n")
        # Charged as of its delivery day last month; the delivery transition then finds the hold released.
        clock.at = _moment(first + timedelta(days=day - 1), time(17))
        ledger.charge_order(session, order, now=clock.at)
        orders.transition(session, staff, order.id, S.results_delivered)
        orders.transition(session, customer, order.id, S.closed)


def seed_billing(session: Session, *, now: datetime) -> BillingSeed:
    """Seed the month before `now` with billing activity and invoice it; does nothing when already seeded."""
    seeded = BillingSeed()
    if session.scalar(select(BillingAccount.id).where(BillingAccount.code == GRANT_CODE)) is not None:
        return seeded
    if session.scalar(select(Facility.id).where(Facility.code == POLICIES[0][0])) is None:
        return seeded  # no demo catalogue to bill
    first = _month_start(now)
    clock = _Clock(_moment(first, time(9)))
    with clock.running(session):
        for code, basis, increment, rounding in POLICIES:
            facility = session.scalars(select(Facility).where(Facility.code == code)).one()
            rates.save_policy(session, None, facility.id, basis=basis, increment_minutes=increment, rounding=rounding,
                              charge_no_show=True, require_account=True)
            _set_rate_cards(session, facility, first - timedelta(days=90))
        account_ids = _open_accounts(session, first)
        seeded.accounts = len(account_ids)
        booked = _book_and_use(session, clock, first, account_ids)
        code, minutes, day, note = CORRECTED
        clock.at = _moment(first + timedelta(days=day - 1), time(11))
        charge = session.scalars(select(Charge).where(Charge.source_id == booked[code],
                                                      Charge.source_kind == SourceKind.booking)).one()
        ledger.correct_charge(session, None, charge.id, quantity=minutes, note=note, now=clock.at)
        _deliver_orders(session, clock, first, account_ids)
    seeded.charges = len(session.scalars(select(Charge.id)).all())
    made = invoices.generate_invoices(session, invoices.previous_period(now), now=now)
    seeded.invoices = [invoice.number for invoice in made]
    session.flush()
    return seeded
