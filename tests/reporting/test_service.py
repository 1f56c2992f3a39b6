"""The metrics service on hand-made examples: scopes and who may open them, periods, visible scopes, utilisation
against opening hours and downtime, the lead-time median, top and idle instruments, orders and money, and
breakdowns that add up to their totals."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert

from labcommons.actor import Actor, Grant
from labcommons.billing.models import AccountKind, BillingAccount, Charge, PayerCategory, RateUnit, SourceKind
from labcommons.booking.models import Booking, BookingPolicy, BookingStatus
from labcommons.catalog.models import Instrument, InstrumentStatus, Service, ServiceKind
from labcommons.errors import DomainError, Forbidden, InvalidInput, NotFound
from labcommons.orders.models import OrderEvent, OrderRating, OrderStatus, ServiceOrder
from labcommons.reporting import aggregate, service
from labcommons.reporting.service import MAX_PERIOD_DAYS, InstrumentRow, Period, Scope, ScopeKind
from tests.factories import World
from tests.reporting.conftest import TODAY, actor, local

WEEK = Period(date(2026, 3, 9), date(2026, 3, 15))  # Monday … Sunday, before TODAY
WEEKDAYS_9_TO_18 = json.dumps({d: [["09:00", "18:00"]] for d in ("mon", "tue", "wed", "thu", "fri")})


def book(world: World, instrument: str, user: str, start: datetime, minutes: int, **fields: Any) -> None:
    with world.db.unit_of_work() as s:
        s.add(Booking(instrument_id=world.instruments[instrument], user_id=world.actors[user].user_id,
                      starts_at=start, ends_at=start + timedelta(minutes=minutes),
                      status=fields.pop("status", BookingStatus.confirmed), **fields))


def scope(world: World, token: str) -> Scope:
    with world.db.session() as s:
        return service.resolve_scope(s, actor(Grant("platform_admin")), token)


# ------------------------------------------------------------------------------------------------ scopes


def _tokens(world: World) -> dict[str, str]:
    i, f = world.institutions, world.facilities
    return {"platform": "platform", "CQ": "region:CQ", "SC": "region:SC", "i-CQ-LAB": f"institution:{i['CQ-LAB']}",
            "i-CQ-UNI": f"institution:{i['CQ-UNI']}", "i-SC-UNI": f"institution:{i['SC-UNI']}",
            "f-CQ-LAB": f"facility:{f['CQ-LAB']}", "f-CQ-UNI": f"facility:{f['CQ-UNI']}",
            "f-SC-UNI": f"facility:{f['SC-UNI']}"}


def _actors(world: World) -> dict[str, tuple[Actor | None, set[str]]]:
    """Each kind of actor and the scopes it may open."""
    i, f = world.institutions, world.facilities
    everything = set(_tokens(world))
    return {
        "platform admin": (actor(Grant("platform_admin")), everything),
        "CQ authority": (actor(Grant("region_authority", region_code="CQ")), {"CQ", "i-CQ-LAB", "i-CQ-UNI",
                                                                               "f-CQ-LAB", "f-CQ-UNI"}),
        "SC authority": (actor(Grant("region_authority", region_code="SC"), region_code="SC"),
                         {"SC", "i-SC-UNI", "f-SC-UNI"}),
        "CQ-LAB admin": (actor(Grant("institution_admin", institution_id=i["CQ-LAB"])), {"i-CQ-LAB", "f-CQ-LAB"}),
        "CQ-UNI manager": (actor(Grant("facility_manager", facility_id=f["CQ-UNI"])), {"f-CQ-UNI"}),
        "SC-UNI staff": (actor(Grant("facility_staff", facility_id=f["SC-UNI"])), {"f-SC-UNI"}),
        "plain user": (actor(), set()),
        "nobody": (None, set()),
    }


def test_each_role_opens_exactly_its_scopes(world: World) -> None:
    tokens = _tokens(world)
    with world.db.session() as s:
        for who, (person, allowed) in _actors(world).items():
            for name, token in tokens.items():
                if name in allowed:
                    found = service.resolve_scope(s, person, token)
                    assert found.token == token, (who, name)
                else:
                    with pytest.raises(Forbidden):
                        service.resolve_scope(s, person, token)


def test_a_resolved_scope_carries_its_names_and_region(world: World) -> None:
    assert scope(world, "region:SC") == Scope(ScopeKind.region, "SC", "四川", "Sichuan", "SC")
    inst = scope(world, f"institution:{world.institutions['SC-UNI']}")
    assert (inst.kind, inst.name_en, inst.region_code) == (ScopeKind.institution, "SC-UNI Laboratory", "SC")
    fac = scope(world, f"facility:{world.facilities['CQ-UNI']}")
    assert (fac.name("zh-CN"), fac.name("en"), fac.region_code) == ("CQ-UNI 平台", "CQ-UNI Core", "CQ")


@pytest.mark.parametrize("token", ["region:XX", "region:cq", "institution:99999", "facility:99999",
                                   "institution:99999999999", "facility:2147483648", "institution:0"])
def test_unknown_scopes_are_not_found(world: World, token: str) -> None:
    with world.db.session() as s, pytest.raises(NotFound) as caught:
        service.resolve_scope(s, actor(Grant("platform_admin")), token)
    assert caught.value.field == "scope"


@pytest.mark.parametrize("token", [None, "", "  ", "planet", "Region:CQ", "region:", "institution:", "institution:x",
                                   "facility:-1", "facility:1.5", "institution:²", "institution:" + "1" * 21,
                                   "region:" + "C" * 21])
def test_malformed_scope_tokens_are_invalid_input(world: World, token: str | None) -> None:
    with world.db.session() as s, pytest.raises(InvalidInput) as caught:
        service.resolve_scope(s, actor(Grant("platform_admin")), token)
    assert caught.value.field == "scope"


def test_statistics_roles_pass_the_first_gate_and_others_do_not(world: World) -> None:
    for who, (person, allowed) in _actors(world).items():
        if allowed:
            assert service.require_statistics_role(person) is person, who
        else:
            with pytest.raises(DomainError) as caught:
                service.require_statistics_role(person)
            assert caught.value.code == ("unauthenticated" if person is None else "forbidden"), who


def test_visible_scopes_of_each_role(world: World) -> None:
    names = {v: k for k, v in _tokens(world).items()}
    expected = {
        "platform admin": ["platform", "CQ", "SC"],
        "CQ authority": ["CQ"],
        "SC authority": ["SC"],
        "CQ-LAB admin": ["i-CQ-LAB", "f-CQ-LAB"],
        "CQ-UNI manager": ["f-CQ-UNI"],
        "SC-UNI staff": ["f-SC-UNI"],
        "plain user": [],
        "nobody": [],
    }
    with world.db.session() as s:
        for who, (person, allowed) in _actors(world).items():
            shown = [names[sc.token] for sc in service.visible_scopes(s, person)]
            assert shown == expected[who], who
            assert set(shown) <= allowed, who  # nothing offered that cannot be opened
        both = actor(Grant("region_authority", region_code="SC"),
                     Grant("facility_staff", facility_id=world.facilities["CQ-LAB"]))
        assert [names[sc.token] for sc in service.visible_scopes(s, both)] == ["SC", "f-CQ-LAB"]


# ------------------------------------------------------------------------------------------------ periods


def test_parse_period_defaults_to_the_year_so_far() -> None:
    assert service.parse_period(None, None, today=TODAY) == Period(date(2026, 1, 1), TODAY)
    assert service.parse_period("", "", today=TODAY) == Period(date(2026, 1, 1), TODAY)
    assert service.parse_period("2026-02-01", None, today=TODAY) == Period(date(2026, 2, 1), TODAY)
    assert service.parse_period(None, "2026-01-31", today=TODAY) == Period(date(2026, 1, 1), date(2026, 1, 31))
    assert service.parse_period(date(2025, 3, 1), date(2025, 3, 1), today=TODAY).days == 1
    longest = service.parse_period("2023-01-01", date(2023, 1, 1) + timedelta(days=MAX_PERIOD_DAYS - 1), today=TODAY)
    assert longest.days == MAX_PERIOD_DAYS


@pytest.mark.parametrize(("first", "last", "field"), [
    ("2026-03-02", "2026-03-01", "to"),  # reversed
    ("2020-01-01", "2026-01-01", "to"),  # too long
    ("2026-13-01", "2026-03-01", "from"),
    ("yesterday", None, "from"),
    ("2026-03-01", "2026-02-30", "to"),
])
def test_bad_periods_name_their_field(first: str, last: str | None, field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        service.parse_period(first, last, today=TODAY)
    assert caught.value.field == field


def test_year_period() -> None:
    assert service.year_period(2025) == Period(date(2025, 1, 1), date(2025, 12, 31))
    with pytest.raises(InvalidInput) as caught:
        service.year_period(1999)
    assert caught.value.field == "year"


# ------------------------------------------------------------------------------------------------ figures


def test_utilisation_counts_opening_hours_and_downtime_only_while_open(world: World) -> None:
    ms = world.instruments["SC-MS"]
    with world.db.unit_of_work() as s:
        s.add(BookingPolicy(instrument_id=ms, opening_hours=WEEKDAYS_9_TO_18))
    book(world, "SC-MS", "carol", local(date(2026, 3, 10), 9), 270)  # Tuesday
    book(world, "SC-MS", "carol", local(date(2026, 3, 11), 10), 120, kind="maintenance")  # Wednesday, while open
    book(world, "SC-MS", "carol", local(date(2026, 3, 14), 8), 240, kind="maintenance")  # Saturday: closed anyway
    aggregate.ensure_current(world.db)
    fac = scope(world, f"facility:{world.facilities['SC-UNI']}")
    with world.db.session() as s:
        t = service.totals(s, fac, WEEK, TODAY)
        assert (t.instruments, t.booked_min, t.maintenance_min) == (1, 270, 360)
        assert t.available_min == 5 * 540 - 120
        assert t.utilisation == round(270 / 2580, 4)
        [row] = service.instrument_rows(s, fac, WEEK, TODAY)
        assert (row.available_min, row.utilisation) == (t.available_min, t.utilisation)
        granularity, points = service.series(s, fac, WEEK, TODAY)
        assert granularity == "day"
        assert [p.available_min for p in points] == [540, 540, 420, 540, 540, 0, 0]
        assert sum(p.available_min for p in points) == t.available_min
        assert points[1].utilisation == 0.5 and points[5].utilisation is None


def test_an_instrument_without_opening_hours_is_available_all_day(world: World) -> None:
    book(world, "SC-MS", "carol", local(date(2026, 3, 12), 22), 240)
    aggregate.ensure_current(world.db)
    with world.db.session() as s:
        t = service.totals(s, scope(world, f"facility:{world.facilities['SC-UNI']}"), WEEK, TODAY)
    assert (t.available_min, t.booked_min) == (7 * 1440, 240)
    assert t.utilisation == round(240 / (7 * 1440), 4)


@pytest.mark.parametrize(("counts", "median"), [
    ([0] * 8, None),
    ([2, 0, 0, 0, 0, 0, 0, 0], 0.5),
    ([1, 1, 0, 0, 0, 0, 0, 0], 1.0),
    ([0, 0, 4, 0, 0, 0, 0, 0], 14.0),  # 4 h + half of the 4–24 h bucket
    ([1, 0, 0, 0, 0, 0, 0, 2], 720.0),  # the open last bucket reports its lower bound
    ([0, 3, 0, 0, 0, 0, 0, 1], 3.0),  # half = 2 of 3 in 1–4 h: 1 + 3 × 2/3
])
def test_median_from_buckets(counts: list[int], median: float | None) -> None:
    assert service.median_from_buckets(counts) == median


def _row(iid: int, booked: int, effective: int, available: int, retired: bool = False) -> InstrumentRow:
    return InstrumentRow(iid, f"I{iid}", "", "", 1, "CQ", 1 if booked else 0, booked, effective, 0, 0, available,
                         service._ratio(booked, available), 0, retired)


def test_top_and_idle_ordering_and_idle_count() -> None:
    rows = [_row(1, 600, 100, 1000), _row(2, 300, 300, 1000), _row(3, 0, 0, 1000), _row(4, 300, 300, 500),
            _row(5, 0, 0, 0), _row(6, 50, 50, 0, retired=True), _row(7, 10, 0, 1000)]
    top, idle, idle_count = service.top_and_idle(rows, n=3)
    # Busiest by effective, then booked, then id; never an instrument without booked time.
    assert [r.instrument_id for r in top] == [2, 4, 1]
    # Least used first (no utilisation counts as none), retired ones are not idle, they cannot be booked.
    assert [r.instrument_id for r in idle] == [3, 5, 7]
    assert idle_count == 2
    all_top, _idle, _n = service.top_and_idle(rows)
    assert [r.instrument_id for r in all_top] == [2, 4, 1, 6, 7]


def test_the_dashboard_lists_every_bookable_instrument_and_counts_the_idle_ones(world: World) -> None:
    book(world, "CONF", "carol", local(date(2026, 3, 10), 9), 120)
    book(world, "SEQ", "bob", local(date(2026, 3, 10), 9), 240, checked_in_at=local(date(2026, 3, 10), 12))
    with world.db.unit_of_work() as s:
        retired = s.get(Instrument, world.instruments["EM"])
        assert retired is not None
        retired.status = InstrumentStatus.retired
    aggregate.ensure_current(world.db)
    lab = scope(world, f"facility:{world.facilities['CQ-LAB']}")
    with world.db.session() as s:
        d = service.dashboard(s, lab, WEEK, TODAY)
    assert [r.code for r in d.top] == ["CQ-CONF", "CQ-SEQ"]  # 120 effective minutes against 60
    assert d.idle_count == 2  # SPATIAL and LOCAL; EM is retired and not listed
    assert {r.code for r in d.idle} == {"CQ-SPATIAL", "CQ-LOCAL", "CQ-CONF", "CQ-SEQ"}
    assert d.totals.instruments == 4
    assert d.as_json()["scope"]["token"] == lab.token


def _orders_world(world: World) -> None:
    """Two orders at CQ-LAB's facility, one at SC-UNI's; charges between institutions and regions."""
    with world.db.unit_of_work() as s:
        services = {}
        for key in ("CQ-LAB", "SC-UNI"):
            svc = Service(code=f"S-{key}", facility_id=world.facilities[key], kind=ServiceKind.testing,
                          name_zh="检测", name_en="Testing", category_code="MIC.CONF")
            s.add(svc)
            s.flush()
            services[key] = svc.id
        plan = [  # facility, user, submitted, delivered, rating
            ("CQ-LAB", "bob", local(date(2026, 3, 9), 10), local(date(2026, 3, 11), 22), (5, date(2026, 3, 12))),
            ("CQ-LAB", "carol", local(date(2026, 3, 10), 8), local(date(2026, 3, 10), 20), (2, date(2026, 3, 15))),
            ("CQ-LAB", "bob", local(date(2026, 3, 1), 8), local(date(2026, 3, 16), 1), None),  # delivered later
            ("SC-UNI", "alice", local(date(2026, 3, 12), 9), local(date(2026, 3, 13), 9), (4, date(2026, 3, 13))),
            ("SC-UNI", "carol", None, None, None),  # a draft
        ]
        for n, (fac, user, submitted, delivered, rating) in enumerate(plan):
            order = ServiceOrder(service_id=services[fac], facility_id=world.facilities[fac],
                                 user_id=world.actors[user].user_id, title=f"Order {n}", submitted_at=submitted,
                                 status=OrderStatus.results_delivered if delivered else OrderStatus.draft)
            s.add(order)
            s.flush()
            if delivered is not None:
                for version, at in ((1, delivered), (2, delivered + timedelta(days=1))):  # first delivery counts
                    s.add(OrderEvent(order_id=order.id, version=version, from_status=OrderStatus.in_progress,
                                     to_status=OrderStatus.results_delivered, at=at))
            if rating is not None:
                s.add(OrderRating(order_id=order.id, service_id=services[fac], user_id=world.actors[user].user_id,
                                  score=rating[0], created_at=local(rating[1], 12)))
        accounts = {}
        for key, region in (("CQ-LAB", "CQ"), ("CQ-UNI", "CQ"), ("SC-UNI", "SC")):
            account = BillingAccount(code=f"A-{key}", name=key, kind=AccountKind.grant,
                                     institution_id=world.institutions[key], region_code=region,
                                     owner_id=world.actors["alice"].user_id)
            s.add(account)
            s.flush()
            accounts[key] = account.id
        charges = [  # provider, payer, amount, day
            ("CQ-LAB", "CQ-LAB", 10_000, date(2026, 3, 10)),
            ("CQ-LAB", "CQ-UNI", 20_000, date(2026, 3, 11)),
            ("CQ-LAB", "SC-UNI", 40_000, date(2026, 3, 15)),
            ("CQ-LAB", "SC-UNI", -5_000, date(2026, 3, 15)),  # a correction
            ("SC-UNI", "CQ-LAB", 7_000, date(2026, 3, 9)),
            ("SC-UNI", "CQ-LAB", 99_999, date(2026, 3, 16)),  # after the period
        ]
        for n, (provider, payer, amount, day) in enumerate(charges):
            s.execute(insert(Charge).values(
                account_id=accounts[payer], user_id=world.actors["alice"].user_id,
                facility_id=world.facilities[provider], provider_institution_id=world.institutions[provider],
                provider_region_code=provider[:2], payer_institution_id=world.institutions[payer],
                payer_region_code=payer[:2], source_kind=SourceKind.manual, source_id=n + 1, seq=1,
                item_kind="testing", payer_category=PayerCategory.internal, unit=RateUnit.sample, quantity=1,
                unit_amount_fen=amount, list_amount_fen=amount, discount_fen=0, amount_fen=amount,
                description="t", service_date=day))


def test_orders_turnaround_revenue_and_ratings(world: World) -> None:
    _orders_world(world)
    lab = scope(world, f"facility:{world.facilities['CQ-LAB']}")
    with world.db.session() as s:
        t = service.totals(s, lab, WEEK, TODAY)
        assert t.orders == 2  # the one submitted on 1 March is outside the week
        assert service.turnaround_days(s, lab, WEEK) == [0.5, 2.5]
        assert (t.orders_completed, t.median_turnaround_days) == (2, 1.5)
        assert (t.revenue_fen, t.external_revenue_fen) == (65_000, 55_000)
        assert (t.ratings, t.rating_average) == (2, 3.5)
        platform = service.totals(s, scope(world, "platform"), WEEK, TODAY)
        assert (platform.orders, platform.orders_completed, platform.median_turnaround_days) == (3, 3, 1.0)
        assert (platform.revenue_fen, platform.ratings, platform.rating_average) == (72_000, 3, 3.67)
        flows = {(f.provider_region, f.user_region): f.revenue_fen
                 for f in service.flows(s, scope(world, "region:SC"), WEEK, TODAY)}
        # A region's flows include what it bought elsewhere as well as what it sold.
        assert flows == {("CQ", "SC"): 35_000, ("SC", "CQ"): 7_000}
        later = service.totals(s, lab, Period(TODAY, TODAY), TODAY)
        assert (later.orders, later.orders_completed, later.median_turnaround_days) == (0, 1, 14.71)


def test_breakdowns_add_up_to_their_totals(world: World) -> None:
    _orders_world(world)
    plan = [("CONF", "bob", 9, 120), ("SEQ", "carol", 22, 300), ("SC-MS", "alice", 14, 90), ("CONF", "alice", 20, 75),
            ("SPATIAL", "carol", 8, 600)]
    for n, (instrument, user, hour, minutes) in enumerate(plan):
        book(world, instrument, user, local(date(2026, 3, 9) + timedelta(days=n), hour), minutes,
             no_show=(n == 3))
    book(world, "SC-MS", "carol", local(date(2026, 3, 14), 0), 180, kind="maintenance")
    aggregate.ensure_current(world.db)
    with world.db.session() as s:
        for token in ("platform", "region:CQ", "region:SC", f"institution:{world.institutions['CQ-LAB']}"):
            sc = scope(world, token)
            t = service.totals(s, sc, WEEK, TODAY)
            parts = service.breakdown(s, sc, WEEK, TODAY)
            assert parts, token
            for name in ("instruments", "booked_min", "effective_min", "ext_institution_min", "ext_region_min",
                         "available_min", "revenue_fen"):
                assert sum(getattr(p, name) for p in parts) == getattr(t, name), (token, name)
        platform = service.totals(s, scope(world, "platform"), WEEK, TODAY)
        assert platform.booked_min == 120 + 300 + 90 + 75 + 600
        assert platform.no_shows == 1 and platform.effective_min == 120 + 300 + 90 + 600
        assert [p.key for p in service.breakdown(s, scope(world, "platform"), WEEK, TODAY)] == ["CQ", "SC"]
