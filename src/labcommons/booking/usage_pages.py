"""The kiosk page at an instrument (check in, check out), calendar feeds and their management page."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response

from labcommons.booking import calendar, usage
from labcommons.booking.usage_api import router as usage_api
from labcommons.catalog import service as catalog
from labcommons.config import get_settings
from labcommons.db import Database, utcnow
from labcommons.errors import Conflict, DomainError, InvalidInput
from labcommons.http import request_db
from labcommons.i18n import gettext_ as _
from labcommons.pages import check_csrf, csrf_for, env, localized, redirect, render, require_actor, safe_next

router = APIRouter()
router.include_router(usage_api, prefix="/api/v1")
# "My bookings" asks each booking which button it gets.
env.globals["usage_action"] = usage.usage_action

NEW_FEED_COOKIE = "labcommons_new_feed"
CALENDARS = "/account/calendars"


def usage_error_message(exc: DomainError) -> str:
    """Why a check-in or check-out was refused, in the user's language."""
    return {
        "no_current_booking": _("You have no booking of this instrument now."),
        "check_in_too_early": _("Check-in opens 15 minutes before the booking starts."),
        "booking_ended": _("The booking has already ended."),
        "booking_not_confirmed": _("Only a confirmed booking can be checked in."),
        "not_checked_in": _("The booking has not been checked in."),
        "wrong_instrument": _("The booking is for another instrument."),
    }.get(exc.code, _("That did not work; reload the page and try again."))


@router.get("/kiosk/{instrument_id}", include_in_schema=False, response_model=None)
def kiosk(instrument_id: int, request: Request, db: Annotated[Database, Depends(request_db)]) -> Response:
    """The instrument's kiosk: who is booked now and next, with check-in and check-out buttons."""
    actor = require_actor(request)
    now = utcnow()
    with db.unit_of_work(write=False) as session:
        instrument = catalog.get_instrument(session, instrument_id)
        view = usage.now_and_next(session, instrument_id, now=now)
        staff = usage.manages(actor, instrument)
        response = render(
            request, "booking/kiosk.html", instrument=instrument, current=view.current, upcoming=view.upcoming,
            now=now, staff=staff, mine=lambda b: b.user_id == actor.user_id,
        )
    response.headers["Cache-Control"] = "no-store"
    return response


def _usage_post(
    request: Request, db: Database, instrument_id: int, booking_id: int, next_: str, *, check_out: bool
) -> Response:
    actor = require_actor(request)
    back = safe_next(next_, f"/kiosk/{instrument_id}")
    try:
        with db.unit_of_work() as session:
            booking = usage.booking_for_actor(session, actor, booking_id, instrument_id=instrument_id)
            if check_out:
                usage.check_out(session, booking)
            else:
                usage.check_in(session, booking)
            names = {"name": localized(booking.instrument, "name"), "user": booking.user.name}
    except (Conflict, InvalidInput) as exc:
        return redirect(back, flash=usage_error_message(exc), kind="error")
    if check_out:
        return redirect(back, flash=_("Checked out: %(user)s, %(name)s.") % names)
    return redirect(back, flash=_("Checked in: %(user)s, %(name)s.") % names)


@router.post("/kiosk/{instrument_id}/check-in", include_in_schema=False, response_model=None)
def kiosk_check_in(
    instrument_id: int, request: Request, db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "", booking_id: Annotated[int, Form()] = 0,
    next_: Annotated[str, Form(alias="next")] = "",
) -> Response:
    """Check a booking in (the owner, or facility staff for anyone) and go back (Post/Redirect/Get)."""
    require_actor(request)
    check_csrf(request, csrf_token)
    return _usage_post(request, db, instrument_id, booking_id, next_, check_out=False)


