"""Facility manager pages: the approval queue, an instrument's rules editor and its qualifications."""

from __future__ import annotations

from datetime import date, time, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, Response

from labcommons.actor import Actor
from labcommons.booking import approvals, policy, qualifications
from labcommons.booking.models import Booking, BookingPolicy, QualificationLevel
from labcommons.catalog.models import Instrument, OpenTo
from labcommons.db import Database, utcnow
from labcommons.errors import Conflict, DomainError, InvalidInput
from labcommons.http import request_db
from labcommons.i18n import gettext_ as _
from labcommons.identity import roles
from labcommons.identity.roles import Action
from labcommons.pages import N_, check_csrf, env, localized, redirect, render, require_actor, to_utc, user_zone

router = APIRouter(include_in_schema=False)


def _manages_bookings(actor: Actor | None) -> bool:
    return actor is not None and any(
        g.role in roles.PERMISSIONS[Action.manage_facility_bookings].roles for g in actor.grants
    )


def _may_for_instrument(actor: Actor | None, action: str, instrument: Instrument) -> bool:
    return roles.authorize(actor, Action(action), facility=policy.facility_ref(instrument))


def _hours_text(raw: str | None) -> str:
    """Stored weekly hours in words: "Monday 09:00–18:00; Tuesday …"."""
    hours = policy.parse_hours(raw) or {}
    return "; ".join(
        f"{_(WEEKDAY_LABELS[day])} " + ", ".join(f"{a}–{b}" for a, b in hours[day])
        for day in policy.WEEKDAYS if hours.get(day)
    )


# The layout links the approval queue, and the instrument page its rules editor, for those who run a facility.
env.globals["manages_bookings"] = _manages_bookings
env.globals["may_for_instrument"] = _may_for_instrument
env.globals["hours_text"] = _hours_text

WEEKDAY_LABELS = {
    "mon": N_("Monday"), "tue": N_("Tuesday"), "wed": N_("Wednesday"), "thu": N_("Thursday"),
    "fri": N_("Friday"), "sat": N_("Saturday"), "sun": N_("Sunday"),
}


def rule_error_message(exc: DomainError) -> str:
    """A rules-editor or decision problem in the user's language."""
    details = exc.details
    return {
        "invalid_number": _("Enter a whole number."),
        "out_of_range": _("Enter a number from %(min)s to %(max)s.") % {"min": details.get("min", ""),
                                                                         "max": details.get("max", "")},
        "invalid_hours": _("Write hours as 09:00-12:00, 13:00-18:00."),
        "invalid_time": _("Times of day are written HH:MM, from 00:00 to 24:00."),
        "start_not_before_end": _("Each period must start before it ends."),
        "overlapping_periods": _("The periods of one day must not overlap."),
        "invalid_weekday": _("Unknown weekday."),
        "invalid_timezone": _("Unknown time zone; use a name such as Asia/Shanghai."),
        "invalid_choice": _("Choose one of the options."),
        "min_above_max": _("The shortest booking must not be longer than the longest."),
        "not_on_slot_grid": _("Booking lengths must be multiples of the slot length."),
        "missing_reason": _("Give the reason for declining; the user is told."),
        "too_long": _("The text is too long."),
        "booking_not_pending": _("This booking has already been decided."),
        "expires_in_past": _("The expiry date must be in the future."),
        "already_revoked": _("This qualification is already revoked."),
        "one_target": _("Give an instrument or a category."),
    }.get(exc.code, _("Some of what was sent is not valid."))


def booking_rule_message(exc: DomainError) -> str | None:
    """A booking refused by one of the instrument's rules (booking.policy), in the user's language; else None."""
    details = exc.details
    return {
        "qualification_required": _("This instrument needs training: you hold no valid qualification for it."),
        "beyond_horizon": _("This instrument can be booked at most %(n)s days ahead.")
        % {"n": details.get("horizon_days", "")},
        "too_short_notice": _("This instrument must be booked at least %(n)s minutes ahead.")
        % {"n": details.get("min_notice_minutes", "")},
        "weekly_quota_exceeded": _("You may book at most %(n)s hours of this instrument per week.")
        % {"n": details.get("max_hours_per_week", "")},
        "buffer_violated": _("Leave %(n)s minutes free between bookings of this instrument.")
        % {"n": details.get("buffer_minutes", "")},
        "outside_opening_hours": _("The booking must lie within the instrument's opening hours."),
        "outside_assisted_hours": _("With an assisted qualification you may book only in staff-assisted hours."),
        "cancellation_deadline_passed": _("The cancellation deadline has passed; ask the facility to cancel."),
    }.get(exc.code)


