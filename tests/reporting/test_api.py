"""The statistics API on both databases: every role's dashboard equals a hand computation over a small set of
bookings and charges; scopes outside a caller's grants are refused; bad parameters are 422 naming the field; CSV,
XLSX and the instrument list agree with the JSON; a booking made through the API shows in the next call."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openpyxl import load_workbook
from sqlalchemy.orm import Session

from labcommons.app import create_app
from labcommons.billing.models import AccountKind, BillingAccount, Charge, PayerCategory, RateUnit, SourceKind
from labcommons.booking.models import Booking, BookingKind, BookingPolicy, BookingStatus
from labcommons.identity import roles
from labcommons.identity import service as identity
from labcommons.reporting.aggregate import today as local_today
from labcommons.reporting.exports import hours
from tests.factories import World, add_instrument, next_grid_day
from tests.reporting.conftest import local

# Opening hours of the sequencer: weekdays 09:00-18:00 (540 minutes), closed at weekends.
SEQ_HOURS = {d: [["09:00", "18:00"]] for d in ("mon", "tue", "wed", "thu", "fri")}


@dataclass
class Stats:
    """The world with statistics roles, bookings on local day `day` and charges; `first`/`last` the period."""

    world: World
    day: date
    first: date
    last: date
    ids: dict[str, int] = field(default_factory=dict)

    def headers(self, user: str) -> dict[str, str]:
        return self.world.headers(user)

    def params(self, scope: str, **extra: Any) -> dict[str, Any]:
        return {"scope": scope, "from": self.first.isoformat(), "to": self.last.isoformat(), **extra}


def _user(s: Session, world: World, name: str, institution: str) -> Any:
    user = identity.create_user(s, email=f"{name}@example.org", name=name.title(), institution_code=institution,
                                password="correct horse")
    world.tokens[name] = identity.create_api_token(s, user, name="test")
    return user


def _booking(s: Session, instrument: int, user_id: int, start: datetime, end: datetime, *, lead: timedelta,
             **fields: Any) -> None:
    s.add(Booking(instrument_id=instrument, user_id=user_id, starts_at=start, ends_at=end, created_at=start - lead,
                  **fields))


def _charge(s: Session, stats: Stats, account: int, payer: str, amount: int, service_date: date, seq: int = 1,
            reverses: int | None = None, source: int = 1) -> int:
    world = stats.world
    payer_region = "SC" if payer.startswith("SC") else "CQ"
    charge = Charge(
        account_id=account, user_id=stats.ids[f"user:{payer}"], facility_id=world.facilities["CQ-LAB"],
        provider_institution_id=world.institutions["CQ-LAB"], provider_region_code="CQ",
        payer_institution_id=world.institutions[payer], payer_region_code=payer_region,
        source_kind=SourceKind.manual, source_id=source, seq=seq, reverses_id=reverses, item_kind="instrument",
        payer_category=PayerCategory.internal if payer == "CQ-LAB" else PayerCategory.academic_other,
        unit=RateUnit.hour, quantity=60, unit_amount_fen=amount, list_amount_fen=amount, amount_fen=amount,
        description="test", service_date=service_date,
    )
    s.add(charge)
    s.flush()
    return charge.id


def build_stats(world: World) -> Stats:
    """Roles, an extra CQ-UNI instrument, the sequencer's opening hours, bookings three days ago and charges."""
    today = local_today()
    stats = Stats(world, day=today - timedelta(days=3), first=today - timedelta(days=7),
                  last=today - timedelta(days=1))
    d = stats.day
    ins = world.instruments
    with world.db.unit_of_work() as s:
        users = {n: identity.find_user(s, f"{n}@example.org") for n in ("alice", "bob", "carol")}
        users |= {"dave": _user(s, world, "dave", "CQ-LAB"), "erin": _user(s, world, "erin", "CQ-LAB"),
                  "frank": _user(s, world, "frank", "CQ-UNI"), "grace": _user(s, world, "grace", "SC-UNI"),
                  "hank": _user(s, world, "hank", "CQ-LAB"), "sam": _user(s, world, "sam", "SC-UNI")}
        s.flush()
        roles.grant_role(s, None, users["dave"], "facility_manager", facility_id=world.facilities["CQ-LAB"])
        roles.grant_role(s, None, users["hank"], "facility_staff", facility_id=world.facilities["CQ-LAB"])
        roles.grant_role(s, None, users["erin"], "institution_admin", institution_id=world.institutions["CQ-LAB"])
        roles.grant_role(s, None, users["frank"], "region_authority", region_code="CQ")
        roles.grant_role(s, None, users["sam"], "region_authority", region_code="SC")
        roles.grant_role(s, None, users["grace"], "platform_admin")
        stats.ids.update({f"user:{inst}": users[n].id
                          for inst, n in (("CQ-LAB", "alice"), ("CQ-UNI", "bob"), ("SC-UNI", "carol"))})
        ins["XRD"] = add_instrument(s, world.facilities["CQ-UNI"], "CQ-XRD", name_en="X-ray diffractometer").id
        policy = s.get(BookingPolicy, ins["SEQ"]) or BookingPolicy(instrument_id=ins["SEQ"])
        policy.opening_hours = json.dumps(SEQ_HOURS)
        s.add(policy)
        alice, bob, carol, dave = (users[n].id for n in ("alice", "bob", "carol", "dave"))
        # Internal use, no check-in: booked = effective = 120.
        _booking(s, ins["CONF"], alice, local(d, 9), local(d, 11), lead=timedelta(minutes=30))
        # Other institution of the region, checked in 13:30-14:30 of 13:00-16:00: booked 180, effective 60.
        _booking(s, ins["CONF"], bob, local(d, 13), local(d, 16), lead=timedelta(hours=2),
                 checked_in_at=local(d, 13, 30), checked_out_at=local(d, 14, 30))
        # Cancelled: counts nowhere.
        _booking(s, ins["CONF"], bob, local(d, 17), local(d, 18), lead=timedelta(hours=2),
                 status=BookingStatus.cancelled, cancelled_at=local(d, 8))
        # Pending (not yet granted): counts nowhere.
        _booking(s, ins["CONF"], carol, local(d, 19), local(d, 20), lead=timedelta(hours=2),
                 status=BookingStatus.pending)
        # Another region's user, completed: 120 effective, all external and other-region.
        _booking(s, ins["SEQ"], carol, local(d, 10), local(d, 12), lead=timedelta(days=2),
                 status=BookingStatus.completed)
        # A no-show: 60 booked, nothing effective.
        _booking(s, ins["SEQ"], carol, local(d, 14), local(d, 15), lead=timedelta(days=2), no_show=True)
        # Maintenance by the facility manager: 240 maintenance minutes, no booking, no user served.
        _booking(s, ins["SPATIAL"], dave, local(d, 8), local(d, 12), lead=timedelta(days=1),
                 kind=BookingKind.maintenance.value)
        # Alice at the other CQ institution, and at the Sichuan instrument.
        _booking(s, ins["XRD"], alice, local(d, 14), local(d, 16), lead=timedelta(days=10),
                 status=BookingStatus.completed)
        _booking(s, ins["SC-MS"], alice, local(d, 9), local(d, 10), lead=timedelta(days=5))
        accounts = {}
        for code in ("CQ-LAB", "CQ-UNI", "SC-UNI"):
            acc = BillingAccount(code=f"G-{code}", name=code, kind=AccountKind.grant,
                                 institution_id=world.institutions[code], region_code=code[:2],
                                 owner_id=stats.ids[f"user:{code}"])
            s.add(acc)
            s.flush()
            accounts[code] = acc.id
        _charge(s, stats, accounts["SC-UNI"], "SC-UNI", 24_000, d, source=1)
        wrong = _charge(s, stats, accounts["CQ-UNI"], "CQ-UNI", 10_000, d, source=2)
        _charge(s, stats, accounts["CQ-UNI"], "CQ-UNI", -10_000, d, seq=2, reverses=wrong, source=2)
        _charge(s, stats, accounts["CQ-LAB"], "CQ-LAB", 3_000, d, source=3)
        _charge(s, stats, accounts["SC-UNI"], "SC-UNI", 99_999, stats.first - timedelta(days=1), source=4)
    return stats


