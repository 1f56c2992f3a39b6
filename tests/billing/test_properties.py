"""Property tests: any sequence of bookings, orders, manual charges, corrections, vouchers and deposits keeps the
ledger balanced (see billing_support.check_ledger) and charges each source what it should.

One world per test; each example opens its own accounts and books its own time slots, so examples share the
database but not their money, and the invariants are checked over the whole database after every example.
"""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from labcommons.billing import accounts, ledger, rates
from labcommons.billing.models import AccountKind, BillingPolicy, Charge, InvoiceLine, SourceKind
from labcommons.booking import service as booking_service
from labcommons.booking import usage
from labcommons.booking.models import Booking
from labcommons.errors import DomainError
from labcommons.orders import quotes
from labcommons.orders import service as orders
from labcommons.orders.models import OrderStatus, ServiceOrder
from tests.billing.billing_support import (
    CONF_RATES,
    add_company,
    charging,
    check_ledger,
    fund,
    give_voucher,
    net_of_source,
    open_account,
    rate_card,
)
from tests.factories import World, grant, next_grid_day
from tests.orders.order_support import add_result_file, add_service

SAMPLE_PRICE = 7_777
CATEGORY = {"carol": "academic_other", "dave": "industry"}
SLOT = timedelta(hours=3)

users = st.sampled_from(["carol", "dave"])
operations = st.one_of(
    st.tuples(st.just("book"), users, st.sampled_from([30, 60, 90, 120]),
              st.sampled_from(["out", "no_show", "ended", "cancel"]), st.integers(0, 170)),
    st.tuples(st.just("order"), users, st.integers(1, 3), st.booleans()),
    st.tuples(st.just("manual"), users, st.integers(1, 50_000), st.sampled_from(["consultation", "testing"])),
    st.tuples(st.just("voucher"), users, st.integers(1, 60_000), st.sampled_from([2500, 5000, 10_000]),
              st.sampled_from(["", "instrument", "testing", "consultation"]), st.sampled_from(["CQ", "SC"])),
    st.tuples(st.just("deposit"), st.integers(1, 150_000)),
    st.tuples(st.just("correct"), st.integers(0, 20), st.integers(0, 60_000)),
    st.tuples(st.just("reverse"), st.integers(0, 20)),
)
policies = st.fixed_dictionaries({
    "basis": st.sampled_from(["booked", "actual", "greater"]),
    "rounding": st.sampled_from(["up", "nearest"]),
    "increment_minutes": st.sampled_from([1, 15, 30, 60]),
    "charge_no_show": st.booleans(),
})


