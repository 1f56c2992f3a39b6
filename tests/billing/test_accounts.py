"""Funding accounts: opening, members, limits, prepaid balances, deposits and the holds that reserve money."""

from __future__ import annotations

from datetime import timedelta

import pytest

from labcommons.billing import accounts
from labcommons.billing.models import AccountKind, AccountStatus, MemberStatus, SourceKind
from labcommons.booking import service as booking_service
from labcommons.errors import Conflict, Forbidden, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity import service as identity
from tests.billing.billing_support import (
    CONF_RATES,
    add_company,
    billing_world,
    book,
    fund,
    give_voucher,
    open_account,
    today,
)
from tests.factories import World, actor_of, next_grid_day


def test_an_account_belongs_to_its_owner_and_their_institution(world: World) -> None:
    bob = world.actors["bob"]
    account_id = open_account(world, "bob", "NSFC-82071234", limit_fen=500_000)
    with world.db.unit_of_work(write=False) as s:
        account = accounts.get_account(s, account_id)
        assert (account.owner_id, account.institution_id, account.region_code) == (
            bob.user_id, world.institutions["CQ-UNI"], "CQ")
        assert (account.kind, account.status, account.balance_fen, account.limit_fen) == (
            AccountKind.grant, AccountStatus.active, 0, 500_000)
        [member] = accounts.members(s, account_id)
        assert (member.user_id, member.status) == (bob.user_id, MemberStatus.approved)
        assert [a.id for a in accounts.accounts_of(s, bob.user_id)] == [account_id]
        assert accounts.visible_account(s, bob, account_id).id == account_id
        with pytest.raises(NotFound):
            accounts.visible_account(s, world.actors["carol"], account_id)


@pytest.mark.parametrize(
    ("fields", "error", "field"),
    [
        (dict(code="x"), InvalidInput, "code"),
        (dict(code="has space"), InvalidInput, "code"),
        (dict(name=" "), InvalidInput, "name"),
        (dict(kind="loan"), InvalidInput, "kind"),
        (dict(kind="company"), InvalidInput, "kind"),  # bob's university is not a company
        (dict(limit_fen=-5), InvalidInput, "limit_fen"),
        (dict(code="TAKEN-1"), Conflict, "code"),
        (dict(owner_id=-1), Forbidden, "owner_id"),  # only admins open accounts for others
    ],
)
def test_account_rules(world: World, fields: dict[str, object], error: type[Exception], field: str) -> None:
    open_account(world, "alice", "TAKEN-1")
    values: dict[str, object] = dict(code="NEW-1", name="New grant")
    values.update(fields)
    with world.db.unit_of_work() as s, pytest.raises(error) as err:
        accounts.create_account(s, world.actors["bob"], **values)
    assert err.value.field == field  # type: ignore[attr-defined]


def test_company_accounts_and_admins_opening_for_others(world: World) -> None:
    add_company(world)
    company = open_account(world, "dave", "CO-1", kind="company", prepaid=True)
    with world.db.unit_of_work() as s:
        assert accounts.get_account(s, company).kind == AccountKind.company
        user = identity.find_user(s, "alice@example.org")
        roles.grant_role(s, None, user, "institution_admin", institution_id=world.institutions["CQ-UNI"])
    admin = actor_of(world, "alice")
    with world.db.unit_of_work() as s:
        account = accounts.create_account(s, admin, code="UNI-POOL", name="Pool", institution_id=world.institutions[
            "CQ-UNI"], owner_id=world.actors["bob"].user_id)
        assert account.owner_id == world.actors["bob"].user_id
        assert accounts.may_manage(admin, account) and accounts.may_manage(world.actors["bob"], account)
        assert not accounts.may_manage(world.actors["carol"], account)


