"""iCalendar feeds at secret addresses: a user's bookings, or an instrument's calendar.

The token is random and only its SHA-256 is kept (CalendarFeed). Calendar clients are not signed in and do not
send a language, so titles are bilingual. An instrument feed names the booking's user only when the feed's
owner manages the facility (checked whenever the feed is read, so losing the role hides the names).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from icalendar import Calendar, Event
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, joinedload

from labcommons.actor import Actor
from labcommons.booking.models import ACTIVE_STATUSES, Booking, BookingKind, BookingStatus, CalendarFeed
from labcommons.booking.usage import manages
from labcommons.catalog import service as catalog
from labcommons.catalog.models import Instrument
from labcommons.config import get_settings
from labcommons.db import utcnow
from labcommons.errors import InvalidInput, NotFound
from labcommons.identity import service as identity
from labcommons.identity.models import User
from labcommons.identity.roles import grants_of

FEED_TOKEN_PREFIX = "lcc_"
# Past bookings stay in a feed this long, so clients keep recent history and see late cancellations.
PAST_DAYS = 30
REFRESH = timedelta(minutes=15)
MAX_EVENTS = 2000
_STATUS = {
    BookingStatus.pending: "TENTATIVE",
    BookingStatus.confirmed: "CONFIRMED",
    BookingStatus.completed: "CONFIRMED",
    BookingStatus.cancelled: "CANCELLED",
}


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def feed_url(token: str) -> str:
    return f"{get_settings().public_base_url.rstrip('/')}/calendar/{token}.ics"


def create_feed(session: Session, actor: Actor, *, instrument_id: int | None = None) -> tuple[CalendarFeed, str]:
    """A new feed of the actor's bookings, or of an instrument's calendar; the token is returned once."""
    if instrument_id is not None:
        catalog.get_instrument(session, instrument_id)
    token = FEED_TOKEN_PREFIX + secrets.token_urlsafe(32)
    feed = CalendarFeed(
        token_hash=_digest(token), owner_id=actor.user_id,
        user_id=None if instrument_id is not None else actor.user_id, instrument_id=instrument_id,
    )
    session.add(feed)
    session.flush()
    return feed, token


def find_instrument(session: Session, text: str) -> Instrument:
    """An instrument by its code (or numeric id), as typed on the calendars page."""
    text = text.strip()
    if not text:
        raise InvalidInput("Name an instrument.", field="instrument", code="missing_field")
    found = session.scalars(select(Instrument).where(Instrument.code == text)).first()
    if found is None and text.isdigit():
        found = session.get(Instrument, int(text))
    if found is None:
        raise NotFound(f"No instrument {text!r}.", field="instrument")
    return found


@dataclass(frozen=True)
class FeedRow:
    feed: CalendarFeed
    instrument: Instrument | None


def list_feeds(session: Session, owner_id: int) -> list[FeedRow]:
    """The owner's live feeds, newest first, with the instrument of instrument feeds."""
    feeds = session.scalars(
        select(CalendarFeed)
        .where(CalendarFeed.owner_id == owner_id, CalendarFeed.revoked_at.is_(None))
        .order_by(CalendarFeed.id.desc())
    ).all()
    ids = {f.instrument_id for f in feeds if f.instrument_id is not None}
    instruments = {i.id: i for i in session.scalars(select(Instrument).where(Instrument.id.in_(ids)))} if ids else {}
    return [FeedRow(f, instruments.get(f.instrument_id) if f.instrument_id else None) for f in feeds]


def revoke_feed(session: Session, owner_id: int, feed_id: int, *, now: datetime | None = None) -> CalendarFeed:
    """Revoke one of the owner's feeds; anyone else's is NotFound."""
    feed = session.get(CalendarFeed, feed_id)
    if feed is None or feed.owner_id != owner_id:
        raise NotFound(f"No calendar feed {feed_id}.", field="feed_id")
    if feed.revoked_at is None:
        feed.revoked_at = now or utcnow()
        session.flush()
    return feed


def feed_for_token(session: Session, token: str) -> CalendarFeed:
    """The live feed of a secret; NotFound for an unknown or revoked one, or one whose owner was deactivated."""
    feed = session.scalars(select(CalendarFeed).where(CalendarFeed.token_hash == _digest(token))).first()
    if feed is None or feed.revoked_at is not None:
        raise NotFound("No such calendar.", field="token")
    owner = session.get(User, feed.owner_id)
    # A deactivated account's secret addresses stop working with it; they look like any unknown feed.
    if owner is None or not owner.is_active:
        raise NotFound("No such calendar.", field="token")
    return feed


