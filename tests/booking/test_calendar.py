"""iCalendar feeds: a user's bookings and an instrument's calendar at secret addresses, parsed back."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from icalendar import Calendar
from sqlalchemy import select

from labcommons.app import create_app
from labcommons.booking import calendar
from labcommons.booking.models import Booking, BookingStatus, CalendarFeed
from labcommons.config import get_settings
from labcommons.db import utcnow
from labcommons.identity import roles
from labcommons.identity import service as identity
from tests.booking.test_usage import START, add_booking
from tests.factories import World
from tests.web.conftest import csrf_of, sign_in


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    with TestClient(create_app(db=world.db)) as test_client:
        yield test_client


def make_feed(world: World, user: str, instrument: str | None = None) -> str:
    with world.db.unit_of_work() as s:
        instrument_id = world.instruments[instrument] if instrument else None
        _feed, token = calendar.create_feed(s, world.actors[user], instrument_id=instrument_id)
    return token


def fetch(client: TestClient, token: str) -> Calendar:
    response = client.get(f"/calendar/{token}.ics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/calendar; charset=utf-8"
    return Calendar.from_ical(response.content)


def events(cal: Calendar) -> dict[str, object]:
    return {str(e["uid"]): e for e in cal.walk("VEVENT")}


def host() -> str:
    return urlsplit(get_settings().public_base_url).hostname or ""


def test_user_feed_lists_active_and_recent_bookings_with_status(client: TestClient, world: World) -> None:
    upcoming = add_booking(world, "alice")
    cancelled = add_booking(world, "alice", starts_at=START + timedelta(hours=3))
    old = add_booking(world, "alice", starts_at=START - timedelta(days=45))
    recent = add_booking(world, "alice", starts_at=START - timedelta(days=5), status=BookingStatus.completed)
    someone_else = add_booking(world, "bob", starts_at=START + timedelta(hours=5))
    with world.db.unit_of_work() as s:
        row = s.get(Booking, cancelled)
        assert row is not None
        row.status, row.cancelled_at, row.cancel_kind = BookingStatus.cancelled, utcnow(), "user"

    cal = fetch(client, make_feed(world, "alice"))
    assert "My instrument bookings" in str(cal["x-wr-calname"])
    assert cal["refresh-interval"].to_ical() == b"PT15M" and str(cal["x-published-ttl"]) == "PT15M"
    found = events(cal)
    assert set(found) == {f"booking-{i}@{host()}" for i in (upcoming, cancelled, recent)}
    assert f"booking-{old}@{host()}" not in found and f"booking-{someone_else}@{host()}" not in found
    event = found[f"booking-{upcoming}@{host()}"]
    assert event.decoded("dtstart") == START  # type: ignore[attr-defined]
    assert event.decoded("dtend") == START + timedelta(hours=1)  # type: ignore[attr-defined]
    assert str(event["summary"]) == "激光共聚焦显微镜 / Confocal microscope"  # type: ignore[index]
    assert str(event["status"]) == "CONFIRMED"  # type: ignore[index]
    assert "成像 imaging" in str(event["description"])  # type: ignore[index]
    assert "CQ-LAB Laboratory" in str(event["location"])  # type: ignore[index]
    gone = found[f"booking-{cancelled}@{host()}"]
    assert str(gone["status"]) == "CANCELLED" and int(gone["sequence"]) == 1  # type: ignore[index]


def test_instrument_feed_hides_names_unless_the_owner_manages_the_facility(client: TestClient, world: World) -> None:
    mine = add_booking(world, "alice")
    block = add_booking(world, "bob", starts_at=START + timedelta(hours=2), kind="maintenance")
    cancelled = add_booking(world, "alice", starts_at=START + timedelta(hours=4), status=BookingStatus.cancelled)
    add_booking(world, "alice", "SEQ", starts_at=START, minutes=120)

    public = client.get(f"/calendar/{make_feed(world, 'carol', 'CONF')}.ics")
    assert b"Alice" not in public.content and "成像".encode() not in public.content
    found = events(Calendar.from_ical(public.content))
    assert set(found) == {f"booking-{mine}@{host()}", f"booking-{block}@{host()}"}
    assert str(found[f"booking-{mine}@{host()}"]["summary"]) == "已预约 / Booked"  # type: ignore[index]
    assert "Maintenance" in str(found[f"booking-{block}@{host()}"]["summary"])  # type: ignore[index]
    assert f"booking-{cancelled}@{host()}" not in found

    with world.db.unit_of_work() as s:
        carol = identity.find_user(s, "carol@example.org")
        roles.grant_role(s, None, carol, "facility_staff", facility_id=world.facilities["CQ-LAB"])
    staff = fetch(client, make_feed(world, "carol", "CONF"))
    summary = str(events(staff)[f"booking-{mine}@{host()}"]["summary"])  # type: ignore[index]
    assert "Alice" in summary
    assert "激光共聚焦显微镜" in str(staff["x-wr-calname"])


def test_revoked_and_unknown_feeds_are_404(client: TestClient, world: World) -> None:
    token = make_feed(world, "alice")
    assert client.get(f"/calendar/{token}.ics").status_code == 200
    with world.db.unit_of_work() as s:
        feed = calendar.feed_for_token(s, token)
        calendar.revoke_feed(s, world.actors["alice"].user_id, feed.id)
    assert client.get(f"/calendar/{token}.ics").status_code == 404
    assert client.get("/calendar/lcc_unknown.ics").status_code == 404
    with world.db.unit_of_work(write=False) as s:
        stored = s.scalars(select(CalendarFeed)).one()
        assert token not in stored.token_hash and len(stored.token_hash) == 64


def test_calendars_page_creates_shows_once_and_revokes(client: TestClient, world: World) -> None:
    sign_in(client, "alice")
    page = client.get("/account/calendars?lang=en")
    assert page.status_code == 200 and "No calendar addresses yet." in page.text
    csrf = csrf_of(page.text)
    made = client.post("/account/calendars", data={"csrf_token": csrf, "kind": "mine"}, follow_redirects=False)
    assert made.status_code == 303
    shown = client.get("/account/calendars")
    assert 'id="new-feed-url"' in shown.text
    url = shown.text.split('id="new-feed-url">')[1].split("<")[0]
    assert url.endswith(".ics")
    assert client.get(urlsplit(url).path).status_code == 200
    assert 'id="new-feed-url"' not in client.get("/account/calendars").text  # shown once

    bad = client.post("/account/calendars", data={"csrf_token": csrf, "kind": "instrument", "instrument": "NOPE"})
    assert bad.status_code == 422 and 'id="feed-error"' in bad.text
    ok = client.post("/account/calendars", data={"csrf_token": csrf, "kind": "instrument", "instrument": "CQ-SEQ"},
                     follow_redirects=False)
    assert ok.status_code == 303
    listing = client.get("/account/calendars?lang=en").text
    assert "High-throughput sequencer" in listing and "My bookings" in listing
    with world.db.unit_of_work(write=False) as s:
        feeds = calendar.list_feeds(s, world.actors["alice"].user_id)
    for row in feeds:
        revoked = client.post(f"/account/calendars/{row.feed.id}/revoke", data={"csrf_token": csrf},
                              follow_redirects=False)
        assert revoked.status_code == 303
    assert client.get(urlsplit(url).path).status_code == 404
    # Another user's feed cannot be revoked from here.
    other = make_feed(world, "bob")
    with world.db.unit_of_work(write=False) as s:
        bob_feed = calendar.feed_for_token(s, other).id
    assert client.post(f"/account/calendars/{bob_feed}/revoke", data={"csrf_token": csrf}).status_code == 404
    assert client.get(f"/calendar/{other}.ics").status_code == 200
    assert "/account/calendars" in client.get("/account").text


def _deactivate(world: World, email: str) -> None:
    with world.db.unit_of_work() as s:
        user = identity.find_user(s, email)
        assert user is not None
        user.is_active = False


def test_a_deactivated_owners_feeds_are_404(client: TestClient, world: World) -> None:
    add_booking(world, "alice")
    own, instrument = make_feed(world, "alice"), make_feed(world, "alice", "CONF")
    assert client.get(f"/calendar/{own}.ics").status_code == 200
    _deactivate(world, "alice@example.org")
    assert client.get(f"/calendar/{own}.ics").status_code == 404
    assert client.get(f"/calendar/{instrument}.ics").status_code == 404


def test_an_instrument_feed_names_nobody_once_its_staff_owner_is_deactivated(world: World) -> None:
    add_booking(world, "alice")
    with world.db.unit_of_work() as s:
        carol = identity.find_user(s, "carol@example.org")
        roles.grant_role(s, None, carol, "facility_staff", facility_id=world.facilities["CQ-LAB"])
    token = make_feed(world, "carol", "CONF")
    with world.db.unit_of_work(write=False) as s:
        assert b"Alice" in calendar.render_feed(s, calendar.feed_for_token(s, token))
    _deactivate(world, "carol@example.org")
    with world.db.unit_of_work(write=False) as s:
        feed = s.scalars(select(CalendarFeed)).one()
        assert b"Alice" not in calendar.render_feed(s, feed)
