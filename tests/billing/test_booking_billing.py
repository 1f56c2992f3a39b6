"""Bookings of a charging facility: the account they hold money on, and the charge posted when they finish."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy.exc import IntegrityError

from labcommons.billing import accounts, ledger, rates
from labcommons.billing.models import SourceKind
from labcommons.booking import policy as booking_policy
from labcommons.booking import service as booking_service
from labcommons.booking import usage
from labcommons.booking.models import Booking, BookingStatus
from tests.billing.billing_support import (
    CONF_RATES,
    billing_world,
    book,
    charge_of,
    charging,
    check_ledger,
    open_account,
)
from tests.factories import World, grant, next_grid_day

OTHER = CONF_RATES["academic_other"]  # carol (SC) at the CQ lab


def test_a_facility_without_billing_rules_charges_nothing(world: World) -> None:
    start = next_grid_day(3, 2)
    booking_id = book(world, "carol", start)
    with world.db.unit_of_work() as s:
        assert accounts.hold_for(s, (SourceKind.booking, booking_id)) is None
        booking = s.get(Booking, booking_id)
        assert booking is not None
        assert ledger.charge_booking(s, booking, now=start + timedelta(hours=5)) is None
        assert charge_of(s, "booking", booking_id) == []


def test_a_charging_facility_needs_an_account(world: World) -> None:
    charging(world)
    start = next_grid_day(3, 2)
    with pytest.raises(accounts.AccountNotUsable) as err:
        book(world, "carol", start)
    assert (err.value.code, err.value.field) == ("account_required", "account_id")
    with world.db.unit_of_work(write=False) as s:  # the booking was rolled back with the refusal
        assert s.query(Booking).count() == 0
    open_account(world, "carol", "SC-G-1")
    book(world, "carol", start)
    charging(world, require_account=False)
    open_account(world, "bob", "CQ-G-1")
    open_account(world, "bob", "CQ-G-2")
    # bob has two accounts and none is required: the booking goes ahead without a hold.
    bob_booking = book(world, "bob", start + timedelta(hours=3))
    with world.db.unit_of_work(write=False) as s:
        assert accounts.hold_for(s, (SourceKind.booking, bob_booking)) is None


def _use(world: World, booking_id: int, start: datetime, minutes: int) -> None:
    with world.db.unit_of_work() as s:
        booking = s.get(Booking, booking_id)
        assert booking is not None
        usage.check_in(s, booking, now=start + timedelta(minutes=2))
        usage.check_out(s, booking, now=start + timedelta(minutes=2 + minutes))


@pytest.mark.parametrize(
    ("policy", "used", "minutes"),
    [
        ({}, 90, 120),  # booked basis, 15-minute increments rounded up
        (dict(basis="actual"), 88, 90),
        (dict(basis="actual", rounding="nearest", increment_minutes=30), 74, 60),
        (dict(basis="greater"), 130, 135),
        (dict(basis="greater"), 30, 120),
    ],
)
def test_check_out_charges_the_booking(world: World, policy: dict[str, object], used: int, minutes: int) -> None:
    bw = billing_world(world, policy=policy)
    start = next_grid_day(3, 2)
    booking_id = book(world, "carol", start)  # 2 h; staying longer is checked out late
    _use(world, booking_id, start, used)
    with world.db.unit_of_work(write=False) as s:
        [charge] = charge_of(s, "booking", booking_id)
        assert (charge.account_id, charge.quantity, charge.amount_fen, charge.unit_amount_fen) == (
            bw.carol_grant, minutes, rates.hourly_amount(OTHER, minutes), OTHER)
        assert (charge.item_kind, charge.category_code, charge.payer_category.value, charge.seq) == (
            "instrument", "MIC.CONF", "academic_other", 1)
        assert charge.rate_id is not None and charge.service_date == ledger.local_day(start)
        hold = accounts.hold_for(s, (SourceKind.booking, booking_id))
        assert hold is not None and hold.released_at is not None
        assert accounts.commitments(s, bw.carol_grant).held_fen == 0
        check_ledger(s)


@pytest.mark.parametrize(("charge_no_show", "expected"), [(True, 2 * OTHER), (False, None)])
def test_no_shows(world: World, charge_no_show: bool, expected: int | None) -> None:
    bw = billing_world(world, policy=dict(charge_no_show=charge_no_show, basis="actual"))
    start = next_grid_day(3, 2)
    booking_id = book(world, "carol", start)
    with world.db.unit_of_work() as s:
        assert usage.mark_no_shows(s, now=start + timedelta(minutes=20)) == [booking_id]
        charged = ledger.charge_due_bookings(s, now=start + timedelta(hours=4))
        assert [c.amount_fen for c in charged] == ([] if expected is None else [expected])
    with world.db.unit_of_work(write=False) as s:
        assert accounts.commitments(s, bw.carol_grant).total_fen == (expected or 0)
        hold = accounts.hold_for(s, (SourceKind.booking, booking_id))
        assert hold is not None and hold.released_at is not None


def test_a_booking_that_ended_without_check_in_is_charged_after_the_grace(world: World) -> None:
    billing_world(world, policy=dict(basis="actual"))
    start = next_grid_day(3, 2)
    booking_id = book(world, "carol", start)
    end = start + timedelta(hours=2)
    with world.db.unit_of_work() as s:
        assert ledger.charge_due_bookings(s, now=end) == []
        assert ledger.charge_due_bookings(s, now=end + ledger.CHECKOUT_GRACE - timedelta(minutes=1)) == []
    with world.db.unit_of_work() as s:
        [charge] = ledger.charge_due_bookings(s, now=end + ledger.CHECKOUT_GRACE)
        assert (charge.source_id, charge.quantity, charge.amount_fen) == (booking_id, 120, 2 * OTHER)
    with world.db.unit_of_work() as s:  # the sweep runs again: nothing more
        assert ledger.charge_due_bookings(s, now=end + 2 * ledger.CHECKOUT_GRACE) == []
        booking = s.get(Booking, booking_id)
        assert booking is not None
        assert ledger.charge_booking(s, booking, now=end + 2 * ledger.CHECKOUT_GRACE) is None
        assert len(charge_of(s, "booking", booking_id)) == 1


def test_a_cancelled_booking_is_not_charged(world: World) -> None:
    bw = billing_world(world)
    start = next_grid_day(3, 2)
    booking_id = book(world, "carol", start)
    with world.db.unit_of_work() as s:
        booking_service.cancel_booking(s, world.actors["carol"], booking_id)
    with world.db.unit_of_work() as s:
        assert ledger.charge_due_bookings(s, now=start - timedelta(hours=1)) == []
        hold = accounts.hold_for(s, (SourceKind.booking, booking_id))
        assert hold is not None and hold.released_at is not None
        assert charge_of(s, "booking", booking_id) == []
        assert accounts.commitments(s, bw.carol_grant).total_fen == 0


def test_a_booking_is_charged_once_even_when_posted_twice(world: World) -> None:
    bw = billing_world(world)
    start = next_grid_day(3, 2)
    booking_id = book(world, "carol", start)
    _use(world, booking_id, start, 60)
    with world.db.unit_of_work() as s:
        [charge] = charge_of(s, "booking", booking_id)
        account = accounts.get_account(s, bw.carol_grant)
        priced = ledger.Priced(charge.payer_category, False, charge.rate_id, charge.unit, charge.quantity,
                               charge.unit_amount_fen, charge.list_amount_fen, 0, "")
        facility = s.get(ledger.Facility, charge.facility_id)
        assert facility is not None
        # The unique (source, seq) key refuses a second first charge of the same booking.
        with pytest.raises(IntegrityError), s.begin_nested():
            ledger.post_charge(s, account=account, user_id=charge.user_id, facility=facility,
                               provider_region_code="CQ", source=(SourceKind.booking, booking_id),
                               item_kind="instrument", category_code="MIC.CONF", priced=priced,
                               description="again", service_date=charge.service_date, seq=1)
    with world.db.unit_of_work(write=False) as s:
        assert len(charge_of(s, "booking", booking_id)) == 1
        check_ledger(s)


def test_the_estimate_follows_the_payer_category(world: World) -> None:
    bw = billing_world(world)
    start = next_grid_day(3, 2)
    for i, (user, account, category) in enumerate((("alice", bw.alice_grant, "internal"),
                                                    ("bob", bw.bob_grant, "academic_region"))):
        booking_id = book(world, user, start + timedelta(hours=3 * i), 90)
        with world.db.unit_of_work(write=False) as s:
            hold = accounts.hold_for(s, (SourceKind.booking, booking_id))
            assert hold is not None
            assert (hold.account_id, hold.amount_fen) == (account, rates.hourly_amount(CONF_RATES[category], 90))


def test_a_request_never_approved_is_not_charged(world: World) -> None:
    bw = billing_world(world)
    manager = grant(world, "alice", "facility_manager")
    with world.db.unit_of_work() as s:
        booking_policy.save_policy(s, manager, world.instruments["CONF"], requires_approval=True)
    start = next_grid_day(3, 2)
    booking_id = book(world, "carol", start)
    with world.db.unit_of_work(write=False) as s:
        booking = s.get(Booking, booking_id)
        assert booking is not None and booking.status == BookingStatus.pending
        assert accounts.commitments(s, bw.carol_grant).held_fen == 2 * OTHER  # the request holds its estimate
    with world.db.unit_of_work() as s:
        assert ledger.charge_due_bookings(s, now=start + timedelta(hours=5)) == []
        assert charge_of(s, "booking", booking_id) == []
        assert accounts.commitments(s, bw.carol_grant).total_fen == 0


def test_a_waitlist_offer_is_booked_on_the_account_the_user_chooses(world: World) -> None:
    from labcommons.booking import waitlist

    bw = billing_world(world)
    second = open_account(world, "carol", "SC-G-2")
    start = next_grid_day(3, 2)
    bobs = book(world, "bob", start)
    with world.db.unit_of_work() as s:
        entry_id = waitlist.join(s, world.actors["carol"], world.instruments["CONF"], start,
                                 start + timedelta(hours=2)).id
    with world.db.unit_of_work() as s:
        booking_service.cancel_booking(s, world.actors["bob"], bobs)
    # Two accounts and none chosen: refused, and the offer stays live.
    with pytest.raises(accounts.AccountNotUsable) as err, world.db.unit_of_work() as s:
        waitlist.accept(s, world.actors["carol"], entry_id)
    assert err.value.code == "account_required"
    with world.db.unit_of_work() as s:
        booking = waitlist.accept(s, world.actors["carol"], entry_id, account_id=second)
        hold = accounts.hold_for(s, (SourceKind.booking, booking.id))
        assert hold is not None and hold.account_id == second != bw.carol_grant
