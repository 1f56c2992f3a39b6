"""Service pages: a service's own page and the facility's service editor."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from labcommons.actor import Actor
from labcommons.catalog import service
from labcommons.catalog.models import PriceUnit, Service, ServiceKind
from labcommons.catalog.pages import kind_label, price_text, rating_text, turnaround_text
from labcommons.db import Database, utcnow
from labcommons.errors import Conflict, DomainError, InvalidInput
from labcommons.http import Id, page_actor, request_db
from labcommons.i18n import gettext_ as _
from labcommons.identity import roles
from labcommons.identity.roles import Action, FacilityRef
from labcommons.pages import check_csrf, redirect, render, require_actor, user_zone

router = APIRouter(include_in_schema=False)


def may_edit_service(actor: Actor | None, svc: Service) -> bool:
    """Whether the actor may edit the service (its facility must be loaded)."""
    return roles.authorize(actor, Action.edit_facility_catalogue, facility=FacilityRef.of(svc.facility))


def price_unit_label(unit: PriceUnit | str) -> str:
    return {"sample": _("Per sample"), "project": _("Per project"), "hour": _("Per hour")}.get(str(unit), str(unit))


def field_label(name: str | None) -> str:
    """A form field's name in the current language, for error messages."""
    return {
        "code": _("Code"), "kind": _("Type"), "name_zh": _("Name (Chinese)"), "name_en": _("Name (English)"),
        "description_zh": _("Description (Chinese)"), "description_en": _("Description (English)"),
        "sample_requirements_zh": _("Sample requirements (Chinese)"),
        "sample_requirements_en": _("Sample requirements (English)"), "category_code": _("Category"),
        "turnaround_days": _("Turnaround (days)"), "list_price_fen": _("Price (yuan)"), "price": _("Price (yuan)"),
        "price_unit": _("Price unit"), "accreditations": _("Accreditations"),
        "instrument_ids": _("Instruments used"), "facility": _("Facility"),
    }.get(name or "", name or "")


def service_error_message(exc: DomainError) -> str:
    """A refused service edit in the user's language, naming the field."""
    text = {
        "invalid_code": _("A code has 1–40 letters, digits, dots, dashes or underscores."),
        "duplicate_code": _("Another service already has this code."),
        "missing_field": _("This field is required."),
        "invalid_choice": _("Choose one of the options."),
        "invalid_price": _("Enter a price from 0 to 20,000,000 yuan, or leave it empty for a quote on request."),
        "invalid_amount": _("Enter an amount in yuan, such as 1800 or 1800.50."),
        "invalid_number": _("Enter a whole number."),
        "out_of_range": _("Enter a whole number from 0 to 3650."),
        "too_long": _("The text is too long."),
        "unknown_category": _("Unknown category."),
        "invalid_scheme": _("Write each accreditation as a line: scheme, certificate number, valid until "
                            "(e.g. CMA 2023000123 2027-12-31)."),
        "invalid_date": _("Write dates as YYYY-MM-DD."),
        "duplicate_scheme": _("Each accreditation scheme may appear once."),
        "unknown_instrument": _("Unknown instrument."),
        "instrument_of_another_facility": _("A service may only use its own facility's instruments."),
        "not_found": _("Unknown facility."),
        "forbidden": _("You may not edit this facility's services."),
    }.get(exc.code, _("Some of what was sent is not valid."))
    label = field_label(exc.field)
    return f"{label}: {text}" if label else text


def _kind_choices() -> list[tuple[str, str]]:
    return [(k.value, kind_label(k)) for k in ServiceKind]


def _unit_choices() -> list[tuple[str, str]]:
    return [(u.value, price_unit_label(u)) for u in PriceUnit]


# --- the service page ----------------------------------------------------------------------------------------