def _when(request: Request, booking: Booking) -> str:
    zone = user_zone(request)
    start, end = booking.starts_at.astimezone(zone), booking.ends_at.astimezone(zone)
    end_fmt = "%H:%M" if end.date() == start.date() else "%Y-%m-%d %H:%M"
    return f"{start:%Y-%m-%d %H:%M}–{end.strftime(end_fmt)}"


# --- the approval queue ------------------------------------------------------------------------------------


def _approvals_page(request: Request, db: Database, actor: Actor, status_code: int = 200,
                    **context: Any) -> HTMLResponse:
    with db.unit_of_work(write=False) as session:
        pending = approvals.pending_for(session, actor)
    context.setdefault("error", None)
    context.setdefault("error_booking", None)
    context.setdefault("reason", "")
    return render(request, "booking/approvals.html", status_code, page_path="/manage/approvals", pending=pending,
                  when=lambda b: _when(request, b), **context)


@router.get("/manage/approvals", response_class=HTMLResponse)
def approvals_page(request: Request, db: Annotated[Database, Depends(request_db)]) -> HTMLResponse:
    """Pending bookings of the facilities the user runs, oldest request first, with approve and decline forms."""
    return _approvals_page(request, db, require_actor(request))


@router.post("/manage/approvals/{booking_id}/approve", response_model=None)
def approve(
    booking_id: int, request: Request, db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Confirm a pending booking and return to the queue."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    try:
        with db.unit_of_work() as session:
            booking = approvals.approve(session, actor, booking_id)
            text = _("Approved: %(name)s, %(when)s, %(user)s.") % {
                "name": localized(booking.instrument, "name"), "when": _when(request, booking),
                "user": booking.user.name}
    except Conflict as exc:
        return redirect("/manage/approvals", flash=rule_error_message(exc), kind="error")
    return redirect("/manage/approvals", flash=text)


@router.post("/manage/approvals/{booking_id}/decline", response_model=None)
def decline(
    booking_id: int, request: Request, db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "", reason: Annotated[str, Form()] = "",
) -> Response:
    """Decline a pending booking with a reason; the queue again with the problem if the reason is missing."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    try:
        with db.unit_of_work() as session:
            booking = approvals.decline(session, actor, booking_id, reason)
            text = _("Declined: %(name)s, %(when)s, %(user)s.") % {
                "name": localized(booking.instrument, "name"), "when": _when(request, booking),
                "user": booking.user.name}
    except InvalidInput as exc:
        return _approvals_page(request, db, actor, 422, error=rule_error_message(exc), error_booking=booking_id,
                               reason=reason)
    except Conflict as exc:
        return redirect("/manage/approvals", flash=rule_error_message(exc), kind="error")
    return redirect("/manage/approvals", flash=text)


# --- the rules editor ----------------------------------------------------------------------------------------

_INT_FORM_FIELDS = ("slot_minutes", "min_booking_minutes", "max_booking_minutes", "horizon_days",
                    "min_notice_minutes", "max_hours_per_week", "cancellation_deadline_hours", "buffer_minutes",
                    "no_show_grace_minutes", "waitlist_offer_minutes")


def _rules_form(instrument: Instrument, p: BookingPolicy) -> dict[str, Any]:
    owners = {name: instrument if name in policy.INSTRUMENT_FIELDS else p for name in _INT_FORM_FIELDS}
    form: dict[str, Any] = {}
    for name, owner in owners.items():
        value = getattr(owner, name)
        form[name] = "" if value is None else str(value)
    form.update(open_to=instrument.open_to.value, timezone=p.timezone, requires_approval=p.requires_approval,
                requires_qualification=p.requires_qualification,
                opening=policy.hours_to_text(p.opening_hours), assisted=policy.hours_to_text(p.assisted_hours))
    return form


def _rules_page(request: Request, instrument: Instrument, form: dict[str, Any], status_code: int = 200,
                error: str | None = None, error_field: str | None = None) -> HTMLResponse:
    return render(
        request, "booking/rules.html", status_code, page_path=f"/manage/instruments/{instrument.id}/rules",
        instrument=instrument, form=form, error=error, error_field=error_field, weekdays=policy.WEEKDAYS,
        weekday_label=lambda d: _(WEEKDAY_LABELS[d]),
        open_to_choices=[(o.value, _open_to_label(o)) for o in OpenTo],
    )


def _open_to_label(value: OpenTo) -> str:
    return {"everyone": _("Everyone, in both regions"), "region": _("Users in the instrument's own region"),
            "institution": _("Users of the instrument's own institution")}[value.value]


@router.get("/manage/instruments/{instrument_id}/rules", response_class=HTMLResponse)
def rules_page(instrument_id: int, request: Request, db: Annotated[Database, Depends(request_db)]) -> HTMLResponse:
    """The rules editor of one instrument."""
    actor = require_actor(request)
    with db.unit_of_work(write=False) as session:
        instrument, p = policy.rules_for_editing(session, actor, instrument_id)
    return _rules_page(request, instrument, _rules_form(instrument, p))


async def _form_text(request: Request) -> dict[str, str]:
    """Every field of a posted form as text (the rules form has too many fields to list one by one)."""
    return {key: str(value) for key, value in (await request.form()).items()}


@router.post("/manage/instruments/{instrument_id}/rules", response_model=None)
def save_rules(
    instrument_id: int, request: Request, db: Annotated[Database, Depends(request_db)],
    text: Annotated[dict[str, str], Depends(_form_text)],
) -> Response:
    """Save the rules; the form again with the problem named, or back to it with a flash."""
    actor = require_actor(request)
    check_csrf(request, text.get("csrf_token", ""))
    form: dict[str, Any] = {name: text.get(name, "").strip() for name in _INT_FORM_FIELDS}
    form.update(open_to=text.get("open_to", ""), timezone=text.get("timezone", "").strip(),
                requires_approval=text.get("requires_approval") == "on",
                requires_qualification=text.get("requires_qualification") == "on",
                opening={d: text.get(f"opening_{d}", "") for d in policy.WEEKDAYS},
                assisted={d: text.get(f"assisted_{d}", "") for d in policy.WEEKDAYS})
    with db.unit_of_work(write=False) as session:
        instrument, _p = policy.rules_for_editing(session, actor, instrument_id)
    try:
        fields: dict[str, Any] = {name: form[name] for name in _INT_FORM_FIELDS}
        fields.update(
            open_to=form["open_to"], timezone=form["timezone"], requires_approval=form["requires_approval"],
            requires_qualification=form["requires_qualification"],
            opening_hours=policy.hours_from_text(form["opening"], "opening_hours"),
            assisted_hours=policy.hours_from_text(form["assisted"], "assisted_hours"),
        )
        with db.unit_of_work() as session:
            policy.save_policy(session, actor, instrument_id, **fields)
    except InvalidInput as exc:
        return _rules_page(request, instrument, form, 422, error=rule_error_message(exc), error_field=exc.field)
    return redirect(f"/manage/instruments/{instrument_id}/rules", flash=_("The booking rules are saved."))


# --- qualifications ------------------------------------------------------------------------------------------


def _qualifications_page(request: Request, db: Database, actor: Actor, instrument_id: int, status_code: int = 200,
                         **context: Any) -> HTMLResponse:
    with db.unit_of_work(write=False) as session:
        rows = qualifications.list_for_instrument(session, actor, instrument_id)
        instrument = session.get(Instrument, instrument_id)
    context.setdefault("error", None)
    context.setdefault("form", {"email": "", "level": "independent", "expires": "", "note": "", "category": ""})
    now = utcnow()
    # Category qualifications reach every institution's instruments: only platform administrators manage them.
    manages_categories = roles.is_platform_admin(actor)
    return render(
        request, "booking/qualifications.html", status_code,
        page_path=f"/manage/instruments/{instrument_id}/qualifications", instrument=instrument, rows=rows,
        now=now, level_label=_level_label, manages_categories=manages_categories,
        category_choices=policy.category_codes(instrument.category_code) if instrument else [],
        category_rows=[r for r in rows if r.qualification.category_code is not None and r.live(now)]
        if manages_categories else [],
        **context,
    )


def _level_label(level: QualificationLevel | str) -> str:
    return {"assisted": _("Assisted (staff present)"), "independent": _("Independent")}.get(str(level), str(level))


@router.get("/manage/instruments/{instrument_id}/qualifications", response_class=HTMLResponse)
def qualifications_page(
    instrument_id: int, request: Request, db: Annotated[Database, Depends(request_db)]
) -> HTMLResponse:
    """Who is trained on an instrument, a form to grant a qualification, and revoke buttons."""
    return _qualifications_page(request, db, require_actor(request), instrument_id)


@router.post("/manage/instruments/{instrument_id}/qualifications", response_model=None)
def grant_qualification(
    instrument_id: int, request: Request, db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "", email: Annotated[str, Form()] = "",
    level: Annotated[str, Form()] = "independent", expires: Annotated[str, Form()] = "",
    note: Annotated[str, Form()] = "", category: Annotated[str, Form(max_length=100)] = "",
) -> Response:
    """Grant a qualification on this instrument, or (platform administrators) on its category or a parent
    category (Post/Redirect/Get)."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    form = {"email": email, "level": level, "expires": expires, "note": note, "category": category}
    category_code = category.strip() or None
    try:
        if category_code is not None:
            with db.unit_of_work(write=False) as session:
                instrument = session.get(Instrument, instrument_id)
                choices = policy.category_codes(instrument.category_code) if instrument else []
            if category_code not in choices:
                raise InvalidInput("not a category of the instrument", field="category", code="invalid_choice")
        expires_at = None
        if expires.strip():
            try:
                # Valid through the chosen day in the user's zone.
                expires_at = to_utc(request, date.fromisoformat(expires.strip()) + timedelta(days=1), time(0))
            except (ValueError, OverflowError):  # OverflowError: the day after 9999-12-31
                raise InvalidInput("bad date", field="expires_at", code="invalid_date") from None
        with db.unit_of_work() as session:
            if category_code is not None:
                qualifications.grant(session, actor, email, category_code=category_code, level=level,
                                     expires_at=expires_at, note=note)
            else:
                qualifications.grant(session, actor, email, instrument_id=instrument_id, level=level,
                                     expires_at=expires_at, note=note)
    except DomainError as exc:
        if exc.status_code not in (404, 409, 422) or exc.field == "instrument_id":
            raise
        message = _("No user has this e-mail address.") if exc.field == "user_email" else (
            _("Enter the date as YYYY-MM-DD.") if exc.code == "invalid_date" else rule_error_message(exc))
        return _qualifications_page(request, db, actor, instrument_id, 422, error=message, form=form)
    if category_code is not None:
        return redirect(f"/manage/instruments/{instrument_id}/qualifications",
                        flash=_("Qualification for category %(category)s granted to %(email)s.") % {
                            "category": category_code, "email": email.strip()})
    return redirect(f"/manage/instruments/{instrument_id}/qualifications",
                    flash=_("Qualification granted to %(email)s.") % {"email": email.strip()})


@router.post("/manage/qualifications/{qualification_id}/revoke", response_model=None)
def revoke_qualification(
    qualification_id: int, request: Request, db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "", instrument_id: Annotated[str, Form()] = "",
) -> Response:
    """Revoke a qualification and return to the instrument's qualifications."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    back = "/manage/approvals"
    if instrument_id.isdigit():
        back = f"/manage/instruments/{int(instrument_id)}/qualifications"
    try:
        with db.unit_of_work() as session:
            qualifications.revoke(session, actor, qualification_id)
    except Conflict as exc:
        return redirect(back, flash=rule_error_message(exc), kind="error")
    return redirect(back, flash=_("Qualification revoked."))
