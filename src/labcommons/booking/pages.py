"""Booking pages: the booking form's POST, "my bookings" and cancelling."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError

from labcommons.billing import pages as billing_pages
from labcommons.booking import service
from labcommons.booking.models import ACTIVE_STATUSES, Booking, BookingStatus
from labcommons.booking.schemas import BookingCreate
from labcommons.catalog.pages import render_instrument_page
from labcommons.db import Database, utcnow
from labcommons.errors import Conflict, DomainError, InvalidInput
from labcommons.http import page_actor, request_db
from labcommons.i18n import gettext_ as _
from labcommons.pages import check_csrf, localized, redirect, render, require_actor, to_utc, user_zone

router = APIRouter(include_in_schema=False)


def booking_error_message(exc: DomainError) -> str:
    """What went wrong with a booking request, in the user's language."""
    details = exc.details
    messages = {
        "overlapping_booking": _("This time is already booked. Pick a free time in the calendar."),
        "off_slot_grid": _("Start and end must fall on the instrument's %(n)s-minute slot grid.")
        % {"n": details.get("slot_minutes", "")},
        "booking_too_short": _("A booking of this instrument must last at least %(n)s minutes.")
        % {"n": details.get("min_booking_minutes", "")},
        "booking_too_long": _("A booking of this instrument may last at most %(n)s minutes.")
        % {"n": details.get("max_booking_minutes", "")},
        "starts_in_past": _("The start time is in the past."),
        "ends_before_start": _("The end must be after the start."),
        "not_open_to_user": _("This instrument is not open to users of your institution or region."),
        "instrument_not_active": _("This instrument cannot be booked at the moment."),
        "too_long": _("The purpose is too long (2,000 characters at most)."),
    }
    from labcommons.booking.manage_pages import booking_rule_message  # the per-instrument rules' messages

    return (messages.get(exc.code) or booking_rule_message(exc) or billing_pages.billing_error_message(exc)
            or _("The booking could not be made."))


def _parse_form(
    request: Request, day_text: str, start_text: str, end_text: str, duration_text: str
) -> tuple[datetime, datetime]:
    """The requested [start, end) in UTC from the form's local date, times and length."""
    try:
        return _form_interval(request, day_text, start_text, end_text, duration_text)
    except OverflowError:  # a time near the end of year 9999, past what datetime holds
        raise InvalidInput(_("Enter a date and a start time."), field="starts_at", code="form") from None


def _form_interval(
    request: Request, day_text: str, start_text: str, end_text: str, duration_text: str
) -> tuple[datetime, datetime]:
    try:
        day = date.fromisoformat(day_text.strip())
        start = time.fromisoformat(start_text.strip())
    except ValueError:
        raise InvalidInput(_("Enter a date and a start time."), field="starts_at", code="form") from None
    starts_at = to_utc(request, day, start)
    if duration_text.strip():
        try:
            minutes = int(duration_text)
        except ValueError:
            raise InvalidInput(_("Choose a length from the list."), field="ends_at", code="form") from None
        # Wall-clock length in the user's zone, so a booking across a DST change keeps its local end.
        local_start = datetime.combine(day, start, tzinfo=user_zone(request))
        return starts_at, to_utc(request, *_split(local_start + timedelta(minutes=minutes)))
    if not end_text.strip():
        raise InvalidInput(_("Enter an end time or choose a length."), field="ends_at", code="form")
    try:
        end = time.fromisoformat(end_text.strip())
    except ValueError:
        raise InvalidInput(_("Enter an end time or choose a length."), field="ends_at", code="form") from None
    # An end of 00:00 means midnight at the end of the chosen day.
    end_day = day + timedelta(days=1) if end == time(0) and start != time(0) else day
    return starts_at, to_utc(request, end_day, end)


def _split(moment: datetime) -> tuple[date, time]:
    return moment.date(), moment.time().replace(tzinfo=None)


def _when(request: Request, booking: Booking) -> str:
    zone = user_zone(request)
    start, end = booking.starts_at.astimezone(zone), booking.ends_at.astimezone(zone)
    end_fmt = "%H:%M" if end.date() == start.date() else "%Y-%m-%d %H:%M"
    return f"{start:%Y-%m-%d %H:%M}–{end.strftime(end_fmt)}"