@pytest.fixture
def stats(world: World) -> Stats:
    return build_stats(world)


@pytest.fixture
def client(stats: Stats) -> Iterator[TestClient]:
    with TestClient(create_app(db=stats.world.db)) as test_client:
        yield test_client


def get(client: TestClient, stats: Stats, user: str, path: str, status: int = 200, **params: Any) -> Any:
    response = client.get(f"/api/v1/stats/{path}", params=params, headers=stats.headers(user))
    assert response.status_code == status, response.text
    return response.json() if response.headers["content-type"].startswith("application/json") else response


def dash(client: TestClient, stats: Stats, user: str, scope: str) -> dict[str, Any]:
    body: dict[str, Any] = get(client, stats, user, "dashboard", **stats.params(scope))
    assert body["scope"]["token"] == scope
    return body


# --- hand-computed figures ----------------------------------------------------------------------------------------

ALL_DAY_WEEK = 7 * 1440  # minutes an always-open instrument is open in a 7-day period
SEQ_WEEK = 5 * 540
# CQ-LAB: CONF, SEQ, SPATIAL, EM (in maintenance status, still bookable), LOCAL.
LAB_AVAILABLE = 4 * ALL_DAY_WEEK + SEQ_WEEK - 240

FACILITY = {
    "instruments": 5, "bookings": 4, "booked_min": 480, "effective_min": 300, "ext_institution_min": 180,
    "ext_region_min": 120, "maintenance_min": 240, "available_min": LAB_AVAILABLE,
    "utilisation": round(480 / LAB_AVAILABLE, 4), "external_share": 0.6, "ext_region_share": 0.4, "users": 3,
    "institutions": 3, "started_bookings": 4, "no_shows": 1, "no_show_rate": 0.25,
    # Lead buckets <1h: 1, 1-4h: 1, 1-3d: 2 -> the median (2 of 4) is the top of the 1-4 h bucket.
    "median_lead_hours": 4.0, "orders": 0, "orders_completed": 0, "median_turnaround_days": None,
    "revenue_fen": 27_000, "external_revenue_fen": 24_000, "rating_average": None, "ratings": 0,
}
REGION_CQ = FACILITY | {
    "instruments": 6, "bookings": 5, "booked_min": 600, "effective_min": 420, "ext_institution_min": 300,
    "available_min": LAB_AVAILABLE + ALL_DAY_WEEK, "utilisation": round(600 / (LAB_AVAILABLE + ALL_DAY_WEEK), 4),
    "external_share": round(300 / 420, 4), "ext_region_share": round(120 / 420, 4), "started_bookings": 5,
    "no_show_rate": 0.2,
    # Buckets 1, 1, 0, 2, 0, 1 (10 days): the median (2.5 of 5) lies a quarter into 24-72 h.
    "median_lead_hours": 36.0,
}
REGION_SC = FACILITY | {
    "instruments": 1, "bookings": 1, "booked_min": 60, "effective_min": 60, "ext_institution_min": 60,
    "ext_region_min": 60, "maintenance_min": 0, "available_min": ALL_DAY_WEEK,
    "utilisation": round(60 / ALL_DAY_WEEK, 4), "external_share": 1.0, "ext_region_share": 1.0, "users": 1,
    "institutions": 1, "started_bookings": 1, "no_shows": 0, "no_show_rate": 0.0, "median_lead_hours": 120.0,
    "revenue_fen": 0, "external_revenue_fen": 0,
}
PLATFORM = REGION_CQ | {
    "instruments": 7, "bookings": 6, "booked_min": 660, "effective_min": 480, "ext_institution_min": 360,
    "ext_region_min": 180, "available_min": LAB_AVAILABLE + 2 * ALL_DAY_WEEK,
    "utilisation": round(660 / (LAB_AVAILABLE + 2 * ALL_DAY_WEEK), 4), "external_share": 0.75,
    "ext_region_share": 0.375, "started_bookings": 6, "no_show_rate": round(1 / 6, 4),
    # Buckets 1, 1, 0, 2, 1, 1: the median (3 of 6) lies half-way into 24-72 h.
    "median_lead_hours": 48.0,
}


