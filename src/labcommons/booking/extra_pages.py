"""Pages of maintenance blocks, recurring bookings and the waitlist."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, Response

from labcommons.actor import Actor
from labcommons.billing import accounts as billing_accounts
from labcommons.billing import ledger
from labcommons.billing import pages as billing_pages
from labcommons.booking import maintenance, recurrence, waitlist
from labcommons.booking.pages import _parse_form, booking_error_message
from labcommons.catalog import service as catalog
from labcommons.catalog.models import Instrument
from labcommons.catalog.pages import render_instrument_page
from labcommons.db import Database, utcnow
from labcommons.errors import Conflict, InvalidInput
from labcommons.http import request_db
from labcommons.i18n import gettext_ as _
from labcommons.identity.roles import Action, FacilityRef, authorize
from labcommons.pages import (
    check_csrf,
    env,
    localized,
    parse_local_datetime,
    redirect,
    render,
    require_actor,
    user_zone,
)

router = APIRouter(include_in_schema=False)


def can_manage_instrument(actor: Actor | None, instrument: Instrument) -> bool:
    """Whether the actor manages the bookings of the instrument's facility (for the instrument page's links)."""
    return authorize(actor, Action.manage_facility_bookings,
                     facility=FacilityRef(id=instrument.facility_id, institution_id=instrument.institution_id))


env.globals["can_manage_instrument"] = can_manage_instrument


def _error_message(exc: InvalidInput | Conflict) -> str:
    messages = {
        "displaces_bookings": _("This block would displace bookings; check the list and confirm."),
        "overlapping_block": _("This time overlaps another maintenance block."),
        "ends_in_past": _("The block has already ended."),
        "block_too_long": _("A block may last at most a year."),
        "missing_reason": _("Give the reason; it is sent to anyone displaced."),
        "slot_is_free": _("This time is free: book it instead of waiting."),
        "already_waiting": _("You are already on the waitlist for this time."),
        "offer_not_live": _("This offer is no longer open."),
        "slot_taken": _("Someone else booked this time after it was offered to you; it is no longer free."),
        "too_many_occurrences": _("A series is limited to %(n)s occurrences.") % {"n": recurrence.MAX_OCCURRENCES},
        "series_too_long": _("A series may span at most a year."),
        "unbounded_rrule": _("Give the number of occurrences or the last date."),
        "invalid_rrule": _("The repeat rule is not valid."),
        "empty_rrule": _("The repeat rule gives no occurrence."),
    }
    if exc.code in messages:
        return messages[exc.code]
    if exc.code == "form":
        return exc.message
    return booking_error_message(exc)


def _refusal(occurrence: recurrence.Occurrence) -> str:
    """Why an occurrence cannot be booked: the translated reason, else the rule's own message."""
    text = _error_message(InvalidInput(occurrence.message or "", code=occurrence.code))
    generic = _("The booking could not be made.")
    return occurrence.message or generic if text == generic else text


# --- maintenance ------------------------------------------------------------------------------------------


def _maintenance_page(
    request: Request, db: Database, actor: Actor, instrument_id: int, *, form: dict[str, str] | None = None,
    error: str | None = None, displaced: list[dict[str, Any]] | None = None, status_code: int = 200,
) -> HTMLResponse:
    with db.unit_of_work(write=False) as session:
        instrument, blocks = maintenance.list_blocks(session, actor, instrument_id)
    values = {"start": "", "end": "", "reason": ""}
    values.update(form or {})
    return render(
        request, "booking/maintenance.html", status_code, page_path=f"/manage/instruments/{instrument_id}/maintenance",
        instrument=instrument, blocks=blocks, form=values, error=error, displaced=displaced or [],
        parse_iso=datetime.fromisoformat,
    )


@router.get("/manage/instruments/{instrument_id}/maintenance", response_class=HTMLResponse)
def maintenance_page(
    instrument_id: int, request: Request, db: Annotated[Database, Depends(request_db)]
) -> HTMLResponse:
    """The instrument's upcoming maintenance blocks and a form to add one (facility staff)."""
    actor = require_actor(request)
    return _maintenance_page(request, db, actor, instrument_id)


