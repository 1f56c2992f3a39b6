"""Recurring bookings: all-or-nothing unless the user keeps the bookable part; wall-clock stable across DST."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from labcommons.booking import recurrence, service
from labcommons.booking.models import Booking, BookingSeries
from labcommons.db import Database
from labcommons.errors import InvalidInput
from labcommons.identity import roles
from labcommons.identity import service as identity
from tests.api_client import client_for
from tests.factories import World, next_grid_day


def counts(db: Database) -> tuple[int, int]:
    with db.unit_of_work(write=False) as s:
        return (int(s.scalar(select(func.count()).select_from(Booking)) or 0),
                int(s.scalar(select(func.count()).select_from(BookingSeries)) or 0))


def test_every_occurrence_books(world: World) -> None:
    start = next_grid_day()
    with world.db.unit_of_work() as s:
        result = recurrence.book_series(s, world.actors["alice"], world.instruments["CONF"], start, 60,
                                        "FREQ=WEEKLY;COUNT=4", "weekly imaging", timezone="Asia/Shanghai")
        assert result.status == "booked" and result.series is not None
        series_id = result.series.id
    with world.db.unit_of_work(write=False) as s:
        rows = s.scalars(select(Booking).where(Booking.series_id == series_id).order_by(Booking.starts_at)).all()
    assert [b.starts_at for b in rows] == [start + timedelta(weeks=i) for i in range(4)]
    assert all(b.ends_at - b.starts_at == timedelta(hours=1) for b in rows)


@pytest.mark.parametrize(("keep", "status", "bookings"), [(None, "preview", 1), (False, "none", 1),
                                                          (True, "partial", 4)])
def test_conflicts_leave_the_decision_to_the_user(world: World, keep: bool | None, status: str,
                                                  bookings: int) -> None:
    start = next_grid_day()
    with world.db.unit_of_work() as s:
        service.reserve_slot(s, world.actors["bob"], world.instruments["CONF"], start + timedelta(weeks=1),
                             start + timedelta(weeks=1, hours=1))
    with world.db.unit_of_work() as s:
        result = recurrence.book_series(s, world.actors["alice"], world.instruments["CONF"], start, 60,
                                        "RRULE:FREQ=WEEKLY;COUNT=4", keep_partial=keep, timezone="Asia/Shanghai")
    assert result.status == status
    assert [o.bookable for o in result.occurrences] == [True, False, True, True]
    assert result.occurrences[1].code == "overlapping_booking"
    assert result.bookable_count == 3
    assert counts(world.db) == (bookings, 1 if keep else 0)


def test_wall_clock_is_kept_across_dst(world: World) -> None:
    # Berlin moves to summer time on Sunday 2030-03-31: Monday 09:00 stays 09:00 locally, one hour earlier in UTC.
    now = datetime(2030, 3, 1, tzinfo=UTC)
    first = datetime(2030, 3, 18, 9, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    with world.db.unit_of_work() as s:
        result = recurrence.book_series(s, world.actors["alice"], world.instruments["CONF"], first, 90,
                                        "FREQ=WEEKLY;BYDAY=MO;COUNT=4", timezone="Europe/Berlin", now=now)
        assert result.status == "booked"
    starts = [o.starts_at for o in result.occurrences]
    assert [t.hour for t in starts] == [8, 8, 7, 7]
    assert {t.astimezone(ZoneInfo("Europe/Berlin")).strftime("%a %H:%M") for t in starts} == {"Mon 09:00"}
    assert all(o.ends_at - o.starts_at == timedelta(minutes=90) for o in result.occurrences)


@pytest.mark.parametrize(("rule", "code"), [
    ("FREQ=DAILY;COUNT=53", "too_many_occurrences"),
    ("FREQ=WEEKLY", "unbounded_rrule"),
    ("FREQ=MONTHLY;COUNT=14", "series_too_long"),
    ("FREQ=SOMETIMES;COUNT=2", "invalid_rrule"),
    ("FREQ=WEEKLY;COUNT=2\nRDATE:20300101T000000Z", "invalid_rrule"),
    ("FREQ=WEEKLY;COUNT=2;INTERVAL=0", "invalid_rrule"),  # dateutil would fail only while iterating
    # Rules that never occur, or occur too finely, would iterate for seconds up to the year 9999.
    ("FREQ=MINUTELY;COUNT=2;BYMONTH=2;BYMONTHDAY=30", "invalid_rrule"),
    ("FREQ=SECONDLY;COUNT=2", "invalid_rrule"),
    ("FREQ=HOURLY;COUNT=2", "invalid_rrule"),
    ("FREQ=DAILY;COUNT=2;BYMONTH=2;BYMONTHDAY=30", "invalid_rrule"),
    ("FREQ=DAILY;COUNT=2;BYSETPOS=3", "invalid_rrule"),
    ("FREQ=MONTHLY;COUNT=2;BYDAY=6MO", "invalid_rrule"),
])
def test_rules_are_capped_and_checked(world: World, rule: str, code: str) -> None:
    with world.db.unit_of_work() as s, pytest.raises(InvalidInput) as refused:
        recurrence.book_series(s, world.actors["alice"], world.instruments["CONF"], next_grid_day(), 60, rule)
    assert refused.value.code == code
    assert counts(world.db) == (0, 0)


def test_bad_and_far_rules_are_refused_quickly(world: World) -> None:
    client = client_for(world.db)
    body = {"instrument_id": world.instruments["CONF"], "first_starts_at": next_grid_day().isoformat(),
            "duration_minutes": 60, "rrule": "FREQ=WEEKLY;COUNT=2;INTERVAL=0", "timezone": "Asia/Shanghai"}
    began = datetime.now(UTC)
    for rule in ("FREQ=WEEKLY;COUNT=2;INTERVAL=0", "FREQ=MINUTELY;COUNT=2;BYMONTH=2;BYMONTHDAY=30"):
        refused = client.post("/api/v1/bookings/series", json={**body, "rrule": rule}, headers=world.headers("alice"))
        assert refused.status_code == 422, refused.text
        assert (refused.json()["error"], refused.json()["field"]) == ("invalid_rrule", "rrule")
    assert datetime.now(UTC) - began < timedelta(seconds=1)
    # Occurrences past the end of year 9999 cannot exist; the series is refused, not a 500.
    far = {**body, "first_starts_at": "9999-12-31T20:00:00Z", "rrule": "FREQ=DAILY;COUNT=2"}
    refused = client.post("/api/v1/bookings/series", json=far, headers=world.headers("alice"))
    assert refused.status_code == 422 and refused.json()["error"] == "out_of_range", refused.text
    last = {**far, "first_starts_at": "9999-12-31T08:00:00Z", "rrule": "FREQ=DAILY;COUNT=1", "duration_minutes": 600}
    refused = client.post("/api/v1/bookings/series", json=last, headers=world.headers("alice"))
    assert refused.status_code == 422 and refused.json()["error"] == "out_of_range", refused.text
    assert counts(world.db) == (0, 0)


def test_series_api(world: World) -> None:
    client = client_for(world.db)
    start = next_grid_day()
    with world.db.unit_of_work() as s:
        service.reserve_slot(s, world.actors["bob"], world.instruments["CONF"], start + timedelta(days=1),
                             start + timedelta(days=1, hours=1))
    body = {"instrument_id": world.instruments["CONF"], "first_starts_at": start.isoformat(), "duration_minutes": 60,
            "rrule": "FREQ=DAILY;COUNT=3", "timezone": "Asia/Shanghai"}
    preview = client.post("/api/v1/bookings/series", json=body, headers=world.headers("alice"))
    assert preview.status_code == 409, preview.text
    assert preview.json()["error"] == "series_conflicts"
    assert [o["bookable"] for o in preview.json()["occurrences"]] == [True, False, True]
    kept = client.post("/api/v1/bookings/series", json={**body, "keep_partial": True}, headers=world.headers("alice"))
    assert kept.status_code == 201, kept.text
    assert kept.json()["status"] == "partial" and kept.json()["series_id"]
    assert [o["booking_id"] is not None for o in kept.json()["occurrences"]] == [True, False, True]


def test_series_from_the_instrument_page(world: World) -> None:
    from zoneinfo import ZoneInfo

    from fastapi.testclient import TestClient

    from labcommons.app import create_app
    from tests.web.conftest import csrf_of, sign_in

    start = next_grid_day()
    with world.db.unit_of_work() as s:
        service.reserve_slot(s, world.actors["bob"], world.instruments["CONF"], start + timedelta(weeks=2),
                             start + timedelta(weeks=2, hours=1))
    local = start.astimezone(ZoneInfo("Asia/Shanghai"))
    conf = world.instruments["CONF"]
    with TestClient(create_app(db=world.db)) as client:
        sign_in(client, "alice")
        page = client.get(f"/instruments/{conf}")
        assert f'formaction="/instruments/{conf}/book-series"' in page.text
        form = {"csrf_token": csrf_of(page.text), "date": f"{local:%Y-%m-%d}", "start": f"{local:%H:%M}",
                "duration": "60", "purpose": "time course", "repeat": "weekly", "count": "3"}
        preview = client.post(f"/instruments/{conf}/book-series", data=form)
        assert preview.status_code == 409
        assert preview.text.count('class="bookable"') == 2 and preview.text.count('class="refused"') == 1
        assert 'name="keep" value="yes"' in preview.text
        assert counts(world.db) == (1, 0)
        kept = client.post(f"/instruments/{conf}/book-series", data={**form, "keep": "yes"}, follow_redirects=False)
        assert kept.status_code == 303 and kept.headers["location"] == "/bookings"
    assert counts(world.db) == (3, 1)


def test_far_future_dates_on_the_pages_are_refused(world: World) -> None:
    from fastapi.testclient import TestClient

    from labcommons.app import create_app
    from tests.web.conftest import csrf_of, sign_in

    conf = world.instruments["CONF"]
    with TestClient(create_app(db=world.db)) as client:
        sign_in(client, "alice")
        token = csrf_of(client.get(f"/instruments/{conf}").text)
        form = {"csrf_token": token, "date": "2030-01-07", "start": "09:00", "duration": "60", "repeat": "weekly",
                "until": "9999-12-31"}
        assert client.post(f"/instruments/{conf}/book-series", data=form).status_code == 422
        late = {**form, "date": "9999-12-31", "start": "23:00", "until": "", "count": "2"}
        assert client.post(f"/instruments/{conf}/book-series", data=late).status_code == 422
    with world.db.unit_of_work() as s:
        roles.grant_role(s, None, identity.find_user(s, "bob@example.org"), "facility_manager",
                         facility_id=world.facilities["CQ-LAB"])
    with TestClient(create_app(db=world.db)) as client:
        sign_in(client, "bob")
        page = client.get(f"/manage/instruments/{conf}/qualifications")
        granted = client.post(f"/manage/instruments/{conf}/qualifications", data={
            "csrf_token": csrf_of(page.text), "email": "alice@example.org", "level": "independent",
            "expires": "9999-12-31"})
        assert granted.status_code == 422


# --- cancelling a series -----------------------------------------------------------------------------------


def _weekly_series(world: World, user: str = "alice", count: int = 4) -> tuple[int, list[int]]:
    start = next_grid_day()
    with world.db.unit_of_work() as s:
        result = recurrence.book_series(s, world.actors[user], world.instruments["CONF"], start, 60,
                                        f"FREQ=WEEKLY;COUNT={count}", timezone="Asia/Shanghai")
        assert result.status == "booked" and result.series is not None
        return result.series.id, [o.booking.id for o in result.occurrences if o.booking is not None]


def test_cancel_series_cancels_the_future_and_reports_the_rest(world: World) -> None:
    from labcommons.booking import policy
    from labcommons.booking.models import BookingPolicy, BookingStatus, WaitlistEntry, WaitlistStatus

    series_id, ids = _weekly_series(world)
    with world.db.unit_of_work() as s:
        s.merge(BookingPolicy(instrument_id=world.instruments["CONF"],
                              **(policy.DEFAULTS | {"cancellation_deadline_hours": 24})))
        first, second = s.get(Booking, ids[0]), s.get(Booking, ids[1])
        assert first is not None and second is not None
        # The first occurrence is in use, the second is within the deadline; the third has a waiter.
        now = second.starts_at - timedelta(hours=1)
        first.starts_at, first.ends_at = now - timedelta(minutes=30), now + timedelta(minutes=30)
        first.checked_in_at = now - timedelta(minutes=20)
        third = s.get(Booking, ids[2])
        assert third is not None
        s.add(WaitlistEntry(user_id=world.actors["bob"].user_id, instrument_id=third.instrument_id,
                            starts_at=third.starts_at, ends_at=third.ends_at, purpose="",
                            status=WaitlistStatus.waiting, created_at=now))
    with world.db.unit_of_work() as s:
        result = recurrence.cancel_series(s, world.actors["alice"], series_id, now=now)
        assert [b.id for b in result.cancelled] == ids[2:]
        assert [(o.booking.id, o.code) for o in result.skipped] == [
            (ids[0], "booking_not_cancellable"), (ids[1], "cancellation_deadline_passed")]
    with world.db.unit_of_work(write=False) as s:
        statuses = [s.get(Booking, i).status for i in ids]  # type: ignore[union-attr]
        assert statuses[:2] != [BookingStatus.cancelled] * 2
        assert statuses[2:] == [BookingStatus.cancelled] * 2
        entry = s.scalars(select(WaitlistEntry)).one()
        assert entry.status == WaitlistStatus.offered


def test_cancel_series_of_someone_else_is_not_found(world: World) -> None:
    from labcommons.errors import NotFound

    series_id, _ids = _weekly_series(world)
    with world.db.unit_of_work() as s, pytest.raises(NotFound):
        recurrence.cancel_series(s, world.actors["bob"], series_id)
    with world.db.unit_of_work() as s, pytest.raises(NotFound):
        recurrence.cancel_series(s, world.actors["alice"], series_id + 1000)


def test_cancel_series_api(world: World) -> None:
    series_id, ids = _weekly_series(world, count=3)
    client = client_for(world.db)
    other = client.post(f"/api/v1/bookings/series/{series_id}/cancel", headers=world.headers("bob"))
    assert other.status_code == 404, other.text
    done = client.post(f"/api/v1/bookings/series/{series_id}/cancel", headers=world.headers("alice"))
    assert done.status_code == 200, done.text
    assert [b["id"] for b in done.json()["cancelled"]] == ids and done.json()["skipped"] == []
    again = client.post(f"/api/v1/bookings/series/{series_id}/cancel", headers=world.headers("alice"))
    assert again.status_code == 200 and again.json()["cancelled"] == []


def test_cancel_series_from_my_bookings(world: World) -> None:
    from fastapi.testclient import TestClient

    from labcommons.app import create_app
    from tests.web.conftest import csrf_of, sign_in

    series_id, _ids = _weekly_series(world, count=3)
    with TestClient(create_app(db=world.db)) as client:
        sign_in(client, "alice")
        page = client.get("/bookings")
        assert f'action="/bookings/series/{series_id}/cancel"' in page.text
        assert client.post(f"/bookings/series/{series_id}/cancel", data={"csrf_token": "wrong"},
                           follow_redirects=False).status_code in (400, 403)
        done = client.post(f"/bookings/series/{series_id}/cancel", data={"csrf_token": csrf_of(page.text)},
                           follow_redirects=False)
        assert done.status_code == 303 and done.headers["location"] == "/bookings"
        after = client.get("/bookings")
        assert "已取消 3 次预约" in after.text
        assert f'action="/bookings/series/{series_id}/cancel"' not in after.text
