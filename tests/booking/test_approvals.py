"""The approval queue, qualifications, and the management API and pages over them."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from labcommons.actor import Actor, Grant
from labcommons.app import create_app
from labcommons.booking import approvals, qualifications, service
from labcommons.booking.models import Booking, BookingPolicy, BookingStatus, Qualification
from labcommons.booking.policy import DEFAULTS
from labcommons.errors import Conflict, Forbidden, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity import service as identity
from tests.api_client import client_for
from tests.factories import World, next_grid_day
from tests.web.conftest import csrf_of, sign_in


def needs_approval(world: World, key: str = "CONF") -> None:
    with world.db.unit_of_work() as s:
        s.merge(BookingPolicy(instrument_id=world.instruments[key], **(DEFAULTS | {"requires_approval": True})))


def request_booking(world: World, user: str = "alice", hours: int = 0, key: str = "CONF") -> int:
    start = next_grid_day() + timedelta(hours=hours)
    with world.db.unit_of_work() as s:
        booking = service.reserve_slot(s, world.actors[user], world.instruments[key], start,
                                       start + timedelta(hours=1), "please")
        assert booking.status == BookingStatus.pending
        return booking.id


def grant(world: World, user: str, role: str, facility: str = "CQ-LAB") -> Actor:
    """A real role grant (for requests) and the actor carrying it (for service calls)."""
    with world.db.unit_of_work() as s:
        roles.grant_role(s, None, identity.find_user(s, f"{user}@example.org"), role,
                         facility_id=world.facilities[facility])
    return dataclasses.replace(world.actors[user], grants=(Grant(role=role, facility_id=world.facilities[facility]),))


def load(world: World, booking_id: int) -> Booking:
    with world.db.unit_of_work(write=False) as s:
        booking = s.get(Booking, booking_id)
        assert booking is not None
        return booking


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, dict[str, Any]]]:
    seen: list[tuple[str, int, dict[str, Any]]] = []
    monkeypatch.setattr(approvals, "notify", lambda _s, event, booking, **data: seen.append((event, booking.id, data)))
    return seen


def test_approve_and_decline(world: World, events: list[Any]) -> None:
    needs_approval(world)
    manager = grant(world, "bob", "facility_staff")
    first, second = request_booking(world), request_booking(world, hours=2)
    with world.db.unit_of_work(write=False) as s:
        assert [b.id for b in approvals.pending_for(s, manager)] == [first, second]
    with world.db.unit_of_work() as s:
        approvals.approve(s, manager, first)
        approvals.decline(s, manager, second, "  The laser is being serviced.  ")
    approved, declined = load(world, first), load(world, second)
    assert (approved.status, approved.decided_by_id) == (BookingStatus.confirmed, manager.user_id)
    assert approved.decided_at is not None
    assert (declined.status, declined.cancel_kind, declined.cancel_note) == (
        BookingStatus.cancelled, "declined", "The laser is being serviced.")
    assert declined.decided_by_id == declined.cancelled_by_id == manager.user_id
    assert [e[:2] for e in events] == [("approved", first), ("declined", second)]
    assert events[1][2]["reason"] == "The laser is being serviced."
    with world.db.unit_of_work(write=False) as s:
        assert approvals.pending_for(s, manager) == []
    # The declined time is free again.
    start = next_grid_day() + timedelta(hours=2)
    with world.db.unit_of_work() as s:
        service.reserve_slot(s, world.actors["carol"], world.instruments["CONF"], start, start + timedelta(hours=1))


def test_decisions_need_a_pending_booking_and_a_reason(world: World) -> None:
    needs_approval(world)
    manager = grant(world, "bob", "facility_manager")
    booking_id = request_booking(world)
    with world.db.unit_of_work() as s, pytest.raises(InvalidInput) as err:
        approvals.decline(s, manager, booking_id, "   ")
    assert (err.value.field, err.value.code) == ("reason", "missing_reason")
    with world.db.unit_of_work() as s:
        approvals.approve(s, manager, booking_id)
    for decide in (lambda s: approvals.approve(s, manager, booking_id),
                   lambda s: approvals.decline(s, manager, booking_id, "no")):
        with world.db.unit_of_work() as s, pytest.raises(Conflict) as conflict:
            decide(s)
        assert conflict.value.code == "booking_not_pending"


def test_only_staff_of_the_facility_decide(world: World) -> None:
    needs_approval(world)
    booking_id = request_booking(world)
    other = grant(world, "carol", "facility_manager", facility="SC-UNI")
    with world.db.unit_of_work() as s, pytest.raises(NotFound):
        approvals.approve(s, other, booking_id)
    with world.db.unit_of_work(write=False) as s:
        assert approvals.pending_for(s, other) == []
    with world.db.unit_of_work() as s, pytest.raises(Forbidden):
        approvals.approve(s, world.actors["bob"], booking_id)
    with world.db.unit_of_work() as s, pytest.raises(Forbidden):
        approvals.pending_for(s, world.actors["bob"])
    admin = dataclasses.replace(world.actors["carol"], grants=(Grant(role="platform_admin"),))
    with world.db.unit_of_work() as s:
        approvals.decline(s, admin, booking_id, "Not this week.")
    assert load(world, booking_id).status == BookingStatus.cancelled


def test_grant_and_revoke_qualifications(world: World) -> None:
    staff = grant(world, "bob", "facility_staff")
    conf = world.instruments["CONF"]
    with world.db.unit_of_work() as s:
        first = qualifications.grant(s, staff, "alice@example.org", instrument_id=conf, level="assisted")
        second = qualifications.grant(s, staff, "Alice@Example.org", instrument_id=conf, note="passed the exam")
    with world.db.unit_of_work(write=False) as s:
        rows = qualifications.list_for_instrument(s, staff, conf)
        assert [(r.qualification.id, r.email) for r in rows] == [(second.id, "alice@example.org"),
                                                                  (first.id, "alice@example.org")]
        assert s.get(Qualification, first.id).revoked_at is not None, "the new grant replaces the old"  # type: ignore[union-attr]
    with world.db.unit_of_work() as s:
        qualifications.revoke(s, staff, second.id)
    with world.db.unit_of_work() as s, pytest.raises(Conflict):
        qualifications.revoke(s, staff, second.id)
    other = grant(world, "carol", "facility_manager", facility="SC-UNI")
    with world.db.unit_of_work() as s, pytest.raises(Forbidden):
        qualifications.grant(s, other, "alice@example.org", instrument_id=conf)
    with world.db.unit_of_work() as s, pytest.raises(NotFound):
        qualifications.revoke(s, other, first.id)
    with world.db.unit_of_work() as s, pytest.raises(Forbidden):
        qualifications.grant(s, staff, "alice@example.org", category_code="MIC")
    with world.db.unit_of_work() as s, pytest.raises(NotFound) as err:
        qualifications.grant(s, staff, "nobody@example.org", instrument_id=conf)
    assert err.value.field == "user_email"
    admin = dataclasses.replace(world.actors["carol"], grants=(Grant(role="platform_admin"),))
    with world.db.unit_of_work() as s:
        qualifications.grant(s, admin, "alice@example.org", category_code="MIC")
    with world.db.unit_of_work(write=False) as s:
        assert any(r.qualification.category_code == "MIC" for r in qualifications.list_for_instrument(s, staff, conf))


def test_category_qualifications_are_for_platform_admins_only(world: World) -> None:
    # A category reaches every institution's instruments, beyond what an institution's administrator manages.
    inst_admin = dataclasses.replace(
        world.actors["bob"], grants=(Grant(role="institution_admin", institution_id=world.institutions["CQ-LAB"]),)
    )
    platform = dataclasses.replace(world.actors["carol"], grants=(Grant(role="platform_admin"),))
    with world.db.unit_of_work() as s, pytest.raises(Forbidden):
        qualifications.grant(s, inst_admin, "alice@example.org", category_code="GEN")
    with world.db.unit_of_work() as s:
        category = qualifications.grant(s, platform, "alice@example.org", category_code="GEN")
        own = qualifications.grant(s, inst_admin, "alice@example.org", instrument_id=world.instruments["CONF"])
    with world.db.unit_of_work() as s, pytest.raises(NotFound):
        qualifications.revoke(s, inst_admin, category.id)
    with world.db.unit_of_work() as s:
        qualifications.revoke(s, inst_admin, own.id)
        assert qualifications.revoke(s, platform, category.id).revoked_at is not None


# --- API -----------------------------------------------------------------------------------------------------


def test_api_round_trip(world: World) -> None:
    grant(world, "bob", "facility_manager")
    client = client_for(world.db)
    conf = world.instruments["CONF"]
    assert client.get(f"/api/v1/instruments/{conf}/policy").json()["requires_approval"] is False
    bad = client.put(f"/api/v1/instruments/{conf}/policy", headers=world.headers("bob"),
                     json={"opening_hours": {"mon": [["18:00", "09:00"]]}})
    assert bad.status_code == 422
    assert (bad.json()["error"], bad.json()["field"]) == ("start_not_before_end", "opening_hours.mon")
    put = client.put(f"/api/v1/instruments/{conf}/policy", headers=world.headers("bob"),
                     json={"requires_approval": True, "max_hours_per_week": 20, "open_to": "region"})
    assert put.status_code == 200, put.text
    assert (put.json()["requires_approval"], put.json()["max_hours_per_week"], put.json()["open_to"]) == \
        (True, 20, "region")
    assert client.put(f"/api/v1/instruments/{conf}/policy", headers=world.headers("carol"),
                      json={"requires_approval": False}).status_code == 403

    start = next_grid_day()
    ids = []
    for hours in (0, 2):
        r = client.post("/api/v1/bookings", headers=world.headers("alice"), json={
            "instrument_id": conf, "starts_at": (start + timedelta(hours=hours)).isoformat(),
            "ends_at": (start + timedelta(hours=hours + 1)).isoformat()})
        assert r.status_code == 201 and r.json()["status"] == "pending", r.text
        ids.append(r.json()["id"])
    queue = client.get("/api/v1/manage/approvals", headers=world.headers("bob")).json()["items"]
    assert [(b["id"], b["user_email"]) for b in queue] == [(ids[0], "alice@example.org"), (ids[1], "alice@example.org")]
    assert client.get("/api/v1/manage/approvals", headers=world.headers("carol")).status_code == 403
    assert client.post(f"/api/v1/bookings/{ids[0]}/approve", headers=world.headers("carol")).status_code == 403
    ok = client.post(f"/api/v1/bookings/{ids[0]}/approve", headers=world.headers("bob"))
    assert ok.status_code == 200 and ok.json()["status"] == "confirmed"
    assert client.post(f"/api/v1/bookings/{ids[0]}/approve", headers=world.headers("bob")).status_code == 409
    missing = client.post(f"/api/v1/bookings/{ids[1]}/decline", headers=world.headers("bob"), json={})
    assert (missing.status_code, missing.json()["field"]) == (422, "reason")
    no = client.post(f"/api/v1/bookings/{ids[1]}/decline", headers=world.headers("bob"), json={"reason": "Full"})
    assert (no.json()["status"], no.json()["cancel_kind"], no.json()["cancel_note"]) == \
        ("cancelled", "declined", "Full")

    created = client.post(f"/api/v1/instruments/{conf}/qualifications", headers=world.headers("bob"),
                          json={"user_email": "carol@example.org", "level": "assisted"})
    assert created.status_code == 201, created.text
    listed = client.get(f"/api/v1/instruments/{conf}/qualifications", headers=world.headers("bob")).json()["items"]
    assert [(q["user_email"], q["level"]) for q in listed] == [("carol@example.org", "assisted")]
    unknown = client.post(f"/api/v1/instruments/{conf}/qualifications", headers=world.headers("bob"),
                          json={"user_email": "nobody@example.org"})
    assert (unknown.status_code, unknown.json()["field"]) == (404, "user_email")
    assert client.delete(f"/api/v1/qualifications/{created.json()['id']}", headers=world.headers("carol")).status_code \
        == 403
    assert client.delete(f"/api/v1/qualifications/{created.json()['id']}", headers=world.headers("bob")).status_code \
        == 204


def test_api_needs_the_admin_scope(world: World) -> None:
    grant(world, "bob", "facility_manager")
    with world.db.unit_of_work() as s:
        token = identity.create_api_token(s, identity.find_user(s, "bob@example.org"), name="ro",
                                          scopes=["bookings:read"])
    r = client_for(world.db).get("/api/v1/manage/approvals", headers={"Authorization": f"Bearer {token}"})
    assert (r.status_code, r.json()["error"]) == (403, "insufficient_scope")


# --- pages ---------------------------------------------------------------------------------------------------


@pytest.fixture
def client(world: World) -> Any:
    with TestClient(create_app(db=world.db)) as test_client:
        yield test_client


def test_rules_editor(client: TestClient, world: World) -> None:
    grant(world, "bob", "facility_manager")
    sign_in(client, "bob")
    conf = world.instruments["CONF"]
    page = client.get(f"/manage/instruments/{conf}/rules")
    assert page.status_code == 200 and 'name="opening_mon"' in page.text
    form = {"csrf_token": csrf_of(page.text), "open_to": "everyone", "slot_minutes": "30",
            "min_booking_minutes": "30", "max_booking_minutes": "480", "horizon_days": "30",
            "min_notice_minutes": "60", "max_hours_per_week": "", "cancellation_deadline_hours": "24",
            "buffer_minutes": "0", "no_show_grace_minutes": "15", "waitlist_offer_minutes": "60",
            "timezone": "Asia/Shanghai", "requires_approval": "on", "opening_mon": "09:00-25:00"}
    bad = client.post(f"/manage/instruments/{conf}/rules", data=form, follow_redirects=False)
    assert bad.status_code == 422
    assert 'id="rules-error"' in bad.text and 'value="09:00-25:00"' in bad.text, "the form keeps what was typed"
    form["opening_mon"] = "09:00-12:00, 13:00-18:00"
    good = client.post(f"/manage/instruments/{conf}/rules", data=form, follow_redirects=False)
    assert good.status_code == 303, good.text
    with world.db.unit_of_work(write=False) as s:
        stored = s.get(BookingPolicy, conf)
        assert stored is not None
        assert (stored.requires_approval, stored.horizon_days, stored.max_hours_per_week) == (True, 30, None)
        assert stored.opening_hours == '{"mon":[["09:00","12:00"],["13:00","18:00"]]}'
    shown = client.get(f"/instruments/{conf}?lang=en").text
    assert 'data-rule="approval"' in shown and "Monday 09:00–12:00, 13:00–18:00" in shown
    assert f'href="/manage/instruments/{conf}/rules"' in shown
    sign_in(client, "carol")
    assert client.get(f"/manage/instruments/{conf}/rules").status_code == 403


def test_approval_and_qualification_pages(client: TestClient, world: World) -> None:
    needs_approval(world)
    booking_id = request_booking(world)
    grant(world, "bob", "facility_staff")
    sign_in(client, "bob")
    queue = client.get("/manage/approvals")
    assert queue.status_code == 200 and f'data-booking="{booking_id}"' in queue.text
    assert 'href="/manage/approvals"' in queue.text, "the nav links the queue"
    csrf = csrf_of(queue.text)
    empty = client.post(f"/manage/approvals/{booking_id}/decline", data={"csrf_token": csrf, "reason": " "})
    assert empty.status_code == 422 and f'id="decline-error-{booking_id}"' in empty.text
    done = client.post(f"/manage/approvals/{booking_id}/decline", data={"csrf_token": csrf, "reason": "Closed"},
                       follow_redirects=False)
    assert done.status_code == 303
    assert load(world, booking_id).cancel_note == "Closed"

    conf = world.instruments["CONF"]
    page = client.get(f"/manage/instruments/{conf}/qualifications")
    assert page.status_code == 200
    granted = client.post(f"/manage/instruments/{conf}/qualifications", follow_redirects=False, data={
        "csrf_token": csrf, "email": "alice@example.org", "level": "assisted", "expires": "2099-12-31"})
    assert granted.status_code == 303, granted.text
    unknown = client.post(f"/manage/instruments/{conf}/qualifications", data={
        "csrf_token": csrf, "email": "nobody@example.org", "level": "assisted"})
    assert unknown.status_code == 422 and 'id="grant-error"' in unknown.text
    with world.db.unit_of_work(write=False) as s:
        q = s.query(Qualification).one()
    revoked = client.post(f"/manage/qualifications/{q.id}/revoke", follow_redirects=False,
                          data={"csrf_token": csrf, "instrument_id": str(conf)})
    assert revoked.headers["location"] == f"/manage/instruments/{conf}/qualifications"
    with world.db.unit_of_work(write=False) as s:
        assert s.get(Qualification, q.id).revoked_at is not None  # type: ignore[union-attr]
    sign_in(client, "carol")
    assert client.get("/manage/approvals").status_code == 403


def test_the_booking_form_names_the_broken_rule(client: TestClient, world: World) -> None:
    conf = world.instruments["CONF"]
    with world.db.unit_of_work() as s:
        s.merge(BookingPolicy(instrument_id=conf, **(DEFAULTS | {"requires_qualification": True})))
    sign_in(client, "alice")
    page = client.get(f"/instruments/{conf}")
    assert 'data-rule="qualification"' in page.text
    start = next_grid_day(days=3)
    r = client.post(f"/instruments/{conf}/book", data={
        "csrf_token": csrf_of(page.text), "date": start.date().isoformat(), "start": "10:00",
        "duration": "60"})
    assert r.status_code == 422 and "您没有有效的上机资质" in r.text