def test_membership_request_approve_revoke(world: World) -> None:
    account_id = open_account(world, "bob", "CQ-G-1")
    carol, bob = world.actors["carol"], world.actors["bob"]
    with world.db.unit_of_work() as s:
        member = accounts.request_membership(s, carol, " CQ-G-1 ")
        assert member.status == MemberStatus.pending
        member_id = member.id
        assert accounts.accounts_of(s, carol.user_id) == []
        with pytest.raises(NotFound):
            accounts.visible_account(s, carol, account_id)
        with pytest.raises(NotFound):
            accounts.request_membership(s, carol, "NO-SUCH")
        with pytest.raises(NotFound):  # carol cannot approve herself
            accounts.decide_member(s, carol, member_id, status="approved")
    with world.db.unit_of_work() as s:
        accounts.decide_member(s, bob, member_id, status="approved", limit_fen=10_000)
        assert [a.id for a in accounts.accounts_of(s, carol.user_id)] == [account_id]
        assert accounts.visible_account(s, carol, account_id).id == account_id
    with world.db.unit_of_work() as s:
        accounts.decide_member(s, bob, member_id, status="revoked")
        assert accounts.accounts_of(s, carol.user_id) == []
        again = accounts.request_membership(s, carol, "CQ-G-1")
        assert (again.id, again.status) == (member_id, MemberStatus.pending)
        with pytest.raises(InvalidInput):
            accounts.decide_member(s, bob, member_id, status="maybe")
        owner_row = accounts.member_row(s, account_id, bob.user_id)
        assert owner_row is not None
        with pytest.raises(Conflict):
            accounts.decide_member(s, bob, owner_row.id, status="revoked")


def test_suspended_or_expired_accounts_are_not_usable(world: World) -> None:
    account_id = open_account(world, "bob", "CQ-G-1")
    bob = world.actors["bob"]
    with world.db.unit_of_work() as s:
        assert accounts.resolve_account(s, bob.user_id, None, required=True, today=today()).id == account_id
        accounts.update_account(s, bob, account_id, status="suspended")
        with pytest.raises(accounts.AccountNotUsable) as err:
            accounts.resolve_account(s, bob.user_id, account_id, required=True, today=today())
        assert err.value.field == "account_id"
        accounts.update_account(s, bob, account_id, status="active", valid_until=today() - timedelta(days=1))
        with pytest.raises(accounts.AccountNotUsable) as err:
            accounts.resolve_account(s, bob.user_id, None, required=True, today=today())
        assert err.value.code == "account_required"
        assert accounts.resolve_account(s, bob.user_id, None, required=False, today=today()) is None
        with pytest.raises(NotFound):
            accounts.update_account(s, world.actors["carol"], account_id, name="mine now")


def test_several_accounts_must_be_chosen(world: World) -> None:
    first = open_account(world, "bob", "CQ-G-1")
    second = open_account(world, "bob", "CQ-G-2")
    other = open_account(world, "alice", "LAB-1")
    bob = world.actors["bob"].user_id
    with world.db.unit_of_work(write=False) as s:
        with pytest.raises(accounts.AccountNotUsable) as err:
            accounts.resolve_account(s, bob, None, required=True, today=today())
        assert err.value.code == "account_required" and err.value.details["accounts"] == [first, second]
        assert accounts.resolve_account(s, bob, second, required=True, today=today()).id == second
        with pytest.raises(accounts.AccountNotUsable):
            accounts.resolve_account(s, bob, other, required=False, today=today())


def test_account_and_member_limits(world: World) -> None:
    account_id = open_account(world, "bob", "CQ-G-1", limit_fen=50_000, members=("carol",), member_limit_fen=20_000)
    bob, carol = world.actors["bob"].user_id, world.actors["carol"].user_id
    with world.db.unit_of_work() as s:
        account = accounts.get_account(s, account_id, lock=True)
        accounts.place_hold(s, account, carol, (SourceKind.order, 1), 15_000, today=today())
        with pytest.raises(accounts.SpendingLimitExceeded) as err:
            accounts.check_spending(s, account, carol, 5_001, today=today())
        assert (err.value.code, err.value.details["available_fen"]) == ("member_limit_exceeded", 5_000)
        accounts.check_spending(s, account, carol, 5_000, today=today())
        # Re-estimating the same source replaces its hold rather than adding to it.
        accounts.place_hold(s, account, carol, (SourceKind.order, 1), 20_000, today=today())
        accounts.place_hold(s, account, bob, (SourceKind.order, 2), 30_000, today=today())
        with pytest.raises(accounts.SpendingLimitExceeded) as err:
            accounts.check_spending(s, account, bob, 1, today=today())
        assert (err.value.code, err.value.field, err.value.details["available_fen"]) == (
            "spending_limit_exceeded", "account_id", 0)
        assert accounts.commitments(s, account_id).total_fen == 50_000
        assert accounts.commitments(s, account_id, user_id=carol).held_fen == 20_000
        accounts.release_hold(s, (SourceKind.order, 2))
        assert accounts.commitments(s, account_id).held_fen == 20_000
        accounts.check_spending(s, account, bob, 30_000, today=today())