class Run:
    """One example: its accounts, its next booking slot and what each of its sources should net to."""

    def __init__(self, world: World, n: int, slots: itertools.count[int], service_id: int) -> None:
        self.world = world
        self.slots = slots
        self.service_id = service_id
        self.account = {
            "carol": open_account(world, "carol", f"SC-P-{n}"),
            "dave": open_account(world, "dave", f"CO-P-{n}", kind=AccountKind.company, prepaid=True),
        }
        self.expected: dict[tuple[SourceKind, int], int] = {}
        self.live: list[int] = []  # charges neither reversing nor reversed yet

    def posted(self, charge: Charge | None, expected_fen: int | None) -> None:
        assert (charge is None) == (expected_fen is None), (charge, expected_fen)
        if charge is not None:
            assert charge.amount_fen == expected_fen
            self.expected[(charge.source_kind, charge.source_id)] = charge.amount_fen
            self.live.append(charge.id)

    def book(self, user: str, minutes: int, outcome: str, used: int) -> None:
        db = self.world.db
        start = next_grid_day(2, 0) + next(self.slots) * SLOT
        end = start + timedelta(minutes=minutes)
        try:
            with db.unit_of_work() as s:
                booking_id = booking_service.reserve_slot(s, self.world.actors[user], self.world.instruments["CONF"],
                                                          start, end, account_id=self.account[user]).id
        except accounts.SpendingLimitExceeded:
            return  # a prepaid account that cannot cover the estimate: refused, nothing to charge
        with db.unit_of_work() as s:
            booking = s.get(Booking, booking_id)
            policy = s.get(BillingPolicy, self.world.facilities["CQ-LAB"])
            assert booking is not None and policy is not None
            actual: int | None = None
            if outcome == "cancel":
                booking_service.cancel_booking(s, self.world.actors[user], booking_id, now=start - timedelta(hours=1))
                charge = ledger.charge_booking(s, booking, now=end + ledger.CHECKOUT_GRACE)
                return self.posted(charge, None)
            if outcome == "out":
                usage.check_in(s, booking, now=start)
                usage.check_out(s, booking, now=start + timedelta(minutes=used))
                actual = used
                charge = s.scalars(select(Charge).where(Charge.source_kind == SourceKind.booking,
                                                        Charge.source_id == booking_id)).first()
            else:
                if outcome == "no_show":
                    assert booking_id in usage.mark_no_shows(s, now=start + timedelta(minutes=20))
                charge = ledger.charge_booking(s, booking, now=end + ledger.CHECKOUT_GRACE)
            billed = rates.billed_minutes(policy, booked=minutes, actual=actual, no_show=outcome == "no_show")
            amount = rates.hourly_amount(CONF_RATES[CATEGORY[user]], billed)
            self.posted(charge, amount if billed else None)
            hold = accounts.hold_for(s, (SourceKind.booking, booking_id))
            assert hold is not None and hold.released_at is not None

    def order(self, user: str, samples: int, deliver: bool) -> None:
        db, actor = self.world.db, self.world.actors[user]
        with db.unit_of_work() as s:
            order = orders.create_order(s, actor, self.service_id, title="Spatial run", sample_count=samples,
                                        account_id=self.account[user])
            orders.transition(s, actor, order.id, OrderStatus.submitted)
            order_id = order.id
            quote = quotes.current_quote(s, order)
            assert quote is not None and quote.total_fen == samples * SAMPLE_PRICE
            quote_id = quote.id
        try:
            with db.unit_of_work() as s:
                quotes.accept_quote(s, actor, order_id, quote_id)
        except accounts.SpendingLimitExceeded:
            return
        staff = self.world.actors["staff"]
        if not deliver:
            with db.unit_of_work() as s:
                orders.transition(s, staff, order_id, OrderStatus.cancelled, comment="facility closed")
                order = s.get(ServiceOrder, order_id)
                assert order is not None
                return self.posted(ledger.charge_order(s, order), None)
        with db.unit_of_work() as s:
            orders.transition(s, staff, order_id, OrderStatus.in_progress)
        add_result_file(self.world, order_id)
        with db.unit_of_work() as s:
            orders.transition(s, staff, order_id, OrderStatus.results_delivered)
            [charge] = s.scalars(select(Charge).where(Charge.source_kind == SourceKind.order,
                                                      Charge.source_id == order_id)).all()
            self.posted(charge, samples * SAMPLE_PRICE)

    def manual(self, user: str, amount: int, kind: str) -> None:
        with self.world.db.unit_of_work() as s:
            charge = ledger.post_manual_charge(
                s, None, facility_id=self.world.facilities["CQ-LAB"], account_id=self.account[user],
                user_id=self.world.actors[user].user_id, description="Consumables", amount_fen=amount,
                service_date=ledger.local_day(datetime.now(ledger.platform_zone())), item_kind=kind)
            self.posted(charge, amount)

    def correct(self, pick: int, amount: int | None) -> None:
        if not self.live:
            return
        charge_id = self.live.pop(pick % len(self.live))
        with self.world.db.unit_of_work() as s:
            if amount is None:
                reversal, replacement = ledger.reverse_charge(s, None, charge_id, note="reversed"), None
            else:
                reversal, replacement = ledger.correct_charge(s, None, charge_id, note="corrected", amount_fen=amount)
            source = (reversal.source_kind, reversal.source_id)
            self.expected[source] = 0
            if replacement is not None:
                self.posted(replacement, amount)
            else:
                assert not amount
        # Reversing twice is refused.
        try:
            with self.world.db.unit_of_work() as s:
                ledger.reverse_charge(s, None, charge_id, note="again")
        except ledger.ChargeNotCorrectable:
            pass
        else:
            raise AssertionError("a charge was reversed twice")

    def apply(self, op: tuple[Any, ...]) -> None:
        match op:
            case ("book", user, minutes, outcome, used):
                self.book(user, minutes, outcome, used)
            case ("order", user, samples, deliver):
                self.order(user, samples, deliver)
            case ("manual", user, amount, kind):
                self.manual(user, amount, kind)
            case ("voucher", user, amount, share, kinds, issuer):
                give_voucher(self.world, self.account[user], amount, share_bp=share, kinds=kinds or None,
                             issuer=issuer)
            case ("deposit", amount):
                fund(self.world, self.account["dave"], amount)
            case ("correct", pick, amount):
                self.correct(pick, amount)
            case ("reverse", pick):
                self.correct(pick, None)

    def check(self) -> None:
        with self.world.db.unit_of_work(write=False) as s:
            check_ledger(s)
            for (kind, source_id), amount in self.expected.items():
                assert net_of_source(s, kind, source_id) == amount, (kind, source_id)
            for account_id in self.account.values():
                assert accounts.commitments(s, account_id).held_fen >= 0