@router.post("/instruments/{instrument_id}/book", response_model=None)
def book(
    instrument_id: int,
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    date_: Annotated[str, Form(alias="date")] = "",
    start: Annotated[str, Form()] = "",
    end: Annotated[str, Form()] = "",
    duration: Annotated[str, Form()] = "",
    purpose: Annotated[str, Form()] = "",
    account_id: Annotated[str, Form()] = "",
) -> Response:
    """Book from the instrument page: 303 to "my bookings", or the page again with the problem named."""
    actor = page_actor(request)
    if actor is None:
        # Back to the instrument page after signing in: a GET of this address would be a 405.
        return redirect(f"/login?{urlencode({'next': f'/instruments/{instrument_id}'})}")
    check_csrf(request, csrf_token)
    form = {"date": date_, "start": start, "end": end, "duration": duration, "purpose": purpose,
            "account_id": account_id}
    try:
        account = billing_pages.form_account_id(account_id)
        starts_at, ends_at = _parse_form(request, date_, start, end, duration)
        try:
            body = BookingCreate(
                instrument_id=instrument_id, starts_at=starts_at, ends_at=ends_at, purpose=purpose
            )
        except ValidationError as exc:
            field = str(exc.errors()[0]["loc"][0]) if exc.errors() else None
            raise InvalidInput("invalid booking form", field=field,
                               code="too_long" if field == "purpose" else "invalid_input") from None
        with db.unit_of_work() as session:
            booking = service.reserve_slot(
                session, actor, body.instrument_id, body.starts_at, body.ends_at, body.purpose, account_id=account
            )
            name, when = localized(booking.instrument, "name"), _when(request, booking)
            cost = billing_pages.booking_hold_text(session, booking.id)
            pending = booking.status == BookingStatus.pending
    except (InvalidInput, Conflict) as exc:
        message = exc.message if exc.code == "form" else booking_error_message(exc)
        try:
            week = date.fromisoformat(date_)
        except ValueError:
            week = None
        return render_instrument_page(
            request, db, instrument_id, week=week, form=form, error=message, error_field=exc.field,
            status_code=exc.status_code,
        )
    if pending:
        return redirect("/bookings", flash=_(
            "Requested: %(name)s, %(when)s. The facility will approve or decline it; you will get an e-mail."
        ) % {"name": name, "when": when} + cost)
    return redirect("/bookings", flash=_("Booked: %(name)s, %(when)s.") % {"name": name, "when": when} + cost)


def booking_status_label(status: BookingStatus | str) -> str:
    return {
        "pending": _("Pending"),
        "confirmed": _("Confirmed"),
        "cancelled": _("Cancelled"),
        "completed": _("Completed"),
    }.get(str(status), str(status))


@router.get("/bookings", response_class=HTMLResponse)
def my_bookings(request: Request, db: Annotated[Database, Depends(request_db)]) -> HTMLResponse:
    """The signed-in user's bookings: upcoming soonest first, then the past, newest first."""
    actor = require_actor(request)
    now = utcnow()
    with db.unit_of_work(write=False) as session:
        upcoming, more = service.list_bookings(
            session, actor, period=service.BookingPeriod.upcoming, limit=100, now=now
        )
        past, _more_past = service.list_bookings(session, actor, period=service.BookingPeriod.past, limit=50, now=now)
    return render(
        request, "booking/my_bookings.html", upcoming=upcoming, more_upcoming=more is not None, past=past,
        now=now, status_label=booking_status_label,
        cancellable=lambda b: b.status in ACTIVE_STATUSES and b.ends_at > now,
    )


@router.post("/bookings/{booking_id}/cancel", response_model=None)
def cancel(
    booking_id: int,
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Cancel one of the user's bookings and go back to the list (Post/Redirect/Get)."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    try:
        with db.unit_of_work() as session:
            booking = service.cancel_booking(session, actor, booking_id)
            name, when = localized(booking.instrument, "name"), _when(request, booking)
    except service.BookingNotCancellable:
        return redirect("/bookings", flash=_("This booking can no longer be cancelled."), kind="error")
    return redirect("/bookings", flash=_("Cancelled: %(name)s, %(when)s.") % {"name": name, "when": when})
