"""Service orders of a charging facility, through the real order flow: the account, the rate-card quote, the hold
on acceptance and the charge on delivery."""

from __future__ import annotations

import pytest

from labcommons.billing import accounts, ledger
from labcommons.billing.models import RateUnit, SourceKind
from labcommons.orders import quotes
from labcommons.orders import service as orders
from labcommons.orders.models import OrderStatus, ServiceOrder
from tests.billing.billing_support import (
    add_rate,
    balance_of,
    charge_of,
    charging,
    check_ledger,
    give_voucher,
    net_of_source,
    open_account,
)
from tests.factories import World, grant
from tests.orders.order_support import add_result_file, add_service, new_order, status_of

S = OrderStatus
LIST_PRICE = 50_000
REGION_PRICE = 30_000  # bob's academic_region price per sample on the rate card


def _setup(world: World, *, limit_fen: int | None = None) -> tuple[int, int]:
    """A charging CQ-LAB with a per-sample testing service priced on the card; bob's account. (service, account)"""
    charging(world)
    service_id = add_service(world, price_fen=LIST_PRICE)
    add_rate(world, instrument=None, service_id=service_id, category="academic_region", unit="sample",
             amount_fen=REGION_PRICE)
    return service_id, open_account(world, "bob", "CQ-G-1", limit_fen=limit_fen)


def _accept(world: World, order_id: int) -> None:
    with world.db.unit_of_work() as s:
        order = s.get(ServiceOrder, order_id)
        assert order is not None
        quote = quotes.current_quote(s, order)
        assert quote is not None
        quotes.accept_quote(s, world.actors["bob"], order_id, quote.id)


def _deliver(world: World, order_id: int) -> None:
    staff = grant(world, "alice", "facility_staff")
    with world.db.unit_of_work() as s:
        orders.transition(s, staff, order_id, S.in_progress, comment="one more file")
    add_result_file(world, order_id)
    with world.db.unit_of_work() as s:
        orders.transition(s, staff, order_id, S.results_delivered)


def test_an_order_is_charged_its_accepted_quote_on_delivery(world: World) -> None:
    service_id, account_id = _setup(world)
    voucher = give_voucher(world, account_id, 100_000, kinds="testing", share_bp=2500)
    order_id = new_order(world, service_id, "bob", submit=True, sample_count=2)
    with world.db.unit_of_work(write=False) as s:
        order = s.get(ServiceOrder, order_id)
        assert order is not None and order.status == S.quoted
        quote = quotes.current_quote(s, order)
        assert quote is not None and quote.total_fen == 2 * REGION_PRICE  # the card beats the list price
        hold = accounts.hold_for(s, (SourceKind.order, order_id))
        assert hold is not None and (hold.account_id, hold.amount_fen) == (account_id, 0)
    _accept(world, order_id)
    with world.db.unit_of_work(write=False) as s:
        hold = accounts.hold_for(s, (SourceKind.order, order_id))
        assert hold is not None and hold.amount_fen == 2 * REGION_PRICE
    _deliver(world, order_id)
    with world.db.unit_of_work(write=False) as s:
        [charge] = charge_of(s, "order", order_id)
        assert (charge.account_id, charge.amount_fen, charge.item_kind, charge.unit, charge.quantity) == (
            account_id, 2 * REGION_PRICE, "testing", RateUnit.project, 1)
        assert charge.payer_category.value == "academic_region"
        assert ledger.parts_of(s, charge.id) == ledger.ChargeParts(15_000, 0, 45_000)
        hold = accounts.hold_for(s, (SourceKind.order, order_id))
        assert hold is not None and hold.released_at is not None
        assert accounts.commitments(s, account_id).total_fen == 2 * REGION_PRICE
        check_ledger(s)
    assert balance_of(world, voucher_id=voucher) == 85_000


def test_a_redelivered_order_is_charged_once(world: World) -> None:
    service_id, _ = _setup(world)
    order_id = new_order(world, service_id, "bob", submit=True, sample_count=1)
    _accept(world, order_id)
    _deliver(world, order_id)
    _deliver(world, order_id)  # reopened for a missing file and delivered again
    with world.db.unit_of_work() as s:
        assert len(charge_of(s, "order", order_id)) == 1
        order = s.get(ServiceOrder, order_id)
        assert order is not None
        assert ledger.charge_order(s, order) is None
        assert net_of_source(s, "order", order_id) == REGION_PRICE


def test_accepting_a_quote_past_the_limit_is_refused(world: World) -> None:
    service_id, account_id = _setup(world, limit_fen=2 * REGION_PRICE - 1)
    order_id = new_order(world, service_id, "bob", submit=True, sample_count=2)
    with pytest.raises(accounts.SpendingLimitExceeded):
        _accept(world, order_id)
    assert status_of(world, order_id) == S.quoted  # the acceptance was rolled back
    with world.db.unit_of_work(write=False) as s:
        assert accounts.commitments(s, account_id).total_fen == 0


def test_a_cancelled_order_holds_nothing_and_is_not_charged(world: World) -> None:
    service_id, account_id = _setup(world)
    order_id = new_order(world, service_id, "bob", submit=True, sample_count=3)
    _accept(world, order_id)
    with world.db.unit_of_work(write=False) as s:
        assert accounts.commitments(s, account_id).held_fen == 3 * REGION_PRICE
    with world.db.unit_of_work() as s:
        orders.transition(s, world.actors["bob"], order_id, S.cancelled, comment="no longer needed")
    with world.db.unit_of_work() as s:
        assert accounts.commitments(s, account_id).held_fen == 0
        order = s.get(ServiceOrder, order_id)
        assert order is not None
        assert ledger.charge_order(s, order) is None
        assert charge_of(s, "order", order_id) == []


def test_an_order_needs_an_account_at_a_charging_facility(world: World) -> None:
    charging(world)
    service_id = add_service(world, price_fen=LIST_PRICE)
    with pytest.raises(accounts.AccountNotUsable) as err:
        new_order(world, service_id, "bob")
    assert err.value.code == "account_required"
    other = add_service(world, "SC-UNI", price_fen=LIST_PRICE)  # SC-UNI does not charge through the platform
    order_id = new_order(world, other, "bob", submit=True)
    with world.db.unit_of_work(write=False) as s:
        assert accounts.hold_for(s, (SourceKind.order, order_id)) is None
