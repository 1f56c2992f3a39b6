"""Booking rules: every rule accepts at its boundary and refuses just past it, staff exemptions, the editor."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from labcommons.actor import Actor, Grant
from labcommons.booking import policy, service
from labcommons.booking.models import Booking, BookingKind, BookingPolicy, BookingStatus, Qualification
from labcommons.catalog.models import Instrument
from labcommons.errors import Conflict, DomainError, Forbidden
from tests.factories import World

SH = ZoneInfo("Asia/Shanghai")
# A Monday 00:00 in Shanghai, far enough ahead that the real clock never makes these bookings past.
NOW = datetime(2030, 1, 7, 0, 0, tzinfo=SH).astimezone(UTC)


def at(day: int, clock: str) -> datetime:
    """Shanghai wall-clock time `day` days after NOW's Monday, in UTC."""
    hours, minutes = (int(x) for x in clock.split(":"))
    return (datetime(2030, 1, 7, tzinfo=SH) + timedelta(days=day, hours=hours, minutes=minutes)).astimezone(UTC)


def set_policy(world: World, key: str = "CONF", **fields: Any) -> None:
    with world.db.unit_of_work() as s:
        s.merge(BookingPolicy(instrument_id=world.instruments[key], **(policy.DEFAULTS | fields)))


def book(world: World, actor: Actor, start: datetime, end: datetime, key: str = "CONF",
         now: datetime = NOW) -> Booking:
    with world.db.unit_of_work() as s:
        return service.reserve_slot(s, actor, world.instruments[key], start, end, "test", now=now)


def outcome(world: World, actor: Actor, start: datetime, end: datetime, key: str = "CONF",
            now: datetime = NOW) -> str:
    """"ok", or the code of the rule the booking breaks."""
    try:
        book(world, actor, start, end, key, now)
    except DomainError as exc:
        return exc.code
    return "ok"


def staff_of(world: World, actor: Actor, facility: str = "CQ-LAB", role: str = "facility_staff") -> Actor:
    return dataclasses.replace(actor, grants=(Grant(role=role, facility_id=world.facilities[facility]),))


def qualify(world: World, user: str, *, key: str | None = "CONF", category: str | None = None,
            level: str = "independent", expires_at: datetime | None = None, revoked: bool = False) -> None:
    with world.db.unit_of_work() as s:
        s.add(Qualification(
            user_id=world.actors[user].user_id, instrument_id=world.instruments[key] if key and not category else None,
            category_code=category, level=level, expires_at=expires_at, revoked_at=NOW if revoked else None,
        ))


def test_defaults_apply_without_a_policy_row(world: World) -> None:
    with world.db.unit_of_work(write=False) as s:
        p = policy.policy_for(s, world.instruments["CONF"])
    assert (p.requires_approval, p.horizon_days, p.timezone, p.opening_hours) == (False, 90, "Asia/Shanghai", None)
    assert outcome(world, world.actors["alice"], at(2, "10:00"), at(2, "11:00")) == "ok"


@pytest.mark.parametrize(("start", "end", "expected"), [
    (timedelta(days=7), timedelta(days=7, minutes=30), "ok"),
    (timedelta(days=7, minutes=30), timedelta(days=7, minutes=60), "beyond_horizon"),
])
def test_horizon(world: World, start: timedelta, end: timedelta, expected: str) -> None:
    set_policy(world, horizon_days=7)
    assert outcome(world, world.actors["alice"], NOW + start, NOW + end) == expected


@pytest.mark.parametrize(("minutes", "expected"), [(120, "ok"), (90, "too_short_notice")])
def test_min_notice(world: World, minutes: int, expected: str) -> None:
    set_policy(world, min_notice_minutes=120)
    start = NOW + timedelta(minutes=minutes)
    assert outcome(world, world.actors["alice"], start, start + timedelta(minutes=30)) == expected
    if expected != "ok":
        # Notice binds the facility's own staff too.
        assert outcome(world, staff_of(world, world.actors["bob"]), start, start + timedelta(minutes=30)) == expected


