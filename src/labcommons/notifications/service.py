"""What users are told about their bookings: jobs queued with the change, e-mails sent later by the job runner."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from labcommons import jobs, mail
from labcommons.booking.models import Booking, BookingKind, BookingStatus, WaitlistEntry
from labcommons.catalog.models import Instrument
from labcommons.config import get_settings
from labcommons.db import utcnow
from labcommons.errors import InvalidInput
from labcommons.identity.models import User
from labcommons.notifications.models import NotificationPreference


def N_(message: str) -> str:
    """Mark a message for the catalogue; pages translate it where they show it."""
    return message


# Events services announce; each becomes an e-mail (zh/en) unless the user switched it off.
BOOKING_EVENTS = (
    "created", "requested", "approved", "declined", "cancelled", "reminder", "waitlist_offer", "maintenance",
)
# Service orders mail through orders.notify, which asks `wants` with these keys.
ORDER_EVENTS = ("order_status", "order_staff", "order_message")
EVENTS = BOOKING_EVENTS + ORDER_EVENTS
EVENT_LABELS = {
    "order_status": N_("One of my service orders changes status"),
    "order_staff": N_("An order of a facility I work for needs attention"),
    "order_message": N_("A new message about a service order"),
    "created": N_("A booking is confirmed"),
    "requested": N_("A booking request awaits approval"),
    "approved": N_("A booking request is approved"),
    "declined": N_("A booking request is declined"),
    "cancelled": N_("A booking is cancelled"),
    "reminder": N_("Reminder 24 hours before a booking"),
    "waitlist_offer": N_("A waitlisted time is offered to me"),
    "maintenance": N_("A booking is displaced by maintenance"),
}
REMINDER_LEAD = timedelta(hours=24)
# Where a waitlist offer is accepted: the waitlist page (its accept button POSTs, which a mail link cannot).
WAITLIST_PATH = "/waitlist"
LOCALES = ("zh_CN", "en")

_mail_templates = Environment(
    loader=FileSystemLoader(str(Path(__file__).parent / "templates" / "notifications")),
    autoescape=False,  # plain-text mail; nothing here is parsed as HTML
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


# --- preferences ---------------------------------------------------------------------------------------------


def preferences(session: Session, user_id: int) -> dict[str, bool]:
    """Whether the user gets e-mail for each event (no row means yes)."""
    rows = session.scalars(select(NotificationPreference).where(NotificationPreference.user_id == user_id))
    chosen = {row.event: row.email for row in rows}
    return {event: chosen.get(event, True) for event in EVENTS}


def wants(session: Session, user_id: int, event: str) -> bool:
    choice = session.scalar(
        select(NotificationPreference.email).where(
            NotificationPreference.user_id == user_id, NotificationPreference.event == event
        )
    )
    return choice is None or bool(choice)


def set_preferences(session: Session, user_id: int, choices: Mapping[str, bool]) -> dict[str, bool]:
    """Switch e-mail per event on or off (events not named keep their setting); InvalidInput for unknown ones."""
    unknown = sorted(set(choices) - set(EVENTS))
    if unknown:
        raise InvalidInput(f"Unknown notification event {unknown[0]!r}.", field="preferences")
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    for event, email in sorted(choices.items()):
        statement = insert(NotificationPreference).values(user_id=user_id, event=event, email=bool(email))
        session.execute(statement.on_conflict_do_update(
            index_elements=[NotificationPreference.user_id, NotificationPreference.event],
            set_={"email": bool(email)},
        ))
    session.flush()
    return preferences(session, user_id)


# --- queueing ------------------------------------------------------------------------------------------------


def _stamp(moment: datetime | None) -> str:
    return moment.isoformat() if moment is not None else ""


def _discriminator(event: str, booking: Booking, data: Mapping[str, Any]) -> str:
    # The same change announced twice (a retried request) yields the same key; a later change yields another.
    if "entry_id" in data:
        return str(data["entry_id"])
    if event in ("approved", "declined") and booking.decided_at is not None:
        return _stamp(booking.decided_at)
    if event in ("cancelled", "maintenance", "declined") and booking.cancelled_at is not None:
        return _stamp(booking.cancelled_at)
    return f"{booking.status}:{_stamp(booking.created_at)}:{_stamp(booking.starts_at)}"


def notify(session: Session, event: str, booking: Booking, **data: Any) -> None:
    """Queue the notification of `event` about `booking`; it is sent after the commit by the job runner."""
    if event not in BOOKING_EVENTS:
        raise ValueError(f"unknown booking notification event {event!r}")
    # A waitlist offer names the freed booking but goes to the waiting user (`user_id`).
    recipient = int(data.get("user_id") or booking.user_id)
    if booking.kind == BookingKind.maintenance and "user_id" not in data:
        return  # a downtime block is staff's own entry, not someone's booking to tell them about
    if booking.id is None:
        session.flush()
    queue: list[jobs.JobSpec] = []
    if wants(session, recipient, event):
        queue.append(jobs.JobSpec(
            "send_notification", {"event": event, "booking_id": booking.id, "data": data},
            dedupe_key=f"{event}:{booking.id}:{_discriminator(event, booking, data)}"[:200],
        ))
    if event in ("created", "approved"):
        reminder = _reminder(booking, utcnow())
        if reminder is not None:
            queue.append(reminder)
    jobs.enqueue_many(session, queue)  # one statement for both: every booking pays for it


def _reminder(booking: Booking, now: datetime) -> jobs.JobSpec | None:
    remind_at = booking.starts_at - REMINDER_LEAD
    if remind_at <= now:
        return None
    return jobs.JobSpec("reminder", {"booking_id": booking.id, "starts_at": booking.starts_at.isoformat()},
                        dedupe_key=f"reminder:{booking.id}:{booking.starts_at.isoformat()}", run_after=remind_at)


def schedule_reminder(session: Session, booking: Booking, *, now: datetime | None = None) -> None:
    """Queue the 24-hour reminder of a booking that starts later than that; keyed by its start, so a move re-arms it."""
    reminder = _reminder(booking, now or utcnow())
    if reminder is not None:
        jobs.enqueue_many(session, [reminder])


# --- rendering and sending -----------------------------------------------------------------------------------


def user_locale(user: User) -> str:
    chosen = (user.locale or get_settings().default_locale or "zh_CN").replace("-", "_").lower()
    return "en" if chosen.startswith("en") else "zh_CN"


def render_mail(event: str, locale: str, context: Mapping[str, Any], to: str) -> mail.Mail:
    """The e-mail of an event in a locale: the template's first line is the subject, the rest the body."""
    text = _mail_templates.get_template(f"{event}.{locale}.txt").render(**context)
    subject, _sep, body = text.partition("\n")
    return mail.Mail(to=to, subject=subject.strip(), text=body.lstrip("\n"))