def test_scopes_of_each_role(client: TestClient, stats: Stats) -> None:
    w = stats.world
    lab_f, lab, uni_f = (f"facility:{w.facilities['CQ-LAB']}", f"institution:{w.institutions['CQ-LAB']}",
                         f"facility:{w.facilities['CQ-UNI']}")
    tokens = {u: [s["token"] for s in get(client, stats, u, "scopes")["items"]]
              for u in ("alice", "dave", "hank", "erin", "frank", "grace")}
    assert tokens["alice"] == []
    assert tokens["dave"] == tokens["hank"] == [lab_f]
    assert tokens["erin"] == [lab, lab_f]
    assert tokens["frank"] == ["region:CQ"]
    assert tokens["grace"][:3] == ["platform", "region:CQ", "region:SC"]
    assert uni_f not in tokens["erin"]


FIGURES = [
    ("dave", "facility:CQ-LAB", FACILITY),
    ("hank", "facility:CQ-LAB", FACILITY),
    ("erin", "institution:CQ-LAB", FACILITY),
    ("erin", "facility:CQ-LAB", FACILITY),
    ("frank", "region:CQ", REGION_CQ),
    ("frank", "institution:CQ-LAB", FACILITY),
    ("sam", "region:SC", REGION_SC),
    ("grace", "platform", PLATFORM),
    ("grace", "region:SC", REGION_SC),
]


