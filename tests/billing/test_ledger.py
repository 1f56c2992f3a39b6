"""The charge ledger: how a charge is split between vouchers, prepaid balance and invoice; corrections by reversal;
manual charges; and the database refusing to change ledger rows."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from labcommons.billing import accounts, ledger
from labcommons.billing.models import Invoice, InvoiceLine, VoucherRedemption
from labcommons.booking import usage
from labcommons.booking.models import Booking
from labcommons.errors import Conflict, Forbidden, InvalidInput, NotFound
from tests.billing.billing_support import (
    CONF_RATES,
    BillingWorld,
    balance_of,
    billing_world,
    book,
    check_ledger,
    fund,
    give_voucher,
    net_of_source,
    today,
)
from tests.factories import World, grant, next_grid_day

P = ledger.ChargeParts


def _manual(bw: BillingWorld, amount: int, *, account: int | None = None, user: str = "dave",
            kind: str = "consultation") -> int:
    world = bw.world
    with world.db.unit_of_work() as s:
        return ledger.post_manual_charge(s, None, facility_id=world.facilities["CQ-LAB"],
                                         account_id=account or bw.company, user_id=world.actors[user].user_id,
                                         description="Sample preparation", amount_fen=amount,
                                         service_date=today(), item_kind=kind).id


def _parts(world: World, charge_id: int) -> ledger.ChargeParts:
    with world.db.unit_of_work(write=False) as s:
        return ledger.parts_of(s, charge_id)


def test_vouchers_then_prepaid_then_invoice(world: World) -> None:
    bw = billing_world(world)
    fund(world, bw.company, 40_000)
    voucher = give_voucher(world, bw.company, 30_000, share_bp=5000)
    first = _manual(bw, 100_000)
    assert _parts(world, first) == P(30_000, 40_000, 30_000)
    assert balance_of(world, voucher_id=voucher) == 0 and balance_of(world, account_id=bw.company) == 0
    second = _manual(bw, 1_000)
    assert _parts(world, second) == P(0, 0, 1_000)
    fund(world, bw.company, 10_000)
    assert _parts(world, _manual(bw, 999)) == P(0, 999, 0)
    assert balance_of(world, account_id=bw.company) == 9_001
    with world.db.unit_of_work(write=False) as s:
        check_ledger(s)
        assert [c.id for c in ledger.charges_of_account(s, bw.company)][-2:] == [second, first]


def test_a_correction_reverses_every_part_and_posts_the_replacement(world: World) -> None:
    bw = billing_world(world)
    fund(world, bw.company, 40_000)
    voucher = give_voucher(world, bw.company, 30_000, share_bp=5000)
    original = _manual(bw, 100_000)
    manager = grant(world, "alice", "facility_staff")
    with world.db.unit_of_work() as s:
        reversal, replacement = ledger.correct_charge(s, manager, original, note=" wrong amount ", amount_fen=50_000)
        assert replacement is not None
        assert (reversal.amount_fen, reversal.reverses_id, reversal.seq, reversal.note) == (
            -100_000, original, 2, "wrong amount")
        assert (replacement.amount_fen, replacement.seq, replacement.reverses_id) == (50_000, 3, None)
        reversal_id, replacement_id = reversal.id, replacement.id
        source = (reversal.source_kind, reversal.source_id)
    assert _parts(world, reversal_id) == P(-30_000, -40_000, -30_000)
    # The balances were restored, then the replacement paid from them again.
    assert _parts(world, replacement_id) == P(25_000, 25_000, 0)
    assert balance_of(world, voucher_id=voucher) == 5_000
    assert balance_of(world, account_id=bw.company) == 15_000
    with world.db.unit_of_work(write=False) as s:
        assert net_of_source(s, *source) == 50_000
        assert [r.amount_fen for r in s.query(VoucherRedemption).order_by(VoucherRedemption.id)] == [
            30_000, -30_000, 25_000]
        check_ledger(s)


def test_correcting_a_booking_charge_by_quantity(world: World) -> None:
    bw = billing_world(world)
    voucher = give_voucher(world, bw.carol_grant, 5_000, issuer="SC")
    start = next_grid_day(3, 2)
    booking_id = book(world, "carol", start)
    with world.db.unit_of_work() as s:
        booking = s.get(Booking, booking_id)
        assert booking is not None
        charge = ledger.charge_booking(s, booking, now=start + timedelta(hours=4))
        assert charge is not None and charge.amount_fen == 2 * CONF_RATES["academic_other"]
        charge_id = charge.id
    assert _parts(world, charge_id) == P(5_000, 0, 19_690)
    with world.db.unit_of_work() as s:
        reversal, replacement = ledger.correct_charge(s, None, charge_id, note="left after an hour", quantity=60)
        assert replacement is not None
        assert (replacement.quantity, replacement.amount_fen, replacement.rate_id) == (
            60, CONF_RATES["academic_other"], charge.rate_id)
        assert reversal.quantity == -120
        replacement_id = replacement.id
    assert _parts(world, replacement_id) == P(5_000, 0, 7_345)
    assert balance_of(world, voucher_id=voucher) == 0
    with world.db.unit_of_work(write=False) as s:
        assert net_of_source(s, "booking", booking_id) == CONF_RATES["academic_other"]
        assert accounts.commitments(s, bw.carol_grant).total_fen == CONF_RATES["academic_other"]
        check_ledger(s)


def test_reversal_rules(world: World) -> None:
    bw = billing_world(world)
    charge = _manual(bw, 5_000)
    with world.db.unit_of_work() as s, pytest.raises(InvalidInput) as missing:
        ledger.reverse_charge(s, None, charge, note="  ")
    assert missing.value.field == "note"
    with world.db.unit_of_work() as s, pytest.raises(Forbidden):
        ledger.reverse_charge(s, world.actors["bob"], charge, note="not mine")
    with world.db.unit_of_work() as s:
        reversal = ledger.reverse_charge(s, None, charge, note="duplicate").id
    for target in (charge, reversal):
        with world.db.unit_of_work() as s, pytest.raises(Conflict) as err:
            ledger.reverse_charge(s, None, target, note="again")
        assert err.value.status_code == 409 and err.value.field == "charge_id"
    with world.db.unit_of_work() as s, pytest.raises(Conflict):
        ledger.correct_charge(s, None, charge, note="again", amount_fen=10)
    with world.db.unit_of_work() as s, pytest.raises(NotFound):
        ledger.reverse_charge(s, None, 999_999, note="what")
    other = _manual(bw, 5_000)
    for fields in (dict(), dict(quantity=-1), dict(amount_fen=-1), dict(quantity=True)):
        with world.db.unit_of_work() as s, pytest.raises(InvalidInput):
            ledger.correct_charge(s, None, other, note="x", **fields)
    with world.db.unit_of_work() as s:  # amount 0 only reverses
        assert ledger.correct_charge(s, None, other, note="waived", amount_fen=0)[1] is None
    with world.db.unit_of_work(write=False) as s:
        assert accounts.commitments(s, bw.company).spent_fen == 0
        check_ledger(s)


def test_manual_charge_rules(world: World) -> None:
    bw = billing_world(world)
    good: dict[str, object] = dict(facility_id=world.facilities["CQ-LAB"], account_id=bw.bob_grant,
                                   user_id=world.actors["bob"].user_id, description="Gloves", amount_fen=100,
                                   service_date=today())
    for fields, field in ((dict(amount_fen=0), "amount_fen"), (dict(description=" "), "description"),
                          (dict(item_kind="coffee"), "item_kind"),
                          (dict(user_id=world.actors["carol"].user_id), "account_id")):
        with world.db.unit_of_work() as s, pytest.raises(InvalidInput) as err:
            ledger.post_manual_charge(s, None, **{**good, **fields})
        assert err.value.field == field
    with world.db.unit_of_work() as s, pytest.raises(Forbidden):
        ledger.post_manual_charge(s, world.actors["bob"], **good)
    staff = grant(world, "alice", "facility_staff")
    with world.db.unit_of_work() as s:
        first = ledger.post_manual_charge(s, staff, **good)
        second = ledger.post_manual_charge(s, staff, **good)
        assert first.source_id != second.source_id and first.posted_by_id == staff.user_id
        assert first.payer_category.value == "academic_region"
        assert [c.id for c in ledger.charges_of_facility(s, staff, world.facilities["CQ-LAB"])] == [second.id,
                                                                                                   first.id]
        with pytest.raises(Forbidden):
            ledger.charges_of_facility(s, world.actors["bob"], world.facilities["CQ-LAB"])
        assert ledger.require_account_reader(s, world.actors["bob"], bw.bob_grant).id == bw.bob_grant
        with pytest.raises(NotFound):
            ledger.require_account_reader(s, world.actors["carol"], bw.bob_grant)


@pytest.mark.parametrize("table", ["charge", "payment", "voucher_redemption", "invoice_line"])
@pytest.mark.parametrize("statement", ["UPDATE {table} SET amount_fen = amount_fen + 1", "DELETE FROM {table}"])
def test_the_ledger_is_append_only(world: World, table: str, statement: str) -> None:
    bw = billing_world(world)
    give_voucher(world, bw.company, 10_000)
    charge = _manual(bw, 4_000)
    with world.db.unit_of_work() as s:
        invoice = Invoice(number="INV-TEST-1", account_id=bw.company, period="2026-11", total_fen=4_000,
                          voucher_fen=2_000, prepaid_fen=0, due_fen=2_000)
        s.add(invoice)
        s.flush()
        s.add(InvoiceLine(invoice_id=invoice.id, charge_id=charge, amount_fen=4_000, voucher_fen=2_000,
                          prepaid_fen=0, due_fen=2_000))
    with world.db.unit_of_work() as s:
        assert s.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() >= 1
    with pytest.raises(DBAPIError) as err, world.db.unit_of_work() as s:
        s.execute(text(statement.format(table=table)))
    assert "ledger_append_only" in str(err.value)
    with world.db.unit_of_work(write=False) as s:
        check_ledger(s)
        assert s.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() >= 1


def test_check_out_posts_the_charge_through_usage(world: World) -> None:
    bw = billing_world(world)
    fund(world, bw.company, 100_000)
    start = next_grid_day(3, 2)
    booking_id = book(world, "dave", start, 60)
    with world.db.unit_of_work() as s:
        booking = s.get(Booking, booking_id)
        assert booking is not None
        usage.check_in(s, booking, now=start)
        usage.check_out(s, booking, now=start + timedelta(minutes=60))
    with world.db.unit_of_work(write=False) as s:
        [charge] = ledger.charges_of_account(s, bw.company)
        assert ledger.parts_of(s, charge.id) == P(0, CONF_RATES["industry"], 0)
    assert balance_of(world, account_id=bw.company) == 100_000 - CONF_RATES["industry"]