@pytest.mark.parametrize(("start", "end", "expected"), [
    (at(1, "09:00"), at(1, "10:00"), "ok"),  # 2 h + 1 h = the quota exactly
    (at(1, "09:00"), at(1, "10:30"), "weekly_quota_exceeded"),
    (at(6, "20:00"), at(6, "22:00"), "weekly_quota_exceeded"),  # Sunday evening is the same ISO week locally
    (at(7, "00:00"), at(7, "03:00"), "ok"),  # next Monday starts a new week in Shanghai
])
def test_weekly_quota(world: World, start: datetime, end: datetime, expected: str) -> None:
    set_policy(world, max_hours_per_week=3)
    alice = world.actors["alice"]
    book(world, alice, at(0, "09:00"), at(0, "11:00"))
    assert outcome(world, alice, start, end) == expected
    # Another user's bookings do not count against alice's quota, and staff are exempt.
    assert outcome(world, world.actors["bob"], at(2, "09:00"), at(2, "12:00")) == "ok"
    assert outcome(world, staff_of(world, alice), at(3, "09:00"), at(3, "17:00")) == "ok"


def test_weekly_quota_ignores_cancelled_bookings(world: World) -> None:
    set_policy(world, max_hours_per_week=2)
    alice = world.actors["alice"]
    first = book(world, alice, at(0, "09:00"), at(0, "11:00"))
    assert outcome(world, alice, at(1, "09:00"), at(1, "09:30")) == "weekly_quota_exceeded"
    with world.db.unit_of_work() as s:
        service.cancel_booking(s, alice, first.id, now=NOW)
    assert outcome(world, alice, at(1, "09:00"), at(1, "11:00")) == "ok"


def test_weekly_quota_counts_completed_bookings(world: World) -> None:
    set_policy(world, max_hours_per_week=2)
    alice = world.actors["alice"]
    first = book(world, alice, at(0, "09:00"), at(0, "11:00"))
    # Checking out completes the booking; the hours were still used.
    with world.db.unit_of_work() as s:
        s.get_one(Booking, first.id).status = BookingStatus.completed
    assert outcome(world, alice, at(1, "09:00"), at(1, "09:30")) == "weekly_quota_exceeded"


@pytest.mark.parametrize(("start", "end", "expected"), [
    (at(2, "11:30"), at(2, "12:00"), "ok"),
    (at(2, "11:00"), at(2, "11:30"), "buffer_violated"),
    (at(2, "09:00"), at(2, "09:30"), "ok"),
    (at(2, "09:30"), at(2, "10:00"), "buffer_violated"),
    (at(2, "13:30"), at(2, "14:00"), "buffer_violated"),  # maintenance blocks keep their buffer too
    (at(2, "13:00"), at(2, "13:30"), "ok"),
])
def test_buffer(world: World, start: datetime, end: datetime, expected: str) -> None:
    set_policy(world, buffer_minutes=30)
    book(world, world.actors["bob"], at(2, "10:00"), at(2, "11:00"))
    with world.db.unit_of_work() as s:
        s.add(Booking(instrument_id=world.instruments["CONF"], user_id=world.actors["bob"].user_id,
                      starts_at=at(2, "14:00"), ends_at=at(2, "16:00"), kind=BookingKind.maintenance,
                      status=BookingStatus.confirmed))
    assert outcome(world, world.actors["alice"], start, end) == expected


WEEKDAY_HOURS = {d: [["09:00", "18:00"]] for d in ("mon", "tue", "wed", "thu", "fri")}


@pytest.mark.parametrize(("hours", "start", "end", "expected"), [
    (WEEKDAY_HOURS, at(0, "10:00"), at(0, "18:00"), "ok"),
    (WEEKDAY_HOURS, at(0, "09:00"), at(0, "10:00"), "ok"),
    (WEEKDAY_HOURS, at(0, "08:30"), at(0, "09:30"), "outside_opening_hours"),
    (WEEKDAY_HOURS, at(0, "17:30"), at(0, "18:30"), "outside_opening_hours"),
    (WEEKDAY_HOURS, at(5, "10:00"), at(5, "11:00"), "outside_opening_hours"),  # Saturday
    ({"mon": [["09:00", "12:00"], ["12:00", "18:00"]]}, at(0, "11:00"), at(0, "13:00"), "ok"),  # periods meet
    ({"mon": [["09:00", "12:00"], ["13:00", "18:00"]]}, at(0, "11:30"), at(0, "13:30"), "outside_opening_hours"),
    ({"mon": [["18:00", "24:00"]], "tue": [["00:00", "08:00"]]}, at(0, "22:00"), at(1, "02:00"), "ok"),
])
def test_opening_hours(world: World, hours: dict[str, Any], start: datetime, end: datetime, expected: str) -> None:
    set_policy(world, opening_hours=policy.validate_hours(hours, "opening_hours"))
    assert outcome(world, world.actors["alice"], start, end) == expected
    assert outcome(world, staff_of(world, world.actors["bob"]), at(5, "20:00"), at(5, "21:00")) == "ok"


