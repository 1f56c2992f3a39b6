"""Rate cards and billing rules: payer categories, effective dating, billed minutes and rounding."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from labcommons.billing import rates
from labcommons.billing.models import BillingPolicy, ChargeBasis, PayerCategory, Rounding
from labcommons.catalog.models import Institution, InstitutionKind
from labcommons.errors import Conflict, Forbidden, InvalidInput
from tests.billing.billing_support import add_rate, charging, today
from tests.factories import World, grant

P = PayerCategory


@pytest.mark.parametrize(
    ("payer_id", "kind", "region", "expected"),
    [
        (1, InstitutionKind.laboratory, "CQ", P.internal),
        (1, InstitutionKind.company, "CQ", P.internal),  # the provider's own institution, whatever its kind
        (2, InstitutionKind.company, "CQ", P.industry),
        (2, InstitutionKind.company, "SC", P.industry),
        (2, InstitutionKind.university, "CQ", P.academic_region),
        (2, InstitutionKind.hospital, "SC", P.academic_other),
    ],
)
def test_payer_category(payer_id: int, kind: InstitutionKind, region: str, expected: PayerCategory) -> None:
    payer = Institution(id=payer_id, code="X", region_code=region, kind=kind, name_zh="x", name_en="x")
    assert rates.payer_category(payer, 1, "CQ") == expected


def _rates(world: World, category: str = "academic_other", assisted: bool = False) -> list[tuple[date, date | None]]:
    key = rates.target_key(instrument_id=world.instruments["CONF"])
    with world.db.unit_of_work(write=False) as s:
        return [(r.effective_from, r.effective_to) for r in rates.list_rates(s, key=key)
                if r.category == category and r.assisted == assisted]


def test_new_price_closes_the_previous_one(world: World) -> None:
    d0 = date(2026, 1, 1)
    add_rate(world, amount_fen=100, effective_from=d0)
    add_rate(world, amount_fen=200, effective_from=d0 + timedelta(days=10))
    assert _rates(world) == [(d0, d0 + timedelta(days=10)), (d0 + timedelta(days=10), None)]
    key = rates.target_key(instrument_id=world.instruments["CONF"])
    with world.db.unit_of_work(write=False) as s:
        before = rates.rate_on(s, key, P.academic_other, False, d0 + timedelta(days=9))
        after = rates.rate_on(s, key, P.academic_other, False, d0 + timedelta(days=10))
        assert before is not None and before.amount_fen == 100
        assert after is not None and after.amount_fen == 200
        assert rates.rate_on(s, key, P.academic_other, False, d0 - timedelta(days=1)) is None
        assert rates.rate_on(s, key, P.industry, False, d0 + timedelta(days=20)) is None


def test_a_future_price_bounds_a_new_earlier_one(world: World) -> None:
    d0 = date(2026, 1, 1)
    add_rate(world, amount_fen=100, effective_from=d0)
    add_rate(world, amount_fen=300, effective_from=d0 + timedelta(days=30))
    add_rate(world, amount_fen=200, effective_from=d0 + timedelta(days=10))
    assert _rates(world) == [
        (d0, d0 + timedelta(days=10)),
        (d0 + timedelta(days=10), d0 + timedelta(days=30)),
        (d0 + timedelta(days=30), None),
    ]


def test_a_second_price_on_the_same_day_conflicts(world: World) -> None:
    add_rate(world, amount_fen=100, effective_from=date(2026, 1, 1))
    with pytest.raises(Conflict) as err:
        add_rate(world, amount_fen=200, effective_from=date(2026, 1, 1))
    assert err.value.field == "effective_from"
    # Another category or the assisted price may start that day.
    add_rate(world, category="industry", amount_fen=200, effective_from=date(2026, 1, 1))
    add_rate(world, assisted=True, amount_fen=200, effective_from=date(2026, 1, 1))


def test_managers_cannot_start_a_price_in_the_past(world: World) -> None:
    manager = grant(world, "alice", "facility_manager")
    with world.db.unit_of_work() as s, pytest.raises(InvalidInput) as err:
        rates.set_rate(s, manager, instrument_id=world.instruments["CONF"], category="industry", unit="hour",
                       amount_fen=100, effective_from=today() - timedelta(days=5))
    assert err.value.field == "effective_from"
    with world.db.unit_of_work() as s:
        rate = rates.set_rate(s, manager, instrument_id=world.instruments["CONF"], category="industry", unit="hour",
                              amount_fen=100, effective_from=today())
        assert rate.created_by_id == manager.user_id


def test_only_the_facility_manager_sets_rates(world: World) -> None:
    with world.db.unit_of_work() as s, pytest.raises(Forbidden):
        rates.set_rate(s, world.actors["bob"], instrument_id=world.instruments["CONF"], category="industry",
                       unit="hour", amount_fen=100, effective_from=today())


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(category="nobody"), "category"),
        (dict(unit="litre"), "unit"),
        (dict(unit="project"), "unit"),  # instrument time is never per project
        (dict(amount_fen=-1), "amount_fen"),
        (dict(amount_fen=1.5), "amount_fen"),
        (dict(amount_fen=rates.MAX_RATE_FEN + 1), "amount_fen"),
    ],
)
def test_invalid_rates_name_the_field(world: World, fields: dict[str, object], field: str) -> None:
    values: dict[str, object] = dict(category="industry", unit="hour", amount_fen=100, effective_from=today())
    values.update(fields)
    with world.db.unit_of_work() as s, pytest.raises(InvalidInput) as err:
        rates.set_rate(s, None, instrument_id=world.instruments["CONF"], **values)
    assert err.value.field == field


def test_assisted_and_unassisted_fall_back_to_each_other(world: World) -> None:
    key = rates.target_key(instrument_id=world.instruments["CONF"])
    add_rate(world, amount_fen=100, assisted=False)
    add_rate(world, category="industry", amount_fen=900, assisted=True)
    with world.db.unit_of_work(write=False) as s:
        on = today()
        assisted = rates.rate_on(s, key, P.academic_other, True, on)
        assert assisted is not None and assisted.amount_fen == 100 and not assisted.assisted
        plain = rates.rate_on(s, key, P.industry, False, on)
        assert plain is not None and plain.amount_fen == 900 and plain.assisted
    add_rate(world, amount_fen=150, assisted=True)
    with world.db.unit_of_work(write=False) as s:
        chosen = rates.rate_on(s, key, P.academic_other, True, today())
        assert chosen is not None and chosen.amount_fen == 150


def test_policy_rules_are_validated(world: World) -> None:
    charging(world, basis="greater", increment_minutes=30, rounding="nearest", charge_no_show=False)
    with world.db.unit_of_work(write=False) as s:
        policy = rates.policy_for(s, world.facilities["CQ-LAB"])
        assert policy is not None
        assert (policy.basis, policy.increment_minutes, policy.rounding, policy.charge_no_show) == (
            ChargeBasis.greater, 30, Rounding.nearest, False)
        assert rates.policy_for(s, world.facilities["SC-UNI"]) is None
    for fields, field in ((dict(basis="weekly"), "basis"), (dict(increment_minutes=0), "increment_minutes"),
                          (dict(increment_minutes=241), "increment_minutes"), (dict(rounding="down"), "rounding"),
                          (dict(charge_no_show="yes"), "charge_no_show"), (dict(colour="red"), "colour")):
        with world.db.unit_of_work() as s, pytest.raises(InvalidInput) as err:
            rates.save_policy(s, None, world.facilities["CQ-LAB"], **fields)
        assert err.value.field == field


B, R = ChargeBasis, Rounding


@pytest.mark.parametrize(
    ("basis", "rounding", "increment", "no_show_charged", "booked", "actual", "no_show", "expected"),
    [
        # booked basis: the actual time does not matter
        (B.booked, R.up, 15, True, 120, 50, False, 120),
        (B.booked, R.up, 15, True, 61, None, False, 75),
        (B.booked, R.nearest, 15, True, 67, None, False, 60),
        (B.booked, R.nearest, 15, True, 68, None, False, 75),  # 7.5 rounds half up
        # actual basis
        (B.actual, R.up, 15, True, 120, 50, False, 60),
        (B.actual, R.nearest, 15, True, 120, 52, False, 45),
        (B.actual, R.nearest, 15, True, 120, 53, False, 60),
        (B.actual, R.up, 15, True, 120, 0, False, 0),
        (B.actual, R.up, 15, True, 120, None, False, 120),  # never checked in: the booked time
        (B.actual, R.up, 1, True, 120, 7, False, 7),
        # greater of the two
        (B.greater, R.up, 15, True, 120, 50, False, 120),
        (B.greater, R.up, 15, True, 120, 131, False, 135),
        (B.greater, R.nearest, 30, True, 120, 134, False, 120),
        (B.greater, R.nearest, 30, True, 120, 135, False, 150),
        # no-shows pay the booked time, or nothing
        (B.booked, R.up, 15, True, 90, None, True, 90),
        (B.actual, R.up, 60, True, 90, None, True, 120),
        (B.greater, R.nearest, 60, True, 90, None, True, 120),
        (B.booked, R.up, 15, False, 90, None, True, 0),
        (B.actual, R.nearest, 15, False, 90, None, True, 0),
        (B.greater, R.up, 15, False, 90, None, True, 0),
    ],
)
def test_billed_minutes(basis: ChargeBasis, rounding: Rounding, increment: int, no_show_charged: bool, booked: int,
                        actual: int | None, no_show: bool, expected: int) -> None:
    policy = BillingPolicy(basis=basis, rounding=rounding, increment_minutes=increment, charge_no_show=no_show_charged)
    assert rates.billed_minutes(policy, booked=booked, actual=actual, no_show=no_show) == expected


@pytest.mark.parametrize(
    ("rate", "minutes", "expected"),
    [
        (12_345, 7, 1_440),  # 1440.25 → 1440
        (12_345, 60, 12_345),
        (12_345, 120, 24_690),
        (10_000, 1, 167),  # 166.67 → 167
        (90, 1, 2),  # 1.5 → 2: half up
        (30, 1, 1),  # 0.5 → 1
        (29, 1, 0),  # 0.483 → 0
        (0, 600, 0),
    ],
)
def test_hourly_amount_rounds_half_up(rate: int, minutes: int, expected: int) -> None:
    assert rates.hourly_amount(rate, minutes) == expected


@pytest.mark.parametrize(("amount", "bp", "expected"), [(12_345, 1000, 1_235), (12_344, 1000, 1_234),
                                                         (5, 1000, 1), (4, 1000, 0), (100, 10000, 100)])
def test_discount_rounds_half_up(amount: int, bp: int, expected: int) -> None:
    assert rates.discount_amount(amount, bp) == expected