@router.get("/services/{service_id}", response_class=HTMLResponse)
def service_page(service_id: Id, request: Request, db: Annotated[Database, Depends(request_db)]) -> HTMLResponse:
    """What a customer needs to decide: description, samples, price, turnaround, accreditations, instruments,
    ratings, and the button to order it."""
    with db.unit_of_work(write=False) as session:
        detail = service.get_service(session, service_id)
        comments = service.latest_ratings(session, service_id)
    return render(
        request, "catalog/service.html", detail=detail, svc=detail.service, comments=comments,
        may_edit=may_edit_service(page_actor(request), detail.service), kind_label=kind_label,
        price_text=price_text, turnaround_text=turnaround_text, rating_text=rating_text,
        today=utcnow().astimezone(user_zone(request)).date(),
    )


# --- the facility's service editor ---------------------------------------------------------------------------

_TEXT_FIELDS = ("code", "kind", "name_zh", "name_en", "description_zh", "description_en", "sample_requirements_zh",
                "sample_requirements_en", "category_code", "turnaround_days", "price", "price_unit",
                "accreditations", "facility")


async def _posted(request: Request) -> dict[str, Any]:
    """The posted form: text fields, the is_active box and the chosen instruments."""
    form = await request.form()
    data: dict[str, Any] = {name: str(form.get(name) or "") for name in (*_TEXT_FIELDS, "csrf_token")}
    data["is_active"] = form.get("is_active") == "on"
    data["instrument_ids"] = [str(v) for v in form.getlist("instrument_ids")]
    return data


def _empty_form() -> dict[str, Any]:
    form: dict[str, Any] = {name: "" for name in _TEXT_FIELDS}
    form.update(kind=ServiceKind.testing.value, price_unit=PriceUnit.sample.value, is_active=True, instrument_ids=[])
    return form


def _form_of(svc: Service, detail: service.ServiceDetail) -> dict[str, Any]:
    price = svc.list_price_fen
    return {
        "code": svc.code, "kind": svc.kind.value, "name_zh": svc.name_zh, "name_en": svc.name_en,
        "description_zh": svc.description_zh, "description_en": svc.description_en,
        "sample_requirements_zh": svc.sample_requirements_zh, "sample_requirements_en": svc.sample_requirements_en,
        "category_code": svc.category_code,
        "turnaround_days": "" if svc.turnaround_days is None else str(svc.turnaround_days),
        "price": "" if price is None else f"{price // 100}.{price % 100:02d}",
        "price_unit": svc.price_unit.value, "is_active": svc.is_active,
        "accreditations": service.accreditation_lines(detail.accreditations),
        "instrument_ids": [str(i.id) for i in detail.instruments], "facility": svc.facility.code,
    }


def _fields_of(form: dict[str, Any], *, creating: bool) -> dict[str, Any]:
    """The service fields of a posted form; InvalidInput naming the field for what cannot be read."""
    days_text = form["turnaround_days"].strip()
    # \d and a bounded length: what int() takes ("²" passes str.isdigit but not int(), nor do 5000 digits).
    if days_text and not re.fullmatch(r"\d{1,9}", days_text):
        raise InvalidInput("turnaround_days is a whole number.", field="turnaround_days", code="invalid_number")
    ids: list[int] = []
    for raw in form["instrument_ids"]:
        if not re.fullmatch(r"\d{1,10}", raw):
            raise InvalidInput("Unknown instrument.", field="instrument_ids", code="unknown_instrument")
        ids.append(int(raw))
    fields: dict[str, Any] = {
        name: form[name] for name in ("name_zh", "name_en", "description_zh", "description_en",
                                      "sample_requirements_zh", "sample_requirements_en")
    }
    fields.update(
        kind=form["kind"], category_code=form["category_code"], price_unit=form["price_unit"],
        turnaround_days=int(days_text) if days_text else None,
        list_price_fen=service.parse_yuan(form["price"], "price"),
        accreditations=service.parse_accreditation_lines(form["accreditations"]),
    )
    if not creating:
        fields.update(is_active=form["is_active"], instrument_ids=ids)
    return fields