def token_of(stats: Stats, scope: str) -> str:
    """`facility:CQ-LAB` written with the row's id, as the API takes it."""
    kind, _, code = scope.partition(":")
    key = {"facility": stats.world.facilities, "institution": stats.world.institutions}.get(kind, {}).get(code, code)
    return f"{kind}:{key}" if code else kind


def test_each_role_sees_the_hand_computed_figures(client: TestClient, stats: Stats) -> None:
    for user, scope, expected in FIGURES:
        body = dash(client, stats, user, token_of(stats, scope))
        assert body["totals"] == expected, (user, scope)
        assert body["period"] == {"first": stats.first.isoformat(), "last": stats.last.isoformat()}
        assert body["today"] == local_today().isoformat()


def test_the_facility_dashboard_charts(client: TestClient, stats: Stats) -> None:
    w = stats.world
    body = dash(client, stats, "dave", f"facility:{w.facilities['CQ-LAB']}")
    weekday = stats.day.weekday()
    expected_row = [0] * 24
    for hour, minutes in {9: 60, 10: 120, 11: 60, 13: 60, 14: 120, 15: 60}.items():
        expected_row[hour] = minutes
    assert body["heatmap"][weekday] == expected_row
    assert sum(map(sum, body["heatmap"])) == 480
    assert body["granularity"] == "day" and len(body["series"]) == 7
    point = next(p for p in body["series"] if p["start"] == stats.day.isoformat())
    open_that_day = 4 * 1440 + (540 if weekday < 5 else 0) - 240
    assert point == {"start": stats.day.isoformat(), "booked_min": 480, "effective_min": 300,
                     "available_min": open_that_day, "utilisation": round(480 / open_that_day, 4)}
    assert sum(p["booked_min"] for p in body["series"]) == 480
    assert [(r["code"], r["effective_min"], r["booked_min"]) for r in body["top"]] == [
        ("CQ-CONF", 180, 300), ("CQ-SEQ", 120, 180)]
    assert body["idle_count"] == 3
    assert {r["code"] for r in body["idle"][:3]} == {"CQ-SPATIAL", "CQ-EM", "CQ-LOCAL"}
    assert body["flows"] == [
        {"provider_region": "CQ", "user_region": "CQ", "booked_min": 300, "effective_min": 180, "revenue_fen": 3000},
        {"provider_region": "CQ", "user_region": "SC", "booked_min": 180, "effective_min": 120,
         "revenue_fen": 24_000},
    ]
    assert body["breakdown"] == [] and body["turnaround_days"] == []


