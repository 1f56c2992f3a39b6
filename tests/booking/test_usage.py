"""Usage tracking: check-in window, idempotency, check-out, no-shows, instrument tokens, the kiosk page."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from labcommons.app import create_app
from labcommons.booking import service as booking_service
from labcommons.booking import usage, waitlist
from labcommons.booking.models import (
    Booking,
    BookingPolicy,
    BookingStatus,
    InstrumentToken,
    WaitlistEntry,
    WaitlistStatus,
)
from labcommons.cli import app as cli_app
from labcommons.config import get_settings
from labcommons.errors import Conflict
from labcommons.identity import roles
from labcommons.identity import service as identity
from tests.factories import World, next_grid_day
from tests.web.conftest import csrf_of, sign_in

START = next_grid_day(days=2, hour=2)


def add_booking(
    world: World, user: str, instrument: str = "CONF", *, starts_at: datetime = START, minutes: int = 60,
    status: BookingStatus = BookingStatus.confirmed, kind: str = "use",
) -> int:
    """A booking written straight to the database (the booking rules are not under test here)."""
    with world.db.unit_of_work() as s:
        booking = Booking(
            instrument_id=world.instruments[instrument], user_id=world.actors[user].user_id, starts_at=starts_at,
            ends_at=starts_at + timedelta(minutes=minutes), status=status, kind=kind, purpose="成像 imaging",
        )
        s.add(booking)
        s.flush()
        return booking.id


def grid_now(slot_minutes: int = 30) -> datetime:
    """The start of the slot the current time falls in."""
    step = slot_minutes * 60
    return datetime.fromtimestamp(datetime.now(UTC).timestamp() // step * step, UTC)


def load(world: World, booking_id: int) -> Booking:
    with world.db.unit_of_work(write=False) as s:
        booking = s.get(Booking, booking_id)
        assert booking is not None
        s.expunge(booking)
        return booking


def do(world: World, booking_id: int, action: str, now: datetime) -> Booking:
    with world.db.unit_of_work() as s:
        booking = usage.get_booking(s, booking_id, lock=True)
        getattr(usage, action)(s, booking, now=now)
    return load(world, booking_id)


@pytest.mark.parametrize(
    ("offset", "error"),
    [
        (timedelta(minutes=-16), "check_in_too_early"),
        (timedelta(minutes=-15), None),
        (timedelta(0), None),
        (timedelta(minutes=60, seconds=-1), None),
        (timedelta(minutes=60), "booking_ended"),
    ],
)
def test_check_in_window(world: World, offset: timedelta, error: str | None) -> None:
    booking_id = add_booking(world, "alice")
    if error is None:
        assert do(world, booking_id, "check_in", START + offset).checked_in_at == START + offset
    else:
        with pytest.raises(Conflict) as exc:
            do(world, booking_id, "check_in", START + offset)
        assert exc.value.code == error and exc.value.field == "booking_id"
        assert load(world, booking_id).checked_in_at is None


def test_check_in_is_idempotent_and_check_out_completes_with_usage_minutes(world: World) -> None:
    booking_id = add_booking(world, "alice")
    first = START + timedelta(minutes=2)
    do(world, booking_id, "check_in", first)
    assert do(world, booking_id, "check_in", START + timedelta(minutes=9)).checked_in_at == first
    out = do(world, booking_id, "check_out", START + timedelta(minutes=50))
    assert out.checked_out_at == START + timedelta(minutes=50)
    assert out.status == BookingStatus.completed
    assert usage.usage_minutes(out) == 48
    again = do(world, booking_id, "check_out", START + timedelta(minutes=55))
    assert again.checked_out_at == START + timedelta(minutes=50) and usage.usage_minutes(again) == 48
    with world.db.unit_of_work(write=False) as s:
        window = (START - timedelta(hours=1), START + timedelta(hours=2))
        records = usage.actual_usage(s, world.instruments["CONF"], *window)
        assert [(r.booking_id, r.minutes) for r in records] == [(booking_id, 48)]
        assert usage.actual_usage(s, world.instruments["SEQ"], *window) == []


def test_check_out_needs_a_check_in_and_pending_bookings_cannot_check_in(world: World) -> None:
    booking_id = add_booking(world, "alice")
    with pytest.raises(Conflict) as exc:
        do(world, booking_id, "check_out", START)
    assert exc.value.code == "not_checked_in"
    pending = add_booking(world, "bob", starts_at=START + timedelta(hours=2), status=BookingStatus.pending)
    with pytest.raises(Conflict) as exc:
        do(world, pending, "check_in", START + timedelta(hours=2))
    assert exc.value.code == "booking_not_confirmed"


def test_no_shows_are_marked_after_the_grace_period(world: World) -> None:
    default = add_booking(world, "alice")
    arrived = add_booking(world, "bob", instrument="SPATIAL")
    longer = add_booking(world, "carol", instrument="SEQ", minutes=120)
    with world.db.unit_of_work() as s:
        s.add(BookingPolicy(instrument_id=world.instruments["SEQ"], no_show_grace_minutes=30))
    do(world, arrived, "check_in", START + timedelta(minutes=1))

    def run(minutes: int) -> list[int]:
        with world.db.unit_of_work() as s:
            return usage.mark_no_shows(s, now=START + timedelta(minutes=minutes))

    assert run(14) == []
    assert run(15) == [default]  # the default grace: no policy row for the confocal
    assert run(29) == []
    assert run(30) == [longer]
    assert run(45) == []  # already marked
    marked = load(world, default)
    assert marked.no_show and marked.status == BookingStatus.confirmed  # the time is not freed
    assert not load(world, arrived).no_show
    # A late arrival still checks in, which clears the flag.
    late = do(world, default, "check_in", START + timedelta(minutes=40))
    assert late.checked_in_at is not None and not late.no_show


# --- the interlock API -------------------------------------------------------------------------------------


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    with TestClient(create_app(db=world.db)) as test_client:
        yield test_client


def instrument_token(world: World, instrument: str = "CONF") -> str:
    with world.db.unit_of_work() as s:
        _row, secret = usage.create_instrument_token(s, world.instruments[instrument], name="PC")
    return secret


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Instrument {secret}"}


def test_api_checks_in_and_out_by_email_on_the_tokens_instrument(client: TestClient, world: World) -> None:
    booking_id = add_booking(world, "alice", starts_at=grid_now())
    later = add_booking(world, "bob", starts_at=grid_now() + timedelta(hours=2))
    secret = instrument_token(world)

    current = client.get("/api/v1/instrument-usage/current", headers=auth(secret))
    assert current.status_code == 200, current.text
    body = current.json()
    assert body["current"]["booking_id"] == booking_id and body["current"]["user_email"] == "alice@example.org"
    assert [b["booking_id"] for b in body["next"]] == [later]

    url = "/api/v1/instrument-usage"
    first = client.post(f"{url}/check-in", json={"user_email": "alice@example.org"}, headers=auth(secret))
    assert first.status_code == 200, first.text
    assert first.json()["booking_id"] == booking_id and first.json()["checked_in_at"]
    again = client.post(f"{url}/check-in", json={"booking_id": booking_id}, headers=auth(secret))
    assert again.json()["checked_in_at"] == first.json()["checked_in_at"]

    early = client.post(f"{url}/check-in", json={"user_email": "bob@example.org"}, headers=auth(secret))
    assert early.status_code == 409 and early.json()["error"] == "check_in_too_early"
    nobody = client.post(f"{url}/check-in", json={"user_email": "carol@example.org"}, headers=auth(secret))
    assert nobody.status_code == 409 and nobody.json()["error"] == "no_current_booking"
    assert nobody.json()["field"] == "user_email"
    missing = client.post(f"{url}/check-in", json={}, headers=auth(secret))
    assert missing.status_code == 422 and missing.json()["field"] == "user_email"

    out = client.post(f"{url}/check-out", json={"user_email": "alice@example.org"}, headers=auth(secret))
    assert out.status_code == 200 and out.json()["status"] == "completed"
    assert out.json()["usage_minutes"] == 0
    not_in = client.post(f"{url}/check-out", json={"user_email": "alice@example.org"}, headers=auth(secret))
    assert not_in.status_code == 409 and not_in.json()["error"] == "not_checked_in"


def test_an_instrument_token_works_only_for_its_instrument_and_until_revoked(
    client: TestClient, world: World
) -> None:
    on_seq = add_booking(world, "alice", "SEQ", starts_at=grid_now(60), minutes=120)
    conf_secret = instrument_token(world, "CONF")
    url = "/api/v1/instrument-usage/check-in"
    wrong = client.post(url, json={"booking_id": on_seq}, headers=auth(conf_secret))
    assert wrong.status_code == 422 and wrong.json()["error"] == "wrong_instrument"
    assert wrong.json()["field"] == "booking_id"
    by_email = client.post(url, json={"user_email": "alice@example.org"}, headers=auth(conf_secret))
    assert by_email.status_code == 409 and by_email.json()["error"] == "no_current_booking"
    assert load(world, on_seq).checked_in_at is None

    seq_secret = instrument_token(world, "SEQ")
    with world.db.unit_of_work() as s:
        row = s.scalars(select(InstrumentToken).where(InstrumentToken.instrument_id == world.instruments["SEQ"])).one()
        usage.revoke_instrument_token(s, row.id)
    revoked = client.post(url, json={"booking_id": on_seq}, headers=auth(seq_secret))
    assert revoked.status_code == 401 and revoked.json()["revoked"] is True
    unknown = client.get("/api/v1/instrument-usage/current", headers=auth("lci_nope"))
    assert unknown.status_code == 401
    bare = client.get("/api/v1/instrument-usage/current")
    assert bare.status_code == 401 and bare.json()["error"] == "unauthenticated"
    # A user's API token is not an instrument token.
    assert client.get("/api/v1/instrument-usage/current", headers=world.headers("alice")).status_code == 401


# --- the kiosk page ----------------------------------------------------------------------------------------


def _post(client: TestClient, path: str, **data: object) -> object:
    csrf = csrf_of(client.get("/account").text)
    return client.post(path, data={"csrf_token": csrf, **data}, follow_redirects=False)


def test_kiosk_lets_the_owner_check_in_and_out_and_hides_names_from_others(client: TestClient, world: World) -> None:
    conf = world.instruments["CONF"]
    booking_id = add_booking(world, "alice", starts_at=grid_now())
    assert client.get(f"/kiosk/{conf}", follow_redirects=False).status_code == 303  # sign in first

    sign_in(client, "bob")
    page = client.get(f"/kiosk/{conf}?lang=en")
    assert page.status_code == 200 and "Alice" not in page.text and "Booked" in page.text
    assert 'data-action="check_in"' not in page.text
    refused = _post(client, f"/kiosk/{conf}/check-in", booking_id=booking_id)
    assert refused.status_code == 404  # type: ignore[attr-defined]

    client.cookies.clear()
    sign_in(client, "alice")
    page = client.get(f"/kiosk/{conf}?lang=en")
    assert "Alice" in page.text and 'data-action="check_in"' in page.text
    done = _post(client, f"/kiosk/{conf}/check-in", booking_id=booking_id)
    assert done.status_code == 303 and done.headers["location"] == f"/kiosk/{conf}"  # type: ignore[attr-defined]
    page = client.get(f"/kiosk/{conf}?lang=en")
    assert "Checked in: Alice" in page.text and 'data-action="check_out"' in page.text
    assert load(world, booking_id).checked_in_at is not None
    # From "my bookings" the same post goes back there.
    mine = client.get("/bookings")
    assert 'data-action="check_out"' in mine.text and "/account/calendars" in mine.text
    out = _post(client, f"/kiosk/{conf}/check-out", booking_id=booking_id, next="/bookings")
    assert out.headers["location"] == "/bookings"  # type: ignore[attr-defined]
    assert load(world, booking_id).status == BookingStatus.completed
    no_csrf = client.post(f"/kiosk/{conf}/check-in", data={"booking_id": booking_id}, follow_redirects=False)
    assert no_csrf.status_code == 403


def test_facility_staff_check_anyone_in_and_errors_come_back_as_flash(client: TestClient, world: World) -> None:
    conf = world.instruments["CONF"]
    booking_id = add_booking(world, "alice", starts_at=grid_now())
    early = add_booking(world, "alice", starts_at=grid_now() + timedelta(hours=3))
    with world.db.unit_of_work() as s:
        bob = identity.find_user(s, "bob@example.org")
        roles.grant_role(s, None, bob, "facility_staff", facility_id=world.facilities["CQ-LAB"])
    sign_in(client, "bob")
    page = client.get(f"/kiosk/{conf}?lang=en")
    assert "Alice" in page.text and 'data-action="check_in"' in page.text
    assert _post(client, f"/kiosk/{conf}/check-in", booking_id=booking_id).status_code == 303  # type: ignore
    assert load(world, booking_id).checked_in_at is not None
    too_early = _post(client, f"/kiosk/{conf}/check-in", booking_id=early)
    assert too_early.status_code == 303  # type: ignore[attr-defined]
    assert "Check-in opens 15 minutes" in client.get(f"/kiosk/{conf}?lang=en").text
    wrong = _post(client, f"/kiosk/{world.instruments['SEQ']}/check-in", booking_id=booking_id)
    assert wrong.status_code == 303  # type: ignore[attr-defined]
    assert "another instrument" in client.get(f"/kiosk/{conf}?lang=en").text


def test_cli_creates_lists_and_revokes_instrument_tokens(
    world: World, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LABCOMMONS_DATABASE_URL", db_url)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        made = runner.invoke(cli_app, ["instrument-tokens", "create", "--instrument", "CQ-CONF", "--name", "PC"])
        assert made.exit_code == 0, made.output
        secret = made.output.strip().splitlines()[-1]
        assert secret.startswith("lci_")
        with world.db.unit_of_work(write=False) as s:
            row = usage.authenticate_instrument(s, secret)
            assert row.instrument_id == world.instruments["CONF"]
        listed = runner.invoke(cli_app, ["instrument-tokens", "list"])
        assert "CQ-CONF" in listed.output and secret not in listed.output
        assert runner.invoke(cli_app, ["instrument-tokens", "revoke", str(row.id)]).exit_code == 0
        unknown = runner.invoke(cli_app, ["instrument-tokens", "create", "--instrument", "NOPE"])
        assert unknown.exit_code == 2
    finally:
        get_settings.cache_clear()


def test_a_checked_in_booking_cannot_be_cancelled(world: World) -> None:
    booking_id = add_booking(world, "alice")
    do(world, booking_id, "check_in", START)
    with world.db.unit_of_work() as s, pytest.raises(Conflict) as exc:
        booking_service.cancel_booking(s, world.actors["alice"], booking_id, now=START + timedelta(minutes=10))
    assert exc.value.code == "booking_not_cancellable" and "check out" in str(exc.value)
    assert load(world, booking_id).status == BookingStatus.confirmed


def test_a_cancelled_booking_cannot_be_checked_out_into_completed(world: World) -> None:
    booking_id = add_booking(world, "alice")
    do(world, booking_id, "check_in", START)
    with world.db.unit_of_work() as s:  # e.g. displaced by a maintenance block while in use
        row = s.get(Booking, booking_id)
        assert row is not None
        row.status, row.cancelled_at, row.cancel_kind = BookingStatus.cancelled, START, "maintenance"
    with pytest.raises(Conflict) as exc:
        do(world, booking_id, "check_out", START + timedelta(minutes=20))
    assert exc.value.code == "booking_not_confirmed" and "cancelled" in str(exc.value)
    after = load(world, booking_id)
    assert after.status == BookingStatus.cancelled and after.checked_out_at is None


def test_an_early_check_out_offers_the_rest_of_the_time_to_the_waitlist(world: World) -> None:
    booking_id = add_booking(world, "alice", minutes=120)
    later = (START + timedelta(hours=1), START + timedelta(hours=2))
    with world.db.unit_of_work() as s:
        entry_id = waitlist.join(s, world.actors["bob"], world.instruments["CONF"], *later,
                                 now=START - timedelta(days=1)).id
    do(world, booking_id, "check_in", START)
    do(world, booking_id, "check_out", START + timedelta(minutes=30))
    with world.db.unit_of_work(write=False) as s:
        entry = s.get(WaitlistEntry, entry_id)
        assert entry is not None and entry.status == WaitlistStatus.offered


def test_a_check_out_after_the_end_frees_nothing(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    freed: list[int] = []
    monkeypatch.setattr(waitlist, "slot_freed", lambda s, booking, *, now: freed.append(booking.id))
    early, late = add_booking(world, "alice"), add_booking(world, "bob", starts_at=START + timedelta(hours=2))
    do(world, early, "check_in", START)
    do(world, early, "check_out", START + timedelta(minutes=20))
    do(world, late, "check_in", START + timedelta(hours=2))
    do(world, late, "check_out", START + timedelta(hours=3, minutes=5))
    assert freed == [early]