def _feed_bookings(session: Session, feed: CalendarFeed, since: datetime) -> Sequence[Booking]:
    stmt = (
        select(Booking)
        .where(Booking.ends_at >= since)
        .options(joinedload(Booking.instrument).joinedload(Instrument.institution), joinedload(Booking.user))
        .order_by(Booking.starts_at, Booking.id)
        .limit(MAX_EVENTS)
    )
    if feed.user_id is not None:
        return session.scalars(stmt.where(Booking.user_id == feed.user_id, Booking.kind == BookingKind.use)).all()
    # Completed bookings are past use; they stay so the instrument's history reads right.
    return session.scalars(stmt.where(
        Booking.instrument_id == feed.instrument_id,
        or_(Booking.status.in_(ACTIVE_STATUSES), Booking.status == BookingStatus.completed),
    )).all()


def _bilingual(zh: str, en: str) -> str:
    return f"{zh} / {en}" if zh and en and zh != en else (zh or en)


def _sequence(booking: Booking) -> int:
    # Each state change the client should notice bumps the sequence.
    return sum(1 for moment in (booking.decided_at, booking.cancelled_at, booking.checked_out_at) if moment)


def _event(booking: Booking, *, host: str, base: str, user_feed: bool, show_names: bool, now: datetime) -> Event:
    instrument = booking.instrument
    name = _bilingual(instrument.name_zh, instrument.name_en)
    event = Event()
    event.add("uid", f"booking-{booking.id}@{host}")
    event.add("dtstart", booking.starts_at)
    event.add("dtend", booking.ends_at)
    changed = max(m for m in (booking.created_at, booking.decided_at, booking.cancelled_at, booking.checked_in_at,
                              booking.checked_out_at) if m is not None)
    event.add("dtstamp", now)
    event.add("last-modified", changed)
    event.add("created", booking.created_at)
    event.add("sequence", _sequence(booking))
    event.add("status", _STATUS[booking.status])
    if booking.kind == BookingKind.maintenance:
        summary = f"维护 / Maintenance: {name}" if user_feed else "维护 / Maintenance"
    elif user_feed:
        summary = name
    elif show_names:
        summary = f"{booking.user.name} · 已预约 / Booked"
    else:
        summary = "已预约 / Booked"
    event.add("summary", summary)
    location = _bilingual(instrument.location_zh, instrument.location_en)
    institution = _bilingual(instrument.institution.name_zh, instrument.institution.name_en)
    event.add("location", ", ".join(p for p in (location, institution) if p))
    link = f"{base}/bookings" if user_feed else f"{base}/instruments/{instrument.id}"
    lines = [f"{name}", f"状态 / Status: {booking.status.value}"]
    if booking.purpose and (user_feed or show_names):
        lines.append(f"用途 / Purpose: {booking.purpose}")
    lines.append(link)
    event.add("description", "\n".join(lines))
    event.add("url", link)
    return event


def render_feed(session: Session, feed: CalendarFeed, *, now: datetime | None = None) -> bytes:
    """The feed as an iCalendar document (UTF-8)."""
    now = now or utcnow()
    base = get_settings().public_base_url.rstrip("/")
    host = urlsplit(base).hostname or "labcommons"
    calendar = Calendar()
    calendar.add("prodid", "-//LabCommons//Bookings//ZH-EN")
    calendar.add("version", "2.0")
    calendar.add("calscale", "GREGORIAN")
    calendar.add("method", "PUBLISH")
    user_feed = feed.user_id is not None
    show_names = False
    if user_feed:
        calendar.add("x-wr-calname", "我的仪器预约 / My instrument bookings")
    else:
        instrument = catalog.get_instrument(session, feed.instrument_id or 0)
        owner = session.get(User, feed.owner_id)
        if owner is not None and owner.is_active:
            show_names = manages(identity.actor_for(owner, grants=grants_of(session, owner.id)), instrument)
        calendar.add("x-wr-calname", _bilingual(instrument.name_zh, instrument.name_en))
    calendar.add("refresh-interval", REFRESH, parameters={"VALUE": "DURATION"})
    calendar.add("x-published-ttl", "PT15M")
    for booking in _feed_bookings(session, feed, now - timedelta(days=PAST_DAYS)):
        calendar.add_component(
            _event(booking, host=host, base=base, user_feed=user_feed, show_names=show_names, now=now)
        )
    return bytes(calendar.to_ical())