def test_region_flows_and_platform_breakdown(client: TestClient, stats: Stats) -> None:
    sc = dash(client, stats, "sam", "region:SC")
    # A region's flows include what its users used elsewhere.
    assert sc["flows"] == [
        {"provider_region": "CQ", "user_region": "SC", "booked_min": 180, "effective_min": 120,
         "revenue_fen": 24_000},
        {"provider_region": "SC", "user_region": "CQ", "booked_min": 60, "effective_min": 60, "revenue_fen": 0},
    ]
    platform = dash(client, stats, "grace", "platform")
    assert [(f["provider_region"], f["user_region"], f["booked_min"], f["effective_min"], f["revenue_fen"])
            for f in platform["flows"]] == [("CQ", "CQ", 420, 300, 3000), ("CQ", "SC", 180, 120, 24_000),
                                            ("SC", "CQ", 60, 60, 0)]
    assert [(b["kind"], b["key"], b["instruments"], b["booked_min"], b["effective_min"], b["revenue_fen"])
            for b in platform["breakdown"]] == [("region", "CQ", 6, 600, 420, 27_000), ("region", "SC", 1, 60, 60, 0)]
    region = dash(client, stats, "frank", "region:CQ")
    by_key = {b["key"]: b for b in region["breakdown"]}
    w = stats.world
    assert by_key[str(w.institutions["CQ-LAB"])]["booked_min"] == 480
    assert by_key[str(w.institutions["CQ-UNI"])]["booked_min"] == 120


def test_defaults_are_the_widest_scope_and_the_year_so_far(client: TestClient, stats: Stats) -> None:
    today = local_today()
    w = stats.world
    expected = (("dave", f"facility:{w.facilities['CQ-LAB']}"), ("erin", f"institution:{w.institutions['CQ-LAB']}"),
                ("frank", "region:CQ"), ("grace", "platform"))
    for user, token in expected:
        body = get(client, stats, user, "dashboard")
        assert body["scope"]["token"] == token
        assert body["period"] == {"first": date(today.year, 1, 1).isoformat(), "last": today.isoformat()}


# --- access -------------------------------------------------------------------------------------------------------


ACCESS = [
    ("dave", "facility:SC-UNI", 403), ("dave", "facility:CQ-UNI", 403), ("dave", "institution:CQ-LAB", 403),
    ("dave", "region:CQ", 403), ("dave", "platform", 403),
    ("erin", "institution:CQ-UNI", 403), ("erin", "facility:CQ-UNI", 403), ("erin", "region:CQ", 403),
    ("frank", "region:SC", 403), ("frank", "institution:SC-UNI", 403), ("frank", "facility:SC-UNI", 403),
    ("frank", "platform", 403), ("sam", "institution:CQ-LAB", 403),
    ("grace", "region:XX", 404), ("grace", "institution:999999", 404), ("grace", "facility:999999", 404),
    ("frank", "facility:CQ-UNI", 200), ("erin", "facility:CQ-LAB", 200),
]


def test_scopes_outside_the_grants_are_refused(client: TestClient, stats: Stats) -> None:
    for user, scope, status in ACCESS:
        params = stats.params(token_of(stats, scope))
        for path in ("dashboard", "instruments", "export.xlsx", "tables/totals.csv"):
            response = client.get(f"/api/v1/stats/{path}", params=params, headers=stats.headers(user))
            assert response.status_code == status, (user, scope, path, response.text)
            if status != 200:
                assert response.json()["error"] == ("forbidden" if status == 403 else "not_found")
            if status == 404:
                assert response.json()["field"] == "scope"


