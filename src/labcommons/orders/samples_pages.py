"""Sample pages: custody forms posted from the order page and printable labels."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, Response
from markupsafe import Markup

from labcommons.db import Database
from labcommons.errors import Conflict, DomainError, InvalidInput
from labcommons.http import Id, request_db
from labcommons.i18n import gettext_ as _
from labcommons.orders import labels, samples
from labcommons.orders.models import CustodyEvent, Sample, SampleEvent, SampleStatus, ServiceOrder
from labcommons.pages import N_, check_csrf, env, localtime, redirect, render, require_actor

router = APIRouter(include_in_schema=False)

SAMPLE_STATUS_LABELS: dict[str, str] = {
    SampleStatus.expected: N_("Expected"),
    SampleStatus.received: N_("Received"),
    SampleStatus.stored: N_("Stored"),
    SampleStatus.consumed: N_("Consumed"),
    SampleStatus.returned: N_("Returned"),
    SampleStatus.disposed: N_("Disposed"),
}
# What staff choose in the custody form, and how the trail names each step.
CUSTODY_EVENT_LABELS: dict[str, str] = {
    CustodyEvent.received: N_("Received"),
    CustodyEvent.stored: N_("Stored / moved"),
    CustodyEvent.consumed: N_("Consumed in testing"),
    CustodyEvent.returned: N_("Returned to the customer"),
    CustodyEvent.disposed: N_("Disposed of"),
}


def sample_status_label(status: str) -> str:
    """A sample status in the user's language."""
    return _(SAMPLE_STATUS_LABELS.get(status, status))


def custody_event_label(event: str) -> str:
    """A custody event in the user's language."""
    return _(CUSTODY_EVENT_LABELS.get(event, event))


def custody_choices(sample: Sample, order: ServiceOrder) -> list[tuple[str, str]]:
    """The custody events staff may record for the sample now, as (value, label) for a select."""
    return [(e, custody_event_label(e)) for e in samples.allowed_events(sample, order)]


# The order page (orders/pages.py) includes orders/_samples.html, which asks these; the rules stay in samples.py.
env.globals.update({
    "sample_status_label": sample_status_label,
    "custody_event_label": custody_event_label,
    "custody_choices": custody_choices,
    "samples_may_register": samples.may_register,
    "samples_may_receive": samples.may_receive,
    "sample_received_at": samples.received_at,
})


def sample_error_message(exc: DomainError) -> str:
    """A refused sample step in the user's language."""
    details = exc.details
    if exc.code == "illegal_custody_event":
        allowed = ", ".join(custody_event_label(e) for e in details.get("allowed", [])) or _("none")
        return _("Not possible for this sample (status: %(status)s). Possible now: %(allowed)s.") % {
            "status": sample_status_label(str(details.get("sample_status", ""))), "allowed": allowed}
    return {
        "order_status_forbids": _("The order's current status does not allow this sample step."),
        "location_required": _("Say where the sample is stored."),
        "missing_field": _("Enter the samples' descriptions, one per line, or their number."),
        "count_mismatch": _("The number of samples does not match the descriptions given."),
        "out_of_range": _("Register 1 to %(max)s samples at a time.") % {"max": details.get("max", "")},
        "too_many_samples": _("An order has at most %(max)s samples.") % {"max": details.get("max", "")},
        "too_long": _("The text is too long."),
        "invalid_number": _("Enter a whole number."),
        "unknown_event": _("Choose one of the options."),
    }.get(exc.code, _("Some of what was sent is not valid."))


def _back(order_id: int) -> str:
    return f"/orders/{order_id}#samples"


