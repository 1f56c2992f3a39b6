"""The earliest free slot across matching instruments."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from labcommons.booking import service
from labcommons.catalog.service import InstrumentQuery
from tests.api_client import client_for
from tests.factories import World, next_grid_day


def book(world: World, key: str, start: datetime, hours: float, who: str = "alice") -> None:
    with world.db.unit_of_work() as s:
        service.reserve_slot(s, world.actors[who], world.instruments[key], start,
                             start + timedelta(hours=hours))


def earliest(world: World, after: datetime, minutes: int, **query: Any) -> list[tuple[str, datetime]]:
    with world.db.unit_of_work(write=False) as s:
        slots = service.earliest_slots(s, InstrumentQuery(**query), minutes, after)
        return [(slot.instrument.code, slot.starts_at) for slot in slots]


def test_free_instrument_starts_at_the_next_grid_point(world: World) -> None:
    after = next_grid_day() + timedelta(minutes=7)
    assert earliest(world, after, 60, category="MIC.CONF") == [("CQ-CONF", after + timedelta(minutes=23))]
    # The sequencer's grid is an hour.
    assert earliest(world, after, 120, category="GEN.SEQ") == [("CQ-SEQ", after + timedelta(minutes=53))]


def test_booked_instrument_is_free_when_its_bookings_leave_a_long_enough_gap(world: World) -> None:
    t0 = next_grid_day()
    book(world, "CONF", t0, 2)
    book(world, "CONF", t0 + timedelta(hours=2, minutes=30), 1)  # a 30-minute gap, then busy again
    assert earliest(world, t0, 30, category="MIC.CONF") == [("CQ-CONF", t0 + timedelta(hours=2))]
    assert earliest(world, t0, 60, category="MIC.CONF") == [("CQ-CONF", t0 + timedelta(hours=3, minutes=30))]


def test_slots_across_instruments_come_soonest_first_one_per_instrument(world: World) -> None:
    t0 = next_grid_day()
    book(world, "CONF", t0, 3)
    book(world, "SPATIAL", t0, 1)
    slots = earliest(world, t0, 60, region="CQ")
    starts = [start for _, start in slots]
    assert starts == sorted(starts)
    assert len({code for code, _ in slots}) == len(slots)
    found = dict(slots)
    assert found["CQ-SPATIAL"] == t0 + timedelta(hours=1)
    assert "CQ-EM" not in found, "instruments in maintenance have no slots"
    assert found.get("CQ-CONF", t0 + timedelta(hours=3)) == t0 + timedelta(hours=3)


def test_duration_outside_an_instruments_limits_excludes_it(world: World) -> None:
    t0 = next_grid_day()
    assert earliest(world, t0, 60, category="GEN.SEQ") == []  # min 120 minutes
    assert earliest(world, t0, 90, category="GEN.SEQ") == []  # off its 60-minute grid
    assert earliest(world, t0, 600, category="MIC.CONF") == []  # over 480 minutes


def test_keyword_filter_and_api(world: World) -> None:
    t0 = next_grid_day()
    client = client_for(world.db)
    r = client.get("/api/v1/slots/earliest", params={"q": "测序", "duration_minutes": 120,
                                                      "after": t0.isoformat()})
    assert r.status_code == 200
    items = r.json()["items"]
    assert [i["instrument"]["code"] for i in items] == ["CQ-SEQ"]
    slot = items[0]
    assert datetime.fromisoformat(slot["starts_at"]) == t0
    # The slot offered can be booked.
    booked = client.post("/api/v1/bookings", json={"instrument_id": slot["instrument"]["id"],
                                                   "starts_at": slot["starts_at"], "ends_at": slot["ends_at"]},
                         headers=world.headers("alice"))
    assert booked.status_code == 201
    again = client.get("/api/v1/slots/earliest", params={"q": "测序", "duration_minutes": 120,
                                                          "after": t0.isoformat()}).json()["items"]
    assert datetime.fromisoformat(again[0]["starts_at"]) == t0 + timedelta(hours=2)


def test_after_in_the_past_means_now(world: World) -> None:
    r = client_for(world.db).get("/api/v1/slots/earliest", params={"duration_minutes": 30,
                                                                   "after": "2001-01-01T00:00:00Z"})
    assert r.status_code == 200
    assert all(datetime.fromisoformat(i["starts_at"]) >= datetime.now(UTC) - timedelta(minutes=1)
               for i in r.json()["items"])


@pytest.mark.parametrize("params", [{}, {"duration_minutes": 0}, {"duration_minutes": "an hour"},
                                    {"duration_minutes": 60, "after": "soon"}])
def test_bad_earliest_parameters_are_422(world: World, params: dict[str, Any]) -> None:
    r = client_for(world.db).get("/api/v1/slots/earliest", params=params)
    assert r.status_code == 422 and r.json()["field"] in ("duration_minutes", "after")