def test_plain_users_anonymous_callers_and_narrow_tokens_are_refused(client: TestClient, stats: Stats) -> None:
    paths = ["dashboard", "instruments", "export.xlsx", "tables/totals.csv", "status",
             f"reports/{stats.world.institutions['CQ-LAB']}/2025.pdf"]
    for path in paths:
        # A plain user is refused before any parameter is looked at, even a malformed one.
        plain = client.get(f"/api/v1/stats/{path}", params={"from": "nonsense"}, headers=stats.headers("alice"))
        assert plain.status_code == 403, (path, plain.text)
        anonymous = client.get(f"/api/v1/stats/{path}")
        assert anonymous.status_code == 401 and anonymous.json()["error"] == "unauthenticated"
    assert get(client, stats, "alice", "scopes") == {"items": []}
    assert client.get("/api/v1/stats/scopes").status_code == 401
    with stats.world.db.unit_of_work() as s:
        narrow = identity.create_api_token(s, identity.find_user(s, "grace@example.org"), name="narrow",
                                           scopes=["bookings:read"])
        wide = identity.create_api_token(s, identity.find_user(s, "grace@example.org"), name="wide",
                                         scopes=["stats:read"])
    for path in ("dashboard", "scopes", "status"):
        refused = client.get(f"/api/v1/stats/{path}", headers={"Authorization": f"Bearer {narrow}"})
        assert refused.status_code == 403 and refused.json()["error"] == "insufficient_scope"
        assert client.get(f"/api/v1/stats/{path}", headers={"Authorization": f"Bearer {wide}"}).status_code == 200
    # The status is the platform's: a region authority may not read it.
    assert get(client, stats, "frank", "status", 403)["error"] == "forbidden"


@pytest.mark.parametrize(("params", "field"), [
    ({"from": "2025-13-01"}, "from"),
    ({"to": "yesterday"}, "to"),
    ({"from": "2025-03-02", "to": "2025-03-01"}, "to"),
    ({"from": "2020-01-01", "to": "2025-01-01"}, "to"),
    ({"scope": "galaxy"}, "scope"),
    ({"scope": "institution:abc"}, "scope"),
    ({"scope": "region:" + "X" * 40}, "scope"),
    ({"from": "2025-01-01" * 2}, "from"),
    ({"sort": "price"}, "sort"),
    ({"limit": "0"}, "limit"),
    ({"limit": "501"}, "limit"),
    ({"offset": "-1"}, "offset"),
    # Dates at the ends of the calendar once overflowed the local-day arithmetic (a 500).
    ({"from": "0001-01-01", "to": "0001-01-03"}, "from"),
    ({"from": "9999-12-29", "to": "9999-12-31"}, "from"),
    ({"from": "2026-01-01", "to": "2101-01-01"}, "to"),
])
def test_bad_parameters_are_422_naming_the_field(client: TestClient, stats: Stats, params: dict[str, str],
                                                 field: str) -> None:
    body = get(client, stats, "grace", "instruments", 422, **params)
    assert body["field"] == field, body


def test_unknown_table_and_bad_year(client: TestClient, stats: Stats) -> None:
    body = get(client, stats, "grace", "tables/nope.csv", 404, **stats.params("platform"))
    assert body["error"] == "not_found" and body["field"] == "table" and "totals" in body["message"]
    lab = stats.world.institutions["CQ-LAB"]
    for year in ("1999", "2101"):
        assert get(client, stats, "grace", f"reports/{lab}/{year}.pdf", 422)["field"] == "year"
    assert get(client, stats, "grace", f"reports/{lab}/twenty.pdf", 422)["field"] == "year"
    assert get(client, stats, "grace", "reports/999999/2025.pdf", 404)["field"] == "scope"


def test_status_counts_pending_marks_until_a_reader_refreshes(client: TestClient, stats: Stats) -> None:
    before = get(client, stats, "grace", "status")
    assert before["pending_marks"] > 0 and before["oldest_mark_at"] is not None
    dash(client, stats, "grace", "platform")
    after = get(client, stats, "grace", "status")
    assert after["pending_marks"] == 0 and after["oldest_mark_at"] is None
    # One row per instrument with counted time that day: CONF, SEQ, SPATIAL (maintenance), XRD and SC-MS.
    assert after["instrument_day_rows"] == 5
    assert after["first_day"] == after["last_day"] == stats.day.isoformat()
    assert after["facility_day_rows"] > 0 and after["today"] == local_today().isoformat()