def _invoice_everything(world: World, account_ids: list[int]) -> None:
    """When the invoices module is there: invoicing the accounts puts each charge on exactly one line, in full."""
    try:
        from labcommons.billing import invoices
    except ImportError:  # written in parallel; the ledger's own properties still hold without it
        return
    now = datetime.now(ledger.platform_zone())
    with world.db.unit_of_work() as s:
        for account_id in account_ids:
            invoices.generate_invoices(s, invoices.period_of(now), account_id=account_id, allow_open=True)
    with world.db.unit_of_work(write=False) as s:
        for account_id in account_ids:
            charged = s.scalar(select(func.coalesce(func.sum(Charge.amount_fen), 0))
                               .where(Charge.account_id == account_id))
            lines = s.execute(select(InvoiceLine, Charge).join(Charge, Charge.id == InvoiceLine.charge_id)
                              .where(Charge.account_id == account_id)).all()
            assert sum(line.amount_fen for line, _ in lines) == charged
            for line, charge in lines:
                parts = ledger.parts_of(s, charge.id)
                assert line.amount_fen == charge.amount_fen
                assert (line.voucher_fen, line.prepaid_fen, line.due_fen) == (
                    parts.voucher_fen, parts.prepaid_fen, parts.invoice_fen)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
def test_any_sequence_of_operations_keeps_the_ledger_balanced(world: World, data: st.DataObject) -> None:
    state = _setup(world)
    run = Run(world, next(state["examples"]), state["slots"], state["service_id"])
    policy: dict[str, Any] = data.draw(policies, label="policy")
    charging(world, **policy)
    for op in data.draw(st.lists(operations, min_size=1, max_size=7), label="operations"):
        try:
            run.apply(op)
        except DomainError as exc:  # a refusal is fine; it must not unbalance anything
            raise AssertionError(f"{op} was refused: {exc.body()}") from exc
        run.check()
    _invoice_everything(world, list(run.account.values()))
    run.check()


_STATE: dict[int, dict[str, Any]] = {}


def _setup(world: World) -> dict[str, Any]:
    """The parts shared by the examples of one test (one world): a company, rates, a service, a staff member."""
    key = id(world)
    if key not in _STATE or _STATE[key]["world"] is not world:
        _STATE.clear()  # a new world (the other database): forget the last one
        add_company(world)
        charging(world)
        rate_card(world)
        world.actors["staff"] = grant(world, "alice", "facility_staff")
        _STATE[key] = {"world": world, "examples": itertools.count(1), "slots": itertools.count(0),
                       "service_id": add_service(world, price_fen=SAMPLE_PRICE)}
    return _STATE[key]