@pytest.mark.parametrize(("grant", "expected"), [
    ({}, "qualification_required"),
    ({"key": "CONF"}, "ok"),
    ({"category": "MIC.CONF"}, "ok"),
    ({"category": "MIC"}, "ok"),  # a parent category covers its children
    ({"category": "MIC.EM"}, "qualification_required"),
    ({"key": "SPATIAL"}, "qualification_required"),
    ({"key": "CONF", "expires_at": NOW + timedelta(seconds=1)}, "ok"),
    ({"key": "CONF", "expires_at": NOW}, "qualification_required"),
    ({"key": "CONF", "revoked": True}, "qualification_required"),
])
def test_qualification_required(world: World, grant: dict[str, Any], expected: str) -> None:
    set_policy(world, requires_qualification=True)
    if grant:
        qualify(world, "alice", **grant)
    assert outcome(world, world.actors["alice"], at(1, "10:00"), at(1, "11:00")) == expected


def test_qualification_exemptions(world: World) -> None:
    set_policy(world, requires_qualification=True)
    bob = world.actors["bob"]
    assert outcome(world, staff_of(world, bob), at(1, "10:00"), at(1, "11:00")) == "ok"
    assert outcome(world, staff_of(world, bob, "SC-UNI"), at(1, "12:00"), at(1, "13:00")) == \
        "qualification_required", "staff of another facility are not exempt"
    inst_admin = dataclasses.replace(bob, grants=(Grant(role="institution_admin",
                                                        institution_id=world.institutions["CQ-LAB"]),))
    assert outcome(world, inst_admin, at(1, "14:00"), at(1, "15:00")) == "ok"


@pytest.mark.parametrize(("level", "start", "end", "expected"), [
    ("assisted", at(0, "09:00"), at(0, "12:00"), "ok"),
    ("assisted", at(0, "11:30"), at(0, "12:30"), "outside_assisted_hours"),
    ("assisted", at(1, "09:00"), at(1, "10:00"), "outside_assisted_hours"),
    ("independent", at(0, "13:00"), at(0, "17:00"), "ok"),
])
def test_assisted_hours(world: World, level: str, start: datetime, end: datetime, expected: str) -> None:
    set_policy(world, requires_qualification=True, assisted_hours=policy.validate_hours(
        {"mon": [["09:00", "12:00"]]}, "assisted_hours"))
    qualify(world, "alice", level=level)
    assert outcome(world, world.actors["alice"], start, end) == expected


def test_independent_beats_assisted(world: World) -> None:
    set_policy(world, requires_qualification=True, assisted_hours=None)
    qualify(world, "alice", level="assisted")
    assert outcome(world, world.actors["alice"], at(0, "13:00"), at(0, "14:00")) == "outside_assisted_hours"
    qualify(world, "alice", category="MIC", level="independent")
    assert outcome(world, world.actors["alice"], at(0, "13:00"), at(0, "14:00")) == "ok"


def test_approval_makes_bookings_pending_except_for_staff(world: World) -> None:
    set_policy(world, requires_approval=True)
    assert book(world, world.actors["alice"], at(1, "10:00"), at(1, "11:00")).status == BookingStatus.pending
    staff = staff_of(world, world.actors["bob"])
    assert book(world, staff, at(1, "12:00"), at(1, "13:00")).status == BookingStatus.confirmed


@pytest.mark.parametrize(("before_start", "allowed"), [
    (timedelta(hours=24), True),
    (timedelta(hours=24) - timedelta(minutes=1), False),
])
def test_cancellation_deadline(world: World, before_start: timedelta, allowed: bool) -> None:
    set_policy(world, cancellation_deadline_hours=24)
    alice = world.actors["alice"]
    booking = book(world, alice, at(3, "10:00"), at(3, "11:00"))
    with world.db.unit_of_work() as s:
        if allowed:
            service.cancel_booking(s, alice, booking.id, now=booking.starts_at - before_start)
        else:
            with pytest.raises(Conflict) as err:
                service.cancel_booking(s, alice, booking.id, now=booking.starts_at - before_start)
            assert err.value.code == "cancellation_deadline_passed"
            assert err.value.status_code == 409


# --- the editor ----------------------------------------------------------------------------------------------


def manager(world: World, facility: str = "CQ-LAB") -> Actor:
    return staff_of(world, world.actors["bob"], facility, role="facility_manager")