# --- the instrument list --------------------------------------------------------------------------------------------


def test_instruments_sort_and_paginate(client: TestClient, stats: Stats) -> None:
    scope = f"facility:{stats.world.facilities['CQ-LAB']}"

    def codes(**extra: Any) -> tuple[list[str], dict[str, Any]]:
        body = get(client, stats, "dave", "instruments", **stats.params(scope, **extra))
        return [r["code"] for r in body["items"]], body

    default, body = codes()
    assert body["sort"] == "-effective_hours" and body["total"] == 5 and body["limit"] == 50
    assert default == ["CQ-CONF", "CQ-SEQ", "CQ-EM", "CQ-LOCAL", "CQ-SPATIAL"]
    assert codes(sort="code")[0] == ["CQ-CONF", "CQ-EM", "CQ-LOCAL", "CQ-SEQ", "CQ-SPATIAL"]
    assert codes(sort="-code")[0] == ["CQ-SPATIAL", "CQ-SEQ", "CQ-LOCAL", "CQ-EM", "CQ-CONF"]
    assert codes(sort="-booked_hours")[0][:2] == ["CQ-CONF", "CQ-SEQ"]
    # SEQ: 180 of 2700 open minutes (6.7 %) beats CONF: 300 of 10080 (3.0 %); ties keep code order.
    assert codes(sort="-utilisation")[0] == ["CQ-SEQ", "CQ-CONF", "CQ-EM", "CQ-LOCAL", "CQ-SPATIAL"]
    assert codes(sort="utilisation")[0] == ["CQ-EM", "CQ-LOCAL", "CQ-SPATIAL", "CQ-CONF", "CQ-SEQ"]
    page, body = codes(sort="code", limit=2, offset=1)
    assert page == ["CQ-EM", "CQ-LOCAL"] and body["total"] == 5 and body["offset"] == 1
    assert codes(sort="code", limit=2, offset=10)[0] == []
    seq = next(r for r in get(client, stats, "dave", "instruments", **stats.params(scope))["items"]
               if r["code"] == "CQ-SEQ")
    assert seq | {"instrument_id": 0, "facility_id": 0} == {
        "instrument_id": 0, "code": "CQ-SEQ", "name_zh": "高通量基因测序仪", "name_en": "High-throughput sequencer",
        "facility_id": 0, "region_code": "CQ", "bookings": 2, "booked_min": 180, "effective_min": 120,
        "ext_institution_min": 120, "ext_region_min": 120, "available_min": SEQ_WEEK,
        "utilisation": round(180 / SEQ_WEEK, 4), "no_shows": 1, "retired": False}


# --- files agree with the JSON ----------------------------------------------------------------------------------


def _csv_rows(content: bytes) -> list[list[str]]:
    text = content.decode("utf-8")
    assert text.startswith("\ufeff")
    return list(csv.reader(io.StringIO(text[1:])))


def _expected_value(key: str, totals: dict[str, Any]) -> Decimal | int | None:
    minutes = {"booked_hours": "booked_min", "effective_hours": "effective_min",
               "external_hours": "ext_institution_min", "other_region_hours": "ext_region_min",
               "maintenance_hours": "maintenance_min", "available_hours": "available_min"}
    renamed = {"other_region_share": "ext_region_share"}
    if key in minutes:
        return hours(totals[minutes[key]])
    if key == "revenue_yuan":
        return Decimal(totals["revenue_fen"]) / 100
    value = totals[renamed.get(key, key)]
    return None if value is None else Decimal(str(value))