@router.post("/orders/{order_id}/samples", response_model=None)
def register(
    order_id: Id,
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    descriptions: Annotated[str, Form()] = "",
    count: Annotated[str, Form()] = "",
    receive: Annotated[str, Form()] = "",
    location: Annotated[str, Form()] = "",
    note: Annotated[str, Form()] = "",
) -> Response:
    """Register samples from the order page (one description per line, or a number) and return to it."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    lines = [line.strip() for line in descriptions.splitlines() if line.strip()]
    try:
        number = _whole_number(count)
        with db.unit_of_work() as session:
            created = samples.register_samples(
                session, actor, order_id, descriptions=lines or None, count=None if lines else number,
                receive=bool(receive), location=location, note=note,
            )
            codes = [s.code for s in created]
    except (Conflict, InvalidInput) as exc:
        return redirect(_back(order_id), flash=sample_error_message(exc), kind="error")
    first, last = codes[0], codes[-1]
    span = first if first == last else f"{first} … {last}"
    text = (_("%(n)s sample(s) received: %(codes)s.") if receive else _("%(n)s sample(s) registered: %(codes)s."))
    return redirect(_back(order_id), flash=text % {"n": len(codes), "codes": span})


def _whole_number(raw: str) -> int | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput("Enter a whole number.", field="count", code="invalid_number") from None


@router.post("/samples/{sample_id}/events", response_model=None)
def record_event(
    sample_id: Id,
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    event: Annotated[str, Form()] = "",
    location: Annotated[str, Form()] = "",
    note: Annotated[str, Form()] = "",
) -> Response:
    """Record a custody step of a sample (facility staff) and return to its order."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    try:
        with db.unit_of_work() as session:
            sample, order = samples.record_event(session, actor, sample_id, event, location=location, note=note)
            text = _("%(code)s: %(event)s.") % {"code": sample.code, "event": custody_event_label(event)}
            order_id = order.id
    except (Conflict, InvalidInput) as exc:
        # The refusal came after the sample and the caller's right to it were checked; find the way back.
        with db.unit_of_work(write=False) as session:
            _sample, order, _events = samples.get_sample(session, actor, sample_id)
        return redirect(_back(order.id), flash=sample_error_message(exc), kind="error")
    return redirect(_back(order_id), flash=text)


# --- labels ------------------------------------------------------------------------------------------------


def _label(request: Request, order: ServiceOrder, sample: Sample, events: list[SampleEvent]) -> dict[str, Any]:
    arrived = samples.received_at(events)
    return {
        "sample": sample,
        "order_number": order.number or "",
        "description": labels.short(sample.description),
        "received": localtime(request, arrived, "%Y-%m-%d") if arrived else "",
        # Built by labels.py from the code alone (no user text inside), so safe to inline.
        "qr": Markup(labels.qr_svg(sample.code)),
        "barcode": Markup(labels.barcode_svg(sample.code)),
    }


def _labels_page(request: Request, order: ServiceOrder, rows: list[tuple[Sample, list[SampleEvent]]],
                 title: str) -> HTMLResponse:
    return render(request, "orders/labels.html", order=order, title=title,
                  labels=[_label(request, order, s, events) for s, events in rows])


@router.get("/samples/{sample_id}/label", response_class=HTMLResponse)
def sample_label(sample_id: Id, request: Request, db: Annotated[Database, Depends(request_db)]) -> HTMLResponse:
    """One sample's printable label (62 mm × 29 mm)."""
    actor = require_actor(request)
    with db.unit_of_work(write=False) as session:
        sample, order, events = samples.get_sample(session, actor, sample_id)
    return _labels_page(request, order, [(sample, events)], _("Label %(code)s") % {"code": sample.code})


@router.get("/orders/{order_id}/labels", response_class=HTMLResponse)
def order_labels(order_id: Id, request: Request, db: Annotated[Database, Depends(request_db)]) -> HTMLResponse:
    """The printable labels of all samples of an order, one per printer label."""
    actor = require_actor(request)
    with db.unit_of_work(write=False) as session:
        order, rows = samples.list_samples(session, actor, order_id)
    return _labels_page(request, order, rows, _("Sample labels of %(number)s") % {"number": order.number})


@router.get("/samples/code/{code}", response_model=None)
def scanned(code: str, request: Request, db: Annotated[Database, Depends(request_db)]) -> Response:
    """Where a scanned label leads: the sample on its order's page, for the customer and the facility's staff."""
    actor = require_actor(request)
    with db.unit_of_work(write=False) as session:
        sample, order, _events = samples.find_by_code(session, actor, code)
    return redirect(f"/orders/{order.id}#sample-{sample.id}")
