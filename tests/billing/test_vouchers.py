"""Innovation vouchers: issuing, eligibility, recognition between regions, share caps and balances."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from sqlalchemy import select

from labcommons.billing import ledger, vouchers
from labcommons.billing.models import Voucher, VoucherRedemption, VoucherStatus
from labcommons.errors import Conflict, Forbidden, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity import service as identity
from tests.billing.billing_support import (
    balance_of,
    billing_world,
    check_ledger,
    give_voucher,
    open_account,
    recognition_restored,
    today,
)
from tests.factories import World, actor_of

D = date(2026, 6, 1)


def _voucher(**fields: object) -> Voucher:
    values: dict[str, object] = dict(status=VoucherStatus.active, valid_from=D, valid_until=D + timedelta(days=30),
                                     eligible_kinds="", eligible_categories="")
    values.update(fields)
    return Voucher(**values)


@pytest.mark.parametrize(
    ("fields", "kind", "category", "on", "expected"),
    [
        ({}, "instrument", "MIC.CONF", D, True),
        ({}, "consultation", None, D + timedelta(days=30), True),  # the last valid day
        ({}, "instrument", "MIC.CONF", D - timedelta(days=1), False),
        ({}, "instrument", "MIC.CONF", D + timedelta(days=31), False),
        (dict(status=VoucherStatus.revoked), "instrument", "MIC.CONF", D, False),
        (dict(eligible_kinds="testing rnd"), "testing", None, D, True),
        (dict(eligible_kinds="testing rnd"), "instrument", "MIC.CONF", D, False),
        (dict(eligible_categories="MIC"), "instrument", "MIC.CONF", D, True),  # a code covers its sub-categories
        (dict(eligible_categories="MIC"), "instrument", "MIC", D, True),
        (dict(eligible_categories="MIC"), "instrument", "MICRO.X", D, False),  # a prefix of letters is not enough
        (dict(eligible_categories="MIC.CONF"), "instrument", "MIC", D, False),
        (dict(eligible_categories="GEN MIC.EM"), "instrument", "GEN.SEQ", D, True),
        (dict(eligible_categories="GEN"), "testing", None, D, False),  # no category: a category voucher says no
        (dict(eligible_kinds="instrument", eligible_categories="GEN"), "instrument", "GEN.SPATIAL", D, True),
    ],
)
def test_covers(fields: dict[str, object], kind: str, category: str | None, on: date, expected: bool) -> None:
    assert vouchers.covers(_voucher(**fields), item_kind=kind, category_code=category, on=on) is expected


def test_issue_rules(world: World) -> None:
    account = open_account(world, "carol", "SC-G-1")
    good: dict[str, object] = dict(issuer_region_code="SC", account_id=account, amount_fen=100_000,
                                   valid_from=D, valid_until=D + timedelta(days=90))
    cases: list[tuple[dict[str, object], type[Exception], str]] = [
        (dict(amount_fen=0), InvalidInput, "amount_fen"),
        (dict(amount_fen=1.5), InvalidInput, "amount_fen"),
        (dict(share_bp=0), InvalidInput, "share_bp"),
        (dict(share_bp=10_001), InvalidInput, "share_bp"),
        (dict(valid_until=D - timedelta(days=1)), InvalidInput, "valid_until"),
        (dict(eligible_kinds="instrument haircuts"), InvalidInput, "eligible_kinds"),
        (dict(eligible_categories="NOPE.NOPE"), InvalidInput, "eligible_categories"),
        (dict(issuer_region_code="XX"), NotFound, "issuer_region_code"),
        (dict(account_id=999_999), NotFound, "account_id"),
        (dict(code="SC-IV-TAKEN"), Conflict, "code"),
    ]
    with world.db.unit_of_work() as s:
        issued = vouchers.issue_voucher(s, None, code="SC-IV-TAKEN", eligible_kinds=["instrument", "testing"],
                                        eligible_categories="GEN MIC", **good)
        assert (issued.balance_fen, issued.share_bp, issued.eligible_kinds) == (100_000, 5000, "instrument testing")
        generated = vouchers.issue_voucher(s, None, **good)
        assert generated.code.startswith("SC-IV-") and generated.code != issued.code
    for fields, error, field in cases:
        with world.db.unit_of_work() as s, pytest.raises(error) as err:
            vouchers.issue_voucher(s, None, **{**good, **fields})
        assert err.value.field == field, fields  # type: ignore[attr-defined]
    with world.db.unit_of_work() as s, pytest.raises(Forbidden):
        vouchers.issue_voucher(s, world.actors["carol"], **good)


def test_only_the_issuing_authority_revokes(world: World) -> None:
    account = open_account(world, "carol", "SC-G-1")
    voucher_id = give_voucher(world, account, 10_000, issuer="SC")
    with world.db.unit_of_work() as s:
        roles.grant_role(s, None, identity.find_user(s, "alice@example.org"), "region_authority", region_code="CQ")
        roles.grant_role(s, None, identity.find_user(s, "bob@example.org"), "region_authority", region_code="SC")
    with world.db.unit_of_work() as s, pytest.raises(Forbidden):
        vouchers.revoke_voucher(s, actor_of(world, "alice"), voucher_id)
    with world.db.unit_of_work() as s:
        assert vouchers.revoke_voucher(s, actor_of(world, "bob"), voucher_id).status == VoucherStatus.revoked
        assert vouchers.applicable(s, account, provider_region_code="SC", item_kind="instrument",
                                   category_code="MIC.CONF", on=today()) == []
        assert [v.id for v in vouchers.vouchers_of_region(s, "SC")] == [voucher_id]


def test_recognition_both_ways(world: World) -> None:
    sc_account = open_account(world, "carol", "SC-G-1")
    cq_account = open_account(world, "bob", "CQ-G-1")
    sc_voucher = give_voucher(world, sc_account, 10_000, issuer="SC")
    cq_voucher = give_voucher(world, cq_account, 10_000, issuer="CQ")

    def usable(account: int, provider: str) -> list[int]:
        with world.db.unit_of_work(write=False) as s:
            return [v.id for v in vouchers.applicable(s, account, provider_region_code=provider,
                                                      item_kind="instrument", category_code="MIC.CONF", on=today())]

    # Seeded by the migration: both regions accept each other's vouchers.
    assert usable(sc_account, "CQ") == [sc_voucher] and usable(sc_account, "SC") == [sc_voucher]
    assert usable(cq_account, "SC") == [cq_voucher] and usable(cq_account, "CQ") == [cq_voucher]
    with recognition_restored(world.db):
        with world.db.unit_of_work() as s:
            vouchers.set_recognition(s, None, "SC", "CQ", False)
            assert not vouchers.recognised(s, "SC", "CQ") and vouchers.recognised(s, "CQ", "SC")
        assert usable(sc_account, "CQ") == [] and usable(sc_account, "SC") == [sc_voucher]
        assert usable(cq_account, "SC") == [cq_voucher]
        with world.db.unit_of_work() as s:
            vouchers.set_recognition(s, None, "CQ", "SC", False)
        assert usable(cq_account, "SC") == [] and usable(cq_account, "CQ") == [cq_voucher]
        with world.db.unit_of_work() as s:
            vouchers.set_recognition(s, None, "SC", "CQ", True)
            vouchers.set_recognition(s, None, "SC", "CQ", True)  # twice is once
            assert [(r.issuer_region_code, r.provider_region_code) for r in vouchers.recognitions(s)] == [
                ("CQ", "CQ"), ("SC", "CQ"), ("SC", "SC")]
        assert usable(sc_account, "CQ") == [sc_voucher]
        with world.db.unit_of_work() as s, pytest.raises(Forbidden):
            vouchers.set_recognition(s, world.actors["bob"], "SC", "CQ", False)
    with world.db.unit_of_work(write=False) as s:
        assert len(vouchers.recognitions(s)) == 4


def test_unrecognised_voucher_does_not_pay(world: World) -> None:
    bw = billing_world(world)
    voucher_id = give_voucher(world, bw.carol_grant, 10_000, issuer="SC")
    carol = world.actors["carol"].user_id
    with recognition_restored(world.db), world.db.unit_of_work() as s:
        vouchers.set_recognition(s, None, "SC", "CQ", False)
        charge = ledger.post_manual_charge(s, None, facility_id=world.facilities["CQ-LAB"],
                                           account_id=bw.carol_grant, user_id=carol, description="Consult",
                                           amount_fen=4_000, service_date=today())
        assert ledger.parts_of(s, charge.id) == ledger.ChargeParts(0, 0, 4_000)
    with world.db.unit_of_work() as s:
        charge = ledger.post_manual_charge(s, None, facility_id=world.facilities["CQ-LAB"], account_id=bw.carol_grant,
                                           user_id=carol, description="Consult", amount_fen=4_000,
                                           service_date=today())
        assert ledger.parts_of(s, charge.id) == ledger.ChargeParts(2_000, 0, 2_000)
    assert balance_of(world, voucher_id=voucher_id) == 8_000


def _manual(world: World, account: int, user: str, amount: int) -> ledger.ChargeParts:
    with world.db.unit_of_work() as s:
        charge = ledger.post_manual_charge(s, None, facility_id=world.facilities["CQ-LAB"], account_id=account,
                                           user_id=world.actors[user].user_id, description="Consumables",
                                           amount_fen=amount, service_date=today())
        return ledger.parts_of(s, charge.id)


def test_several_vouchers_pay_no_more_than_the_largest_share(world: World) -> None:
    bw = billing_world(world)
    soon = give_voucher(world, bw.bob_grant, 100_000, share_bp=3000, valid_until=today() + timedelta(days=10))
    later = give_voucher(world, bw.bob_grant, 100_000, share_bp=5000)
    assert _manual(world, bw.bob_grant, "bob", 10_001) == ledger.ChargeParts(5_000, 0, 5_001)
    # The voucher expiring first pays first, the other tops up to its own share.
    assert balance_of(world, voucher_id=soon) == 97_000 and balance_of(world, voucher_id=later) == 98_000
    bigger_first = give_voucher(world, bw.alice_grant, 100_000, share_bp=8000, valid_until=today() + timedelta(days=5))
    give_voucher(world, bw.alice_grant, 100_000, share_bp=2000)
    assert _manual(world, bw.alice_grant, "alice", 10_000) == ledger.ChargeParts(8_000, 0, 2_000)
    assert balance_of(world, voucher_id=bigger_first) == 92_000
    with world.db.unit_of_work(write=False) as s:
        check_ledger(s)


def test_a_voucher_balance_never_goes_negative(world: World) -> None:
    bw = billing_world(world)
    voucher_id = give_voucher(world, bw.bob_grant, 1_500, share_bp=10_000)
    assert _manual(world, bw.bob_grant, "bob", 1_000) == ledger.ChargeParts(1_000, 0, 0)
    assert _manual(world, bw.bob_grant, "bob", 1_000) == ledger.ChargeParts(500, 0, 500)
    assert _manual(world, bw.bob_grant, "bob", 1_000) == ledger.ChargeParts(0, 0, 1_000)
    assert balance_of(world, voucher_id=voucher_id) == 0
    with world.db.unit_of_work() as s:
        assert [r.amount_fen for r in vouchers.redemptions(s, voucher_id)] == [1_000, 500]
        assert vouchers.take(s, voucher_id, 10) == 0
        assert s.scalar(select(VoucherRedemption.id).where(VoucherRedemption.amount_fen == 0)) is None
        check_ledger(s)


def test_take_and_give_back(world: World) -> None:
    account = open_account(world, "bob", "CQ-G-1")
    voucher_id = give_voucher(world, account, 1_000)
    with world.db.unit_of_work() as s:
        assert vouchers.take(s, voucher_id, 300) == 300
        assert vouchers.take(s, voucher_id, 5_000) == 700
        assert vouchers.take(s, voucher_id, 1) == 0
        vouchers.give_back(s, voucher_id, 250)
    assert balance_of(world, voucher_id=voucher_id) == 250


def test_vouchers_outside_their_dates_or_kinds_do_not_pay(world: World) -> None:
    bw = billing_world(world)
    give_voucher(world, bw.bob_grant, 10_000, valid_from=today() + timedelta(days=1))
    give_voucher(world, bw.bob_grant, 10_000, valid_from=today() - timedelta(days=30),
                 valid_until=today() - timedelta(days=1))
    give_voucher(world, bw.bob_grant, 10_000, kinds="testing")
    give_voucher(world, bw.bob_grant, 10_000, categories="MIC")  # a manual charge has no category
    assert _manual(world, bw.bob_grant, "bob", 1_000) == ledger.ChargeParts(0, 0, 1_000)
    give_voucher(world, bw.bob_grant, 10_000, kinds="consultation instrument")
    assert _manual(world, bw.bob_grant, "bob", 1_000) == ledger.ChargeParts(500, 0, 500)