def _list_page(request: Request, db: Database, actor: Actor, status_code: int = 200, *,
               form: dict[str, Any] | None = None, error: str | None = None,
               error_field: str | None = None) -> HTMLResponse:
    with db.unit_of_work(write=False) as session:
        roles.require_some(actor, Action.edit_facility_catalogue)
        facilities = service.editable_facilities(session, actor)
        services = service.list_services(session, facility_ids=[f.id for f in facilities])
        categories = service.list_categories(session)
    return render(
        request, "catalog/manage_services.html", status_code, page_path="/manage/services", facilities=facilities,
        services=services, categories=categories, form=form or _empty_form(), error=error, error_field=error_field,
        kind_choices=_kind_choices(), unit_choices=_unit_choices(), kind_label=kind_label, price_text=price_text,
    )


@router.get("/manage/services", response_class=HTMLResponse)
def manage_services(request: Request, db: Annotated[Database, Depends(request_db)]) -> HTMLResponse:
    """The services of the facilities the user manages, and a form to add one."""
    return _list_page(request, db, require_actor(request))


@router.post("/manage/services", response_model=None)
def create_service(
    request: Request, db: Annotated[Database, Depends(request_db)], form: Annotated[dict[str, Any], Depends(_posted)]
) -> Response:
    """Add a service (Post/Redirect/Get); the form again with the problem named."""
    actor = require_actor(request)
    check_csrf(request, form["csrf_token"])
    roles.require_some(actor, Action.edit_facility_catalogue)
    try:
        fields = _fields_of(form, creating=True)
        with db.unit_of_work() as session:
            facility = service.facility_for_editing(session, actor, form["facility"])
            created = service.create_service(session, actor, facility.id, code=form["code"], **fields)
            service_id = created.id
    except (InvalidInput, Conflict) as exc:
        return _list_page(request, db, actor, exc.status_code, form=form, error=service_error_message(exc),
                          error_field=exc.field)
    return redirect(f"/manage/services/{service_id}", flash=_("The service is created."))


def _edit_page(request: Request, db: Database, actor: Actor, service_id: int, status_code: int = 200, *,
               form: dict[str, Any] | None = None, error: str | None = None,
               error_field: str | None = None) -> HTMLResponse:
    with db.unit_of_work(write=False) as session:
        service.service_for_editing(session, actor, service_id)
        detail = service.get_service(session, service_id)
        instruments = service.facility_instruments(session, detail.service.facility_id)
        categories = service.list_categories(session)
    return render(
        request, "catalog/manage_service.html", status_code, page_path=f"/manage/services/{service_id}",
        svc=detail.service, detail=detail, instruments=instruments, categories=categories,
        form=form or _form_of(detail.service, detail), error=error, error_field=error_field,
        kind_choices=_kind_choices(), unit_choices=_unit_choices(),
    )


@router.get("/manage/services/{service_id}", response_class=HTMLResponse)
def edit_service(service_id: Id, request: Request, db: Annotated[Database, Depends(request_db)]) -> HTMLResponse:
    """The edit form of one service, with its accreditations and the instruments it uses."""
    return _edit_page(request, db, require_actor(request), service_id)


@router.post("/manage/services/{service_id}", response_model=None)
def save_service(
    service_id: Id, request: Request, db: Annotated[Database, Depends(request_db)],
    form: Annotated[dict[str, Any], Depends(_posted)],
) -> Response:
    """Save a service (Post/Redirect/Get); the form again with the problem named."""
    actor = require_actor(request)
    check_csrf(request, form["csrf_token"])
    roles.require_some(actor, Action.edit_facility_catalogue)
    try:
        fields = _fields_of(form, creating=False)
        with db.unit_of_work() as session:
            service.update_service(session, actor, service_id, **fields)
    except InvalidInput as exc:
        return _edit_page(request, db, actor, service_id, 422, form=form, error=service_error_message(exc),
                          error_field=exc.field)
    return redirect(f"/manage/services/{service_id}", flash=_("The service is saved."))
