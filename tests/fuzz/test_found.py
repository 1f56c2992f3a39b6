"""What the fuzzing found, pinned down: each request once answered 500 or broke the schema's word, on both
databases. Each must now be a 4xx error naming the field, and change nothing."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from labcommons.billing.models import Rate
from labcommons.booking.models import Booking
from labcommons.db import MAX_ID
from tests.api_client import client_for
from tests.factories import World, next_grid_day
from tests.fuzz.seed import ADMIN, add_people

HUGE = 2**70


def _booking(world: World, **change: Any) -> dict[str, Any]:
    start = next_grid_day()
    return {"instrument_id": world.instruments["CONF"], "starts_at": start.isoformat(),
            "ends_at": (start + timedelta(hours=1)).isoformat(), **change}


@pytest.mark.parametrize(("method", "path", "body", "field"), [
    # Ids below the range went to the driver, which cannot bind them (OverflowError on SQLite: 500).
    ("GET", "/api/v1/bookings/-147834973647026687836160", None, "booking_id"),
    ("POST", "/api/v1/billing/vouchers/-1/revoke", None, "voucher_id"),
    ("POST", "/api/v1/samples/0/events", {"event": "received"}, "sample_id"),
    ("DELETE", "/api/v1/me/tokens/-5", None, "token_id"),
    ("GET", f"/api/v1/instruments/{MAX_ID + 1}/policy", None, "instrument_id"),
    # Ids beyond it in bodies, where the schema set no bound.
    ("POST", "/api/v1/bookings", "booking", "instrument_id"),
    ("POST", "/api/v1/waitlist", "booking", "instrument_id"),
    # Numbers where a time or a day is due were read as Unix time, which the schema (date-time, date) excludes.
    ("GET", "/api/v1/slots/earliest?duration_minutes=60&after=541", None, "after"),
    ("GET", "/api/v1/instruments?free_from=0&free_to=86400", None, "free_from"),
    ("GET", "/api/v1/billing/facilities/1/rates?on=0", None, "on"),
    ("GET", "/api/v1/billing/facilities/1/rates?on=2026-01-01T00:00:00Z", None, "on"),
    ("POST", "/api/v1/bookings", "numeric-time", "starts_at"),
])
def test_out_of_range_input_is_refused_naming_the_field(world: World, method: str, path: str, body: Any,
                                                        field: str) -> None:
    if body == "booking":
        body = _booking(world, instrument_id=HUGE)
    elif body == "numeric-time":
        body = _booking(world, starts_at=0)
    add_people(world)  # a platform administrator: no role check answers before the input's
    answer = client_for(world.db).request(method, path, json=body, headers=world.headers(ADMIN))
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field
    with world.db.unit_of_work(write=False) as s:
        assert s.scalar(select(func.count()).select_from(Booking)) == 0


def test_a_body_that_is_not_text_is_invalid_json(world: World) -> None:
    # FastAPI answers a body it cannot decode with its own 400, which the schema did not declare.
    answer = client_for(world.db).post("/api/v1/billing/rates", content=b"\xff\xfe{", headers={
        **world.headers("alice"), "Content-Type": "application/json"})
    assert answer.status_code == 422
    assert answer.json() == {"error": "invalid_json", "message": "The request body could not be read as JSON.",
                             "field": None}
    with world.db.unit_of_work(write=False) as s:
        assert s.scalar(select(func.count()).select_from(Rate)) == 0