def _context(session: Session, booking: Booking, user: User, locale: str, data: Mapping[str, Any]) -> dict[str, Any]:
    settings = get_settings()
    zone = ZoneInfo(user.timezone or settings.default_timezone)
    instrument = session.get(Instrument, booking.instrument_id)
    base = settings.public_base_url.rstrip("/")

    def local(moment: datetime | None) -> str:
        return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M") if moment is not None else ""

    name = ""
    if instrument is not None:
        name = instrument.name_en if locale == "en" and instrument.name_en else instrument.name_zh
    context: dict[str, Any] = {
        "name": user.name, "instrument": name, "code": instrument.code if instrument else "",
        "starts": local(booking.starts_at), "ends": local(booking.ends_at), "timezone": str(zone),
        "booking_id": booking.id, "bookings_url": f"{base}/bookings",
        "reason": str(data.get("reason") or booking.cancel_note or ""),
        "preferences_url": f"{base}/account/notifications", "offer_expires": "", "accept_url": "",
    }
    if "entry_id" in data:
        entry = session.get(WaitlistEntry, int(data["entry_id"]))
        if entry is not None:  # the offer is for the interval the user waited for, not the whole freed booking
            context.update(starts=local(entry.starts_at), ends=local(entry.ends_at))
        context["offer_expires"] = local(entry.offer_expires_at if entry else None)
        context["accept_url"] = str(data.get("accept_url") or base + WAITLIST_PATH)
    return context


def _send(session: Session, event: str, booking_id: int, data: Mapping[str, Any]) -> None:
    booking = session.get(Booking, booking_id)
    if booking is None:
        return  # deleted since: nothing left to tell
    user = session.get(User, int(data.get("user_id") or booking.user_id))
    if user is None or not user.is_active:
        return
    locale = user_locale(user)
    message = render_mail(event, locale, _context(session, booking, user, locale, data), user.email)
    mail.get_mailer().send(message)


@jobs.handler("send_notification")
def send_notification(session: Session, payload: dict[str, Any]) -> None:
    """Job: e-mail one event about one booking to its holder."""
    _send(session, payload["event"], int(payload["booking_id"]), payload.get("data") or {})


@jobs.handler("reminder")
def send_reminder(session: Session, payload: dict[str, Any]) -> None:
    """Job: the 24-hour reminder; nothing if the booking is no longer confirmed, has moved, or reminders are off."""
    booking = session.get(Booking, int(payload["booking_id"]))
    if booking is None or booking.status != BookingStatus.confirmed:
        return
    if booking.starts_at.isoformat() != payload.get("starts_at"):
        return  # moved: the reminder of its new start was queued with the move
    if not wants(session, booking.user_id, "reminder"):
        return
    _send(session, "reminder", booking.id, {})


@jobs.handler("send_mail", sensitive=True)
def send_mail(session: Session, payload: dict[str, Any]) -> None:
    """Job: one ready-made message (a password-reset link); its payload is wiped when the job finishes."""
    mail.get_mailer().send(mail.Mail(to=payload["to"], subject=payload["subject"], text=payload["text"]))
