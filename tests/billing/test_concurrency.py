"""Concurrent billing: threads with their own sessions start together (a barrier) and the invariants hold whoever
wins. On PostgreSQL the row locks and conditional updates decide; SQLite serialises writers (BEGIN IMMEDIATE),
so there the same scenarios check the invariant, not the interleaving."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import func, select

from labcommons.billing import accounts, ledger, vouchers
from labcommons.billing.models import Charge, SourceKind, VoucherRedemption
from labcommons.booking.models import Booking
from labcommons.errors import DomainError
from tests.billing.billing_support import (
    CONF_RATES,
    balance_of,
    billing_world,
    book,
    charge_of,
    check_ledger,
    give_voucher,
    open_account,
    rate_card,
    today,
)
from tests.factories import World, next_grid_day
from tests.orders.order_support import at_once

N = 8


def _crashes(results: list[object]) -> list[object]:
    """Results that are neither a value nor a domain refusal: a database error would be a 500."""
    return [r for r in results if isinstance(r, Exception) and not isinstance(r, DomainError)]


def test_concurrent_charges_never_overspend_a_voucher(world: World) -> None:
    bw = billing_world(world)
    accounts_ = [bw.carol_grant] + [open_account(world, "carol", f"SC-G-{i}") for i in range(N - 1)]
    # One voucher per account would not race; all charges share carol's first account's voucher.
    voucher = give_voucher(world, bw.carol_grant, 25_000, issuer="SC", share_bp=10_000)

    def charge(i: int) -> Callable[[], object]:
        def run() -> object:
            with world.db.unit_of_work() as s:
                return ledger.post_manual_charge(
                    s, None, facility_id=world.facilities["CQ-LAB"], account_id=accounts_[0],
                    user_id=world.actors["carol"].user_id, description=f"Run {i}", amount_fen=4_000 + i,
                    service_date=today()).id
        return run

    results = at_once(*(charge(i) for i in range(N)))
    assert _crashes(results) == []
    with world.db.unit_of_work(write=False) as s:
        redeemed = s.scalar(select(func.sum(VoucherRedemption.amount_fen))
                            .where(VoucherRedemption.voucher_id == voucher))
        assert redeemed == 25_000
        assert len(set(results)) == N
        check_ledger(s)
    assert balance_of(world, voucher_id=voucher) == 0


def test_concurrent_takes_from_one_voucher(world: World) -> None:
    account = open_account(world, "bob", "CQ-G-1")
    voucher = give_voucher(world, account, 10_000)

    def take() -> object:
        with world.db.unit_of_work() as s:
            return vouchers.take(s, voucher, 3_000)

    results = at_once(*(take for _ in range(N)))
    assert _crashes(results) == []
    assert sorted(results) == [0] * (N - 4) + [1_000, 3_000, 3_000, 3_000]  # type: ignore[type-var]
    assert balance_of(world, voucher_id=voucher) == 0


def test_concurrent_manual_charges_of_different_accounts_all_post(world: World) -> None:
    bw = billing_world(world)
    targets = [(bw.carol_grant, "carol"), (bw.bob_grant, "bob"), (bw.alice_grant, "alice"), (bw.company, "dave")]

    def charge(account_id: int, user: str) -> Callable[[], object]:
        def run() -> object:
            with world.db.unit_of_work() as s:
                return ledger.post_manual_charge(
                    s, None, facility_id=world.facilities["CQ-LAB"], account_id=account_id,
                    user_id=world.actors[user].user_id, description="Gloves", amount_fen=1_000,
                    service_date=today()).source_id
        return run

    results = at_once(*(charge(a, u) for a, u in targets * 2))
    assert _crashes(results) == [] and len(set(results)) == len(targets) * 2
    with world.db.unit_of_work(write=False) as s:
        check_ledger(s)


def test_concurrent_bookings_never_pass_the_account_limit(world: World) -> None:
    bw = billing_world(world)
    cost = CONF_RATES["academic_other"]  # one hour
    with world.db.unit_of_work() as s:
        accounts.update_account(s, world.actors["carol"], bw.carol_grant, limit_fen=3 * cost + cost // 2)
    start = next_grid_day(3, 2)
    instruments = ["CONF", "SPATIAL"]

    def booking(i: int) -> Callable[[], object]:
        return lambda: book(world, "carol", start + timedelta(hours=2 * (i // 2)), 60, instrument=instruments[i % 2],
                            account_id=bw.carol_grant)

    rate_card(world, "SPATIAL")
    results = at_once(*(booking(i) for i in range(N)))
    assert _crashes(results) == []
    made = [r for r in results if isinstance(r, int)]
    refused = [r for r in results if isinstance(r, accounts.SpendingLimitExceeded)]
    assert (len(made), len(refused)) == (3, N - 3)
    with world.db.unit_of_work(write=False) as s:
        assert accounts.commitments(s, bw.carol_grant).held_fen == 3 * cost
        assert s.scalar(select(func.count()).select_from(Booking)) == 3


def test_concurrent_postings_of_one_booking_charge_it_once(world: World) -> None:
    bw = billing_world(world)
    start = next_grid_day(3, 2)
    booking_id = book(world, "carol", start)
    give_voucher(world, bw.carol_grant, 10_000, issuer="SC")

    def post() -> object:
        with world.db.unit_of_work() as s:
            booking = s.get(Booking, booking_id)
            assert booking is not None
            charge = ledger.charge_booking(s, booking, now=start + timedelta(hours=5))
            return None if charge is None else charge.id

    def sweep() -> object:
        with world.db.unit_of_work() as s:
            return [c.id for c in ledger.charge_due_bookings(s, now=start + timedelta(hours=5))] or None

    results = at_once(*([post] * (N // 2) + [sweep] * (N // 2)))
    assert _crashes(results) == []
    assert len([r for r in results if r is not None]) == 1
    with world.db.unit_of_work(write=False) as s:
        [charge] = charge_of(s, "booking", booking_id)
        assert charge.amount_fen == 2 * CONF_RATES["academic_other"]
        hold = accounts.hold_for(s, (SourceKind.booking, booking_id))
        assert hold is not None and hold.released_at is not None
        assert s.scalar(select(func.count()).select_from(Charge)) == 1
        check_ledger(s)


def test_concurrent_reversals_of_one_charge_reverse_it_once(world: World) -> None:
    bw = billing_world(world)
    voucher = give_voucher(world, bw.carol_grant, 10_000, issuer="SC")
    with world.db.unit_of_work() as s:
        charge_id = ledger.post_manual_charge(s, None, facility_id=world.facilities["CQ-LAB"],
                                              account_id=bw.carol_grant, user_id=world.actors["carol"].user_id,
                                              description="Consult", amount_fen=8_000, service_date=today()).id

    def reverse(i: int) -> Callable[[], object]:
        def run() -> object:
            with world.db.unit_of_work() as s:
                if i % 2:
                    return ledger.reverse_charge(s, None, charge_id, note="duplicate").id
                return ledger.correct_charge(s, None, charge_id, note="fewer", amount_fen=5_000)[0].id
        return run

    results = at_once(*(reverse(i) for i in range(N)))
    assert _crashes(results) == []
    assert len([r for r in results if isinstance(r, int)]) == 1
    assert all(isinstance(r, ledger.ChargeNotCorrectable) for r in results if not isinstance(r, int))
    with world.db.unit_of_work(write=False) as s:
        assert s.scalar(select(func.count()).select_from(Charge).where(Charge.reverses_id == charge_id)) == 1
        check_ledger(s)
    assert balance_of(world, voucher_id=voucher) in (10_000, 10_000 - 2_500)


def test_concurrent_prices_of_one_target_leave_one_open_rate(world: World) -> None:
    """Two managers add prices from different days at once: the earlier one ends where the later starts."""
    from labcommons.billing import rates
    from labcommons.billing.models import Rate

    instrument = world.instruments["SPATIAL"]
    starts = [today() + timedelta(days=10 + i) for i in range(N)]

    def price(i: int) -> Callable[[], object]:
        def run() -> object:
            with world.db.unit_of_work() as s:
                return rates.set_rate(s, None, instrument_id=instrument, category="industry", unit="hour",
                                      amount_fen=10_000 + i, effective_from=starts[i]).id
        return run

    results = at_once(*(price(i) for i in range(N)))
    assert _crashes(results) == []
    with world.db.unit_of_work(write=False) as s:
        rows = s.scalars(select(Rate).where(Rate.instrument_id == instrument).order_by(Rate.effective_from)).all()
    assert [r.effective_from for r in rows] == starts
    # Each price ends where the next begins; only the last is open-ended.
    assert [r.effective_to for r in rows] == [*starts[1:], None]