def test_save_policy_stores_rules_and_instrument_fields(world: World) -> None:
    with world.db.unit_of_work() as s:
        policy.save_policy(
            s, manager(world), world.instruments["CONF"], requires_approval=True, max_hours_per_week="10",
            opening_hours={"tue": [["13:00", "18:00"], ["08:00", "12:00"]]}, timezone="Asia/Chongqing",
            open_to="region", slot_minutes=60, min_booking_minutes=60, max_booking_minutes=240,
        )
    with world.db.unit_of_work(write=False) as s:
        p = policy.policy_for(s, world.instruments["CONF"])
        instrument = s.get(Instrument, world.instruments["CONF"])
        assert instrument is not None
        assert (p.requires_approval, p.max_hours_per_week, p.timezone) == (True, 10, "Asia/Chongqing")
        assert p.opening_hours == '{"tue":[["08:00","12:00"],["13:00","18:00"]]}'
        assert p.updated_by_id == world.actors["bob"].user_id
        assert (instrument.open_to.value, instrument.slot_minutes, instrument.max_booking_minutes) == \
            ("region", 60, 240)
    with world.db.unit_of_work() as s:
        policy.save_policy(s, manager(world), world.instruments["CONF"], max_hours_per_week=None, opening_hours=None)
    with world.db.unit_of_work(write=False) as s:
        p = policy.policy_for(s, world.instruments["CONF"])
        assert (p.max_hours_per_week, p.opening_hours, p.requires_approval) == (None, None, True)


@pytest.mark.parametrize(("fields", "field", "code"), [
    ({"opening_hours": {"mon": [["09:00", "08:00"]]}}, "opening_hours.mon", "start_not_before_end"),
    ({"opening_hours": {"mon": [["9am", "18:00"]]}}, "opening_hours.mon", "invalid_time"),
    ({"opening_hours": {"mon": [["09:00", "24:30"]]}}, "opening_hours.mon", "invalid_time"),
    ({"assisted_hours": {"monday": [["09:00", "18:00"]]}}, "assisted_hours.monday", "invalid_weekday"),
    ({"opening_hours": {"mon": [["09:00"]]}}, "opening_hours.mon", "invalid_hours"),
    ({"opening_hours": {"mon": [["09:00", "12:00"], ["11:00", "13:00"]]}}, "opening_hours.mon",
     "overlapping_periods"),
    ({"opening_hours": "[1, 2]"}, "opening_hours", "invalid_hours"),
    ({"opening_hours": "{not json"}, "opening_hours", "invalid_hours"),
    ({"timezone": "Mars/Olympus"}, "timezone", "invalid_timezone"),
    ({"horizon_days": 0}, "horizon_days", "out_of_range"),
    ({"buffer_minutes": "ten"}, "buffer_minutes", "invalid_number"),
    ({"requires_approval": "yes"}, "requires_approval", "invalid_boolean"),
    ({"open_to": "martians"}, "open_to", "invalid_choice"),
    ({"min_booking_minutes": 600}, "min_booking_minutes", "min_above_max"),
    ({"min_booking_minutes": 45}, "min_booking_minutes", "not_on_slot_grid"),
    ({"colour": "red"}, "colour", "unknown_field"),
])
def test_save_policy_validation(world: World, fields: dict[str, Any], field: str, code: str) -> None:
    with world.db.unit_of_work() as s, pytest.raises(DomainError) as err:
        policy.save_policy(s, manager(world), world.instruments["CONF"], **fields)
    assert (err.value.status_code, err.value.field, err.value.code) == (422, field, code)


@pytest.mark.parametrize("who", ["plain", "staff", "other_manager"])
def test_save_policy_needs_a_manager_of_the_facility(world: World, who: str) -> None:
    actor = {"plain": world.actors["bob"], "staff": staff_of(world, world.actors["bob"]),
             "other_manager": manager(world, "SC-UNI")}[who]
    with world.db.unit_of_work() as s, pytest.raises(Forbidden):
        policy.save_policy(s, actor, world.instruments["CONF"], requires_approval=True)


def test_hours_text_round_trip() -> None:
    stored = policy.hours_from_text({"mon": "09:00-12:00，13:00–18:00", "fri": " 08:00-10:00 "}, "opening_hours")
    assert stored == '{"mon":[["09:00","12:00"],["13:00","18:00"]],"fri":[["08:00","10:00"]]}'
    assert policy.hours_to_text(stored)["mon"] == "09:00-12:00, 13:00-18:00"
    assert policy.hours_from_text({d: "" for d in policy.WEEKDAYS}, "opening_hours") is None