def test_holds_count_until_released_and_not_once_the_booking_is_cancelled(world: World) -> None:
    bw = billing_world(world)
    with world.db.unit_of_work() as s:
        accounts.update_account(s, world.actors["bob"], bw.bob_grant, limit_fen=30_000)
    start = next_grid_day(3, 2)
    first = book(world, "bob", start)  # 2 h at 10,000 fen
    with world.db.unit_of_work(write=False) as s:
        hold = accounts.hold_for(s, (SourceKind.booking, first))
        assert hold is not None and (hold.account_id, hold.amount_fen) == (bw.bob_grant, 2 * CONF_RATES[
            "academic_region"])
    with pytest.raises(accounts.SpendingLimitExceeded):
        book(world, "bob", start + timedelta(hours=3))
    with world.db.unit_of_work(write=False) as s:  # the refused booking was rolled back with its hold
        assert accounts.commitments(s, bw.bob_grant).held_fen == 20_000
    with world.db.unit_of_work() as s:
        booking_service.cancel_booking(s, world.actors["bob"], first)
    with world.db.unit_of_work(write=False) as s:
        assert accounts.commitments(s, bw.bob_grant).held_fen == 0
    second = book(world, "bob", start + timedelta(hours=3))
    with world.db.unit_of_work(write=False) as s:
        assert accounts.commitments(s, bw.bob_grant).held_fen == 20_000
        hold = accounts.hold_for(s, (SourceKind.booking, second))
        assert hold is not None and hold.released_at is None


def test_prepaid_accounts_spend_balance_and_vouchers(world: World) -> None:
    bw = billing_world(world)
    start = next_grid_day(3, 2)
    cost = 2 * CONF_RATES["industry"]
    with pytest.raises(accounts.SpendingLimitExceeded) as err:
        book(world, "dave", start)
    assert err.value.code == "insufficient_balance"
    fund(world, bw.company, cost - 1_000)
    with pytest.raises(accounts.SpendingLimitExceeded):
        book(world, "dave", start)
    give_voucher(world, bw.company, 1_000)
    with world.db.unit_of_work(write=False) as s:
        assert accounts.voucher_balance(s, bw.company, today()) == 1_000
        assert accounts.voucher_balance(s, bw.company, today() + timedelta(days=400)) == 0
    book(world, "dave", start)
    with world.db.unit_of_work(write=False) as s:  # the hold waits for the balance: nothing more fits
        account = accounts.get_account(s, bw.company)
        with pytest.raises(accounts.SpendingLimitExceeded):
            accounts.check_spending(s, account, world.actors["dave"].user_id, 1, today=today())


def test_deposits(world: World) -> None:
    bw = billing_world(world)
    fund(world, bw.company, 100_000, "bank 1")
    fund(world, bw.company, 2_345, " bank 2 ")
    with world.db.unit_of_work() as s:
        assert accounts.get_account(s, bw.company).balance_fen == 102_345
        assert [(d.amount_fen, d.reference) for d in accounts.deposits(s, bw.company)] == [(2_345, "bank 2"),
                                                                                         (100_000, "bank 1")]
        with pytest.raises(Conflict) as conflict:
            accounts.record_deposit(s, None, bw.bob_grant, 100)
        assert conflict.value.code == "not_prepaid"
        for amount in (0, -5, 1.5, True):
            with pytest.raises(InvalidInput) as err:
                accounts.record_deposit(s, None, bw.company, amount)
            assert err.value.field == "amount_fen"
        with pytest.raises(Forbidden):  # the owner does not record their own deposits
            accounts.record_deposit(s, world.actors["dave"], bw.company, 100)
        with pytest.raises(NotFound):
            accounts.record_deposit(s, None, 999_999, 100)