@router.post("/kiosk/{instrument_id}/check-out", include_in_schema=False, response_model=None)
def kiosk_check_out(
    instrument_id: int, request: Request, db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "", booking_id: Annotated[int, Form()] = 0,
    next_: Annotated[str, Form(alias="next")] = "",
) -> Response:
    """Check a booking out, completing it, and go back (Post/Redirect/Get)."""
    require_actor(request)
    check_csrf(request, csrf_token)
    return _usage_post(request, db, instrument_id, booking_id, next_, check_out=True)


# --- calendar feeds ----------------------------------------------------------------------------------------


@router.get("/calendar/{token}.ics", include_in_schema=False, response_model=None)
def calendar_feed(token: str, db: Annotated[Database, Depends(request_db)]) -> Response:
    """The iCalendar document of a secret feed address; 404 for an unknown or revoked one."""
    with db.unit_of_work(write=False) as session:
        body = calendar.render_feed(session, calendar.feed_for_token(session, token))
    return Response(body, media_type="text/calendar; charset=utf-8", headers={
        "Cache-Control": "private, max-age=300", "Content-Disposition": 'inline; filename="labcommons.ics"',
    })


def _calendars_page(
    request: Request, db: Database, status_code: int = 200, **context: object
) -> Response:
    actor = require_actor(request)
    with db.unit_of_work(write=False) as session:
        feeds = calendar.list_feeds(session, actor.user_id)
    context.setdefault("error", None)
    context.setdefault("new_url", None)
    context.setdefault("instrument_text", request.query_params.get("instrument", ""))
    response = render(request, "booking/calendars.html", status_code=status_code, page_path=CALENDARS,
                      feeds=feeds, **context)
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get(CALENDARS, include_in_schema=False, response_model=None)
def calendars(request: Request, db: Annotated[Database, Depends(request_db)]) -> Response:
    """The user's calendar feeds; a feed just created shows its address once."""
    require_actor(request)
    carried = request.cookies.get(NEW_FEED_COOKIE)
    new_url = None
    if carried:
        # Shown only to the browser session that created it, like a new API token.
        token, _sep, binding = carried.rpartition(".")
        if token and hmac.compare_digest(binding, csrf_for(request)):
            new_url = calendar.feed_url(token)
    response = _calendars_page(request, db, new_url=new_url)
    if carried:
        response.delete_cookie(NEW_FEED_COOKIE, path=CALENDARS)
    return response


@router.post(CALENDARS, include_in_schema=False, response_model=None)
def create_calendar(
    request: Request, db: Annotated[Database, Depends(request_db)], csrf_token: Annotated[str, Form()] = "",
    kind: Annotated[str, Form(max_length=20)] = "mine", instrument: Annotated[str, Form(max_length=60)] = "",
) -> Response:
    """Create a feed of the user's bookings or of an instrument (Post/Redirect/Get)."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    try:
        with db.unit_of_work() as session:
            instrument_id = calendar.find_instrument(session, instrument).id if kind == "instrument" else None
            _feed, token = calendar.create_feed(session, actor, instrument_id=instrument_id)
    except DomainError as exc:
        if exc.field != "instrument":
            raise
        error = _("Enter the code of an instrument, e.g. CQ-CONF.")
        return _calendars_page(request, db, 422, error=error, instrument_text=instrument)
    response = redirect(CALENDARS, flash=_("Calendar created. Copy its address now: it will not be shown again."))
    response.set_cookie(NEW_FEED_COOKIE, f"{token}.{csrf_for(request)}", max_age=120, path=CALENDARS,
                        httponly=True, samesite="strict", secure=get_settings().cookie_secure)
    return response


@router.post(CALENDARS + "/{feed_id}/revoke", include_in_schema=False, response_model=None)
def revoke_calendar(
    feed_id: int, request: Request, db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Revoke a feed: its address stops working."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    with db.unit_of_work() as session:
        calendar.revoke_feed(session, actor.user_id, feed_id)
    return redirect(CALENDARS, flash=_("Calendar address revoked."))