def test_csv_and_xlsx_equal_the_json(client: TestClient, stats: Stats) -> None:
    params = stats.params("region:CQ")
    body = get(client, stats, "frank", "dashboard", **params)
    totals_csv = client.get("/api/v1/stats/tables/totals.csv", params=params, headers=stats.headers("frank"))
    assert totals_csv.status_code == 200 and totals_csv.headers["content-type"].startswith("text/csv")
    assert "attachment" in totals_csv.headers["content-disposition"]
    rows = _csv_rows(totals_csv.content)
    assert rows[0] == ["指标 Key", "名称 Metric", "数值 Value"]
    seen = set()
    for key, _label, value in rows[1:]:
        expected = _expected_value(key, body["totals"])
        assert (Decimal(value) if value else None) == expected, key
        seen.add(key)
    assert {"booked_hours", "effective_hours", "external_hours", "utilisation", "users", "revenue_fen"} <= seen

    instruments = get(client, stats, "frank", "instruments", **params, sort="code")["items"]
    listed = _csv_rows(client.get("/api/v1/stats/tables/instruments.csv", params=params,
                                  headers=stats.headers("frank")).content)[1:]
    assert [(r[0], Decimal(r[5]), Decimal(r[6])) for r in sorted(listed)] == [
        (i["code"], hours(i["booked_min"]), hours(i["effective_min"])) for i in instruments]

    xlsx = client.get("/api/v1/stats/export.xlsx", params=params, headers=stats.headers("frank"))
    assert xlsx.status_code == 200
    assert xlsx.headers["content-type"] == "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    book = load_workbook(io.BytesIO(xlsx.content))
    assert book.sheetnames[:2] == ["totals", "series"]
    sheet = book["totals"]
    values = {str(r[0]): r[2] for r in sheet.iter_rows(min_row=4, values_only=True) if r[0]}
    for key, value in values.items():
        expected = _expected_value(key, body["totals"])
        assert (None if value is None else Decimal(str(value))) == expected, key
    flows = [r for r in book["flows"].iter_rows(min_row=4, values_only=True) if r[0]]
    assert [(r[0], r[1], Decimal(str(r[2])), r[5]) for r in flows] == [
        (f["provider_region"], f["user_region"], hours(f["booked_min"]), f["revenue_fen"]) for f in body["flows"]]


def test_annual_report_pdf(client: TestClient, stats: Stats) -> None:
    lab = stats.world.institutions["CQ-LAB"]
    year = stats.day.year
    for user in ("erin", "frank"):
        response = client.get(f"/api/v1/stats/reports/{lab}/{year}.pdf", headers=stats.headers(user))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/pdf" and response.content.startswith(b"%PDF")
    for user in ("dave", "sam"):
        assert get(client, stats, user, f"reports/{lab}/{year}.pdf", 403)["error"] == "forbidden"


# --- consistency ------------------------------------------------------------------------------------------------


def test_a_booking_made_through_the_api_shows_in_the_next_dashboard(client: TestClient, stats: Stats) -> None:
    start = next_grid_day(days=2, hour=2)
    today = local_today()
    scope = f"facility:{stats.world.facilities['CQ-LAB']}"
    params = {"scope": scope, "from": today.isoformat(), "to": (today + timedelta(days=5)).isoformat()}
    before = get(client, stats, "dave", "dashboard", **params)["totals"]
    created = client.post("/api/v1/bookings", headers=stats.headers("bob"), json={
        "instrument_id": stats.world.instruments["CONF"], "starts_at": start.isoformat(),
        "ends_at": (start + timedelta(minutes=90)).isoformat()})
    assert created.status_code == 201, created.text
    after = get(client, stats, "dave", "dashboard", **params)["totals"]
    assert after["booked_min"] == before["booked_min"] + 90
    assert after["bookings"] == before["bookings"] + 1
    # Not yet started: no effective time, not in the no-show denominator.
    assert after["effective_min"] == before["effective_min"] and after["started_bookings"] == 0
    cancelled = client.post(f"/api/v1/bookings/{created.json()['id']}/cancel", headers=stats.headers("bob"))
    assert cancelled.status_code == 200, cancelled.text
    assert get(client, stats, "dave", "dashboard", **params)["totals"]["booked_min"] == before["booked_min"]