@router.post("/manage/instruments/{instrument_id}/maintenance", response_model=None)
def add_maintenance(
    instrument_id: int,
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    start: Annotated[str, Form(max_length=40)] = "",
    end: Annotated[str, Form(max_length=40)] = "",
    reason: Annotated[str, Form(max_length=2000)] = "",
    confirm: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    """Add a block; over users' bookings the page lists them and asks to confirm before anything changes."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    with db.unit_of_work(write=False) as session:
        maintenance.managed_instrument(session, actor, instrument_id)
    form = {"start": start, "end": end, "reason": reason}
    try:
        try:
            starts_at, ends_at = parse_local_datetime(request, start), parse_local_datetime(request, end)
        except ValueError:
            starts_at = ends_at = None
        if starts_at is None or ends_at is None:
            raise InvalidInput(_("Enter the start and the end as a date and a time."), field="start", code="form")
        with db.unit_of_work() as session:
            _block, displaced = maintenance.create_block(
                session, actor, instrument_id, starts_at, ends_at, reason, confirm == "yes"
            )
            count = len(displaced)
    except maintenance.DisplacesBookings as exc:
        return _maintenance_page(request, db, actor, instrument_id, form=form, error=_error_message(exc),
                                 displaced=list(exc.details.get("bookings", [])), status_code=409)
    except (InvalidInput, Conflict) as exc:
        return _maintenance_page(request, db, actor, instrument_id, form=form, error=_error_message(exc),
                                 status_code=exc.status_code)
    flash = _("Maintenance block added; %(n)s booking(s) cancelled and their owners notified.") % {"n": count} \
        if count else _("Maintenance block added.")
    return redirect(f"/manage/instruments/{instrument_id}/maintenance", flash=flash)


@router.post("/manage/instruments/{instrument_id}/maintenance/{block_id}/cancel", response_model=None)
def lift_maintenance(
    instrument_id: int,
    block_id: int,
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Lift a block (Post/Redirect/Get)."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    with db.unit_of_work() as session:
        maintenance.cancel_block(session, actor, instrument_id, block_id)
    return redirect(f"/manage/instruments/{instrument_id}/maintenance", flash=_("Maintenance block lifted."))


# --- recurring bookings ----------------------------------------------------------------------------------


def _series_rule(request: Request, repeat: str, count: str, until: str) -> str:
    """An RRULE from the booking form's Repeat fields; UNTIL is the end of the chosen day in the user's zone."""
    freq = {"weekly": "WEEKLY", "daily": "DAILY"}.get(repeat)
    if freq is None:
        raise InvalidInput(_("Choose how the booking repeats."), field="repeat", code="form")
    if count.strip():
        try:
            n = int(count)
        except ValueError:
            n = 0
        if not 1 <= n <= recurrence.MAX_OCCURRENCES:
            raise InvalidInput(_("A series is limited to %(n)s occurrences.") % {"n": recurrence.MAX_OCCURRENCES},
                               field="count", code="form")
        return f"FREQ={freq};COUNT={n}"
    try:
        last_day = date.fromisoformat(until.strip())
        end = datetime.combine(last_day + timedelta(days=1), time(0), tzinfo=user_zone(request)).astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: a last day at the end of year 9999
        raise InvalidInput(_("Give the number of occurrences or the last date."), field="count", code="form") from None
    return f"FREQ={freq};UNTIL={(end - timedelta(seconds=1)):%Y%m%dT%H%M%SZ}"


@router.post("/instruments/{instrument_id}/book-series", response_model=None)
def book_series(
    instrument_id: int,
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    date_: Annotated[str, Form(alias="date", max_length=10)] = "",
    start: Annotated[str, Form(max_length=8)] = "",
    end: Annotated[str, Form(max_length=8)] = "",
    duration: Annotated[str, Form(max_length=8)] = "",
    purpose: Annotated[str, Form(max_length=2000)] = "",
    repeat: Annotated[str, Form(max_length=10)] = "",
    count: Annotated[str, Form(max_length=4)] = "",
    until: Annotated[str, Form(max_length=10)] = "",
    keep: Annotated[str, Form(max_length=10)] = "",
    account_id: Annotated[str, Form(max_length=20)] = "",
) -> Response:
    """Book a weekly or daily series from the instrument page; conflicts are shown for the user to decide."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    form = {"date": date_, "start": start, "end": end, "duration": duration, "purpose": purpose,
            "repeat": repeat, "count": count, "until": until, "account_id": account_id}
    try:
        account = billing_pages.form_account_id(account_id)
        starts_at, ends_at = _parse_form(request, date_, start, end, duration)
        rule = _series_rule(request, repeat, count, until)
        minutes = int((ends_at - starts_at).total_seconds() // 60)
        with db.unit_of_work() as session:
            result = recurrence.book_series(
                session, actor, instrument_id, starts_at, minutes, rule, purpose,
                True if keep == "yes" else None, timezone=str(user_zone(request)), account_id=account,
            )
            instrument = catalog.get_instrument(session, instrument_id)
    except (InvalidInput, Conflict) as exc:
        try:
            week = date.fromisoformat(date_)
        except ValueError:
            week = None
        return render_instrument_page(request, db, instrument_id, week=week, form=form, error=_error_message(exc),
                                      error_field=exc.field, status_code=exc.status_code)
    if result.status in ("booked", "partial"):
        booked = sum(1 for o in result.occurrences if o.booking is not None)
        return redirect("/bookings", flash=_("%(name)s: booked %(n)s of %(total)s occurrences.") % {
            "name": localized(instrument, "name"), "n": booked, "total": len(result.occurrences)})
    return render(request, "booking/series_result.html", 409, page_path=f"/instruments/{instrument_id}",
                  instrument=instrument, result=result, form=form, refusal=_refusal)


@router.post("/bookings/series/{series_id}/cancel", response_model=None)
def cancel_series(
    series_id: int,
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Cancel the rest of one of the user's series and go back to the list (Post/Redirect/Get)."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    with db.unit_of_work() as session:
        result = recurrence.cancel_series(session, actor, series_id)
        cancelled, skipped = len(result.cancelled), len(result.skipped)
    if skipped:
        flash = _("Series: %(n)s occurrence(s) cancelled; %(m)s could not be cancelled "
                  "(checked in or past the cancellation deadline).") % {"n": cancelled, "m": skipped}
        return redirect("/bookings", flash=flash, kind="error" if not cancelled else "info")
    return redirect("/bookings", flash=_("Series: %(n)s occurrence(s) cancelled.") % {"n": cancelled})


# --- waitlist ---------------------------------------------------------------------------------------------


@router.post("/instruments/{instrument_id}/waitlist", response_model=None)
def join_waitlist(
    instrument_id: int,
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    date_: Annotated[str, Form(alias="date", max_length=10)] = "",
    start: Annotated[str, Form(max_length=8)] = "",
    end: Annotated[str, Form(max_length=8)] = "",
    duration: Annotated[str, Form(max_length=8)] = "",
    purpose: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    """Join the waitlist for a taken time from the instrument page."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    form = {"date": date_, "start": start, "end": end, "duration": duration, "purpose": purpose}
    try:
        starts_at, ends_at = _parse_form(request, date_, start, end, duration)
        with db.unit_of_work() as session:
            waitlist.join(session, actor, instrument_id, starts_at, ends_at, purpose)
    except (InvalidInput, Conflict) as exc:
        try:
            week = date.fromisoformat(date_)
        except ValueError:
            week = None
        return render_instrument_page(request, db, instrument_id, week=week, form=form, error=_error_message(exc),
                                      error_field=exc.field, status_code=exc.status_code)
    return redirect("/waitlist", flash=_("You are on the waitlist. We will tell you if the time frees up."))


def waitlist_status_label(status: str) -> str:
    return {
        "waiting": _("Waiting"),
        "offered": _("Offered to you"),
        "accepted": _("Accepted"),
        "expired": _("Expired"),
        "withdrawn": _("Withdrawn"),
    }.get(str(status), str(status))


@router.get("/waitlist", response_class=HTMLResponse)
def waitlist_page(request: Request, db: Annotated[Database, Depends(request_db)]) -> HTMLResponse:
    """The user's waitlist entries, with Accept for live offers and Withdraw for open entries."""
    actor = require_actor(request)
    now = utcnow()
    with db.unit_of_work(write=False) as session:
        views = waitlist.list_entries(session, actor)
        # Where an offer's facility charges, the user picks the account to charge when they have several.
        accounts = billing_accounts.accounts_of(session, actor.user_id, usable_on=ledger.local_day(now))
    return render(request, "booking/waitlist.html", views=views, now=now, status_label=waitlist_status_label,
                  accounts=accounts)


@router.post("/waitlist/{entry_id}/accept", response_model=None)
def accept_offer(
    entry_id: int, request: Request, db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "", account_id: Annotated[str, Form(max_length=20)] = "",
) -> Response:
    """Book the offered time, or say clearly why it cannot be booked any more."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    try:
        account = billing_pages.form_account_id(account_id)
        with db.unit_of_work() as session:
            waitlist.accept(session, actor, entry_id, account_id=account)
    except (InvalidInput, Conflict) as exc:
        return redirect("/waitlist", flash=_error_message(exc), kind="error")
    return redirect("/bookings", flash=_("Booked from the waitlist."))


@router.post("/waitlist/{entry_id}/withdraw", response_model=None)
def withdraw_entry(
    entry_id: int, request: Request, db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Leave the waitlist (Post/Redirect/Get)."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    try:
        with db.unit_of_work() as session:
            waitlist.withdraw(session, actor, entry_id)
    except Conflict:
        return redirect("/waitlist", flash=_("This entry is already closed."), kind="error")
    return redirect("/waitlist", flash=_("You left the waitlist."))
