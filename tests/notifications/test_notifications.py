"""Booking notifications: queued with the change, sent by the job runner to a real SMTP server on loopback."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from datetime import timedelta
from email.message import Message
from zoneinfo import ZoneInfo

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from labcommons import jobs
from labcommons.app import create_app
from labcommons.booking import service as booking
from labcommons.booking.models import Booking, BookingStatus, WaitlistEntry, WaitlistStatus
from labcommons.db import Database, utcnow
from labcommons.identity.models import User
from labcommons.notifications import service as notifications
from labcommons.notifications.models import Job, JobStatus
from tests.factories import World, next_grid_day
from tests.test_mail import SmtpSink, settings_env, smtp_backend
from tests.web.conftest import csrf_of, sign_in


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    with smtp_backend() as sink:
        yield sink


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def book(world: World, user: str = "alice", days: int = 3, hours: int = 2) -> int:
    start = next_grid_day(days)
    with world.db.unit_of_work() as s:
        return booking.reserve_slot(s, world.actors[user], world.instruments["CONF"], start,
                                    start + timedelta(hours=hours), "imaging").id


def queued(db: Database) -> list[Job]:
    with db.unit_of_work(write=False) as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


def body(message: Message) -> str:
    part = message.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def set_locale(db: Database, email: str, locale: str) -> None:
    with db.unit_of_work() as s:
        s.execute(update(User).where(User.email == email).values(locale=locale))


def test_a_new_booking_is_mailed_once_by_the_runner_in_chinese(world: World, smtp: SmtpSink) -> None:
    booking_id = book(world)
    kinds = sorted((j.kind, j.status) for j in queued(world.db))
    assert kinds == [("reminder", JobStatus.queued), ("send_notification", JobStatus.queued)]
    assert smtp.messages == []  # nothing is sent before the runner runs
    assert jobs.run_pending(world.db, "w").done == 1  # the reminder is not due yet
    [message] = smtp.wait_for(1)
    assert message["To"] == "alice@example.org"
    assert str(message["Subject"]).startswith("预约已确认：激光共聚焦显微镜")
    text = body(message)
    assert "Alice，您好" in text and f"预约编号：{booking_id}" in text and "Asia/Shanghai" in text
    assert "http://labcommons.test/account/notifications" in text
    assert jobs.run_pending(world.db, "w").total == 0
    smtp.wait_for(2, timeout=0.3)
    assert len(smtp.messages) == 1


def test_english_users_get_english_mail_in_their_zone(world: World, smtp: SmtpSink) -> None:
    set_locale(world.db, "bob@example.org", "en")
    with world.db.unit_of_work() as s:
        s.execute(update(User).where(User.email == "bob@example.org").values(timezone="Europe/Berlin"))
    book(world, "bob")
    jobs.run_pending(world.db, "w")
    [message] = smtp.wait_for(1)
    assert str(message["Subject"]).startswith("Booking confirmed: Confocal microscope")
    assert "Hello Bob" in body(message) and "Europe/Berlin" in body(message)


def test_the_same_change_is_never_queued_twice(world: World, smtp: SmtpSink) -> None:
    booking_id = book(world)
    with world.db.unit_of_work() as s:
        row = s.get(Booking, booking_id)
        assert row is not None
        notifications.notify(s, "created", row)  # a retried announcement of the same change
        row.decided_at = utcnow()
        notifications.notify(s, "approved", row)
        notifications.notify(s, "approved", row)
    events = [json.loads(j.payload).get("event") for j in queued(world.db) if j.kind == "send_notification"]
    assert events == ["created", "approved"]
    assert jobs.run_pending(world.db, "w").done == 2
    assert len(smtp.wait_for(2)) == 2


def test_smtp_down_then_up_sends_exactly_one_mail(world: World, smtp: SmtpSink) -> None:
    book(world)
    now = utcnow()
    with settings_env(smtp_port=closed_port()):
        assert jobs.run_pending(world.db, "w", now=now).retried == 1
    [job] = [j for j in queued(world.db) if j.kind == "send_notification"]
    assert job.status == JobStatus.queued and job.attempts == 1 and job.last_error
    assert jobs.run_pending(world.db, "w", now=now).total == 0  # waiting out the backoff
    assert jobs.run_pending(world.db, "w", now=now + jobs.backoff(1)).done == 1
    assert len(smtp.wait_for(1)) == 1
    assert jobs.run_pending(world.db, "w", now=now + timedelta(hours=1)).total == 0
    smtp.wait_for(2, timeout=0.3)
    assert len(smtp.messages) == 1


def test_smtp_down_for_good_fails_after_max_attempts(world: World) -> None:
    with settings_env(mail_backend="smtp", smtp_port=closed_port(), job_max_attempts=3):
        book(world)
        moment = utcnow()
        for _ in range(3):
            jobs.run_pending(world.db, "w", now=moment)
            moment += timedelta(minutes=30)
    [job] = [j for j in queued(world.db) if j.kind == "send_notification"]
    assert job.status == JobStatus.failed and job.attempts == 3
    assert "ConnectionRefusedError" in job.last_error


def test_a_rolled_back_booking_queues_nothing(world: World) -> None:
    start = next_grid_day(3)
    with pytest.raises(RuntimeError), world.db.unit_of_work() as s:
        booking.reserve_slot(s, world.actors["alice"], world.instruments["CONF"], start, start + timedelta(hours=1))
        raise RuntimeError("something after it failed")
    assert queued(world.db) == []


def test_an_event_switched_off_queues_no_mail(world: World) -> None:
    with world.db.unit_of_work() as s:
        notifications.set_preferences(s, world.actors["alice"].user_id, {"created": False})
    book(world)
    assert [j.kind for j in queued(world.db)] == ["reminder"]  # reminders are their own setting


def test_the_reminder_comes_24_hours_before_and_not_earlier(world: World, smtp: SmtpSink) -> None:
    set_locale(world.db, "alice@example.org", "en")
    booking_id = book(world)
    jobs.run_pending(world.db, "w")
    smtp.wait_for(1)
    [reminder] = [j for j in queued(world.db) if j.kind == "reminder"]
    with world.db.unit_of_work(write=False) as s:
        starts_at = s.get_one(Booking, booking_id).starts_at
    assert reminder.run_after == starts_at - timedelta(hours=24)
    assert reminder.dedupe_key == f"reminder:{booking_id}:{starts_at.isoformat()}"
    assert jobs.run_pending(world.db, "w", now=starts_at - timedelta(hours=25)).total == 0
    assert jobs.run_pending(world.db, "w", now=starts_at - timedelta(hours=24)).done == 1
    messages = smtp.wait_for(2)
    assert str(messages[1]["Subject"]).startswith("Reminder: Confocal microscope")
    assert "starts within 24 hours" in body(messages[1])


def test_no_reminder_for_a_cancelled_booking(world: World, smtp: SmtpSink) -> None:
    booking_id = book(world)
    with world.db.unit_of_work() as s:
        booking.cancel_booking(s, world.actors["alice"], booking_id)
        starts_at = s.get_one(Booking, booking_id).starts_at
    assert jobs.run_pending(world.db, "w", now=starts_at - timedelta(hours=1)).done == 3  # created, cancelled, reminder
    subjects = sorted(str(m["Subject"]) for m in smtp.wait_for(2))
    assert [s[:5] for s in subjects] == ["预约已取消", "预约已确认"]
    smtp.wait_for(3, timeout=0.3)
    assert len(smtp.messages) == 2  # the reminder job ran and sent nothing


def test_a_booking_within_24_hours_gets_no_reminder(world: World) -> None:
    start = utcnow().replace(minute=0, second=0, microsecond=0) + timedelta(hours=3)
    with world.db.unit_of_work() as s:
        booking.reserve_slot(s, world.actors["alice"], world.instruments["CONF"], start, start + timedelta(hours=1))
    assert [j.kind for j in queued(world.db)] == ["send_notification"]


@pytest.mark.parametrize("locale", ["zh_CN", "en"])
@pytest.mark.parametrize("event", notifications.BOOKING_EVENTS)
def test_every_event_has_a_mail_in_both_languages(event: str, locale: str) -> None:
    context = dict(name="Alice", instrument="X", code="CQ-X", starts="2030-01-02 09:00", ends="2030-01-02 11:00",
                   timezone="Asia/Shanghai", booking_id=7, bookings_url="http://h/bookings", reason="laser service",
                   preferences_url="http://h/account/notifications", offer_expires="2030-01-01 10:00",
                   accept_url="http://h/waitlist")
    message = notifications.render_mail(event, locale, context, "a@example.org")
    assert message.subject and "X" in message.subject and "{{" not in message.text
    assert "2030-01-02 09:00" in message.text
    if event in ("declined", "maintenance"):
        assert "laser service" in message.text
    if event == "waitlist_offer":
        assert "2030-01-01 10:00" in message.text and "http://h/waitlist" in message.text


def test_password_reset_mail_goes_through_the_queue(world: World, smtp: SmtpSink) -> None:
    client = TestClient(create_app(db=world.db))
    form = client.get("/password/forgot")
    answer = client.post("/password/forgot", data={"csrf_token": csrf_of(form.text), "email": "alice@example.org"},
                         follow_redirects=False)
    assert answer.status_code == 303
    [job] = queued(world.db)
    assert job.kind == "send_mail" and smtp.messages == []  # the answer did not wait for SMTP
    assert jobs.run_pending(world.db, "w").done == 1
    [message] = smtp.wait_for(1)
    assert "/password/reset/" in body(message)
    assert queued(world.db)[0].payload == "{}"  # the link does not stay in the database


# --- preferences: page and API -------------------------------------------------------------------------------


def test_preferences_page_saves_with_post_redirect_get(world: World) -> None:
    with TestClient(create_app(db=world.db)) as client:
        assert client.get("/account/notifications", follow_redirects=False).status_code == 303
        client.cookies.set("lang", "en")
        sign_in(client, "alice")
        page = client.get("/account/notifications")
        assert page.status_code == 200 and page.text.count('type="checkbox"') == len(notifications.EVENTS)
        assert "Reminder 24 hours before a booking" in page.text
        ticked = [e for e in notifications.EVENTS if e not in ("reminder", "requested")]
        saved = client.post("/account/notifications", data={"csrf_token": csrf_of(page.text), "email": ticked},
                            follow_redirects=False)
        assert saved.status_code == 303 and saved.headers["location"] == "/account/notifications"
        again = client.get("/account/notifications")
        assert "Notification settings saved." in again.text
        assert 'value="reminder" >' in again.text and 'value="created" checked>' in again.text
        refused = client.post("/account/notifications", data={"csrf_token": "forged", "email": []},
                              follow_redirects=False)
        assert refused.status_code == 403
        assert "/account/notifications" in client.get("/account").text
    with world.db.unit_of_work(write=False) as s:
        chosen = notifications.preferences(s, world.actors["alice"].user_id)
    assert [e for e, on in chosen.items() if not on] == ["requested", "reminder"]


def test_preferences_api(world: World) -> None:
    client = TestClient(create_app(db=world.db))
    headers = world.headers("bob")
    assert client.get("/api/v1/me/notifications").status_code == 401
    assert client.get("/api/v1/me/notifications", headers=headers).json() == {
        "email": {e: True for e in notifications.EVENTS}
    }
    changed = client.put("/api/v1/me/notifications", headers=headers, json={"email": {"cancelled": False}})
    assert changed.status_code == 200 and changed.json()["email"]["cancelled"] is False
    assert changed.json()["email"]["created"] is True
    back = client.put("/api/v1/me/notifications", headers=headers, json={"email": {"cancelled": True}})
    assert back.json()["email"]["cancelled"] is True
    wrong = client.put("/api/v1/me/notifications", headers=headers, json={"email": {"pigeon": True}})
    assert wrong.status_code == 422 and wrong.json()["field"] == "preferences"


def test_a_waitlist_offer_goes_to_the_waiting_user_with_its_expiry(world: World, smtp: SmtpSink) -> None:
    set_locale(world.db, "carol@example.org", "en")
    booking_id = book(world, "alice")
    jobs.run_pending(world.db, "w")
    smtp.wait_for(1)
    with world.db.unit_of_work() as s:
        freed = s.get_one(Booking, booking_id)
        expires = utcnow().replace(microsecond=0) + timedelta(hours=1)
        entry = WaitlistEntry(instrument_id=freed.instrument_id, user_id=world.actors["carol"].user_id,
                              starts_at=freed.starts_at, ends_at=freed.starts_at + timedelta(hours=1),
                              status=WaitlistStatus.offered, offered_at=utcnow(), offer_expires_at=expires)
        s.add(entry)
        s.flush()
        notifications.notify(s, "waitlist_offer", freed, entry_id=entry.id, user_id=entry.user_id)
        offer_end = entry.ends_at
    assert jobs.run_pending(world.db, "w").done == 1
    offer = smtp.wait_for(2)[1]
    assert offer["To"] == "carol@example.org"
    text = body(offer)
    local = ZoneInfo("Asia/Shanghai")
    assert f"before {expires.astimezone(local):%Y-%m-%d %H:%M}" in text
    assert f"to {offer_end.astimezone(local):%Y-%m-%d %H:%M}" in text  # the waited-for interval
    assert "http://labcommons.test/waitlist" in text


def test_a_declined_request_tells_the_reason(world: World, smtp: SmtpSink) -> None:
    booking_id = book(world, "alice")
    with world.db.unit_of_work() as s:
        row = s.get_one(Booking, booking_id)
        row.status = BookingStatus.cancelled
        row.decided_at = row.cancelled_at = utcnow()
        notifications.notify(s, "declined", row, reason="乙醇储量不足")
    jobs.run_pending(world.db, "w")
    declined = [m for m in smtp.wait_for(2) if "未获批准" in str(m["Subject"])]
    assert declined and "原因：乙醇储量不足" in body(declined[0])
