"""Talent card pages: my cards with what each gives in each region and the submit form (/account/talent-cards);
the issuing region's queue and entitlement editor (/manage/talent-cards)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select

from labcommons.actor import Actor
from labcommons.billing import talent
from labcommons.billing.models import CardStatus, EntitlementKind, TalentEntitlement
from labcommons.catalog.models import Region
from labcommons.db import Database
from labcommons.errors import Conflict, DomainError, InvalidInput, NotFound
from labcommons.http import Id, request_db
from labcommons.i18n import gettext_ as _
from labcommons.identity import roles
from labcommons.identity.roles import Action
from labcommons.orders.pages import parse_day, parse_int
from labcommons.pages import N_, check_csrf, env, redirect, render, require_actor

router = APIRouter(include_in_schema=False)
Db = Annotated[Database, Depends(request_db)]

CARD_STATUS_LABELS = {CardStatus.pending: N_("Awaiting verification"), CardStatus.verified: N_("Verified"),
                      CardStatus.rejected: N_("Rejected"), CardStatus.revoked: N_("Revoked by the issuing region")}
_CARD_BADGES = {CardStatus.pending: "booking-pending", CardStatus.verified: "booking-confirmed",
                CardStatus.rejected: "booking-cancelled", CardStatus.revoked: "booking-cancelled"}
KIND_LABELS = {EntitlementKind.priority_window: N_("Priority booking window"),
               EntitlementKind.fee_discount: N_("Fee discount"),
               EntitlementKind.fast_track: N_("Fast-track consultation")}


def manages_talent_cards(actor: Actor | None) -> bool:
    """Whether the account page links the authority's card queue."""
    return actor is not None and any(g.role in roles.PERMISSIONS[Action.issue_vouchers].roles for g in actor.grants)


def entitlement_text(row: TalentEntitlement) -> str:
    """What one entitlement gives, in the page's language (+30 days of booking horizon, 10% off fees)."""
    if row.kind == EntitlementKind.priority_window:
        return _("Book up to %(days)s more days ahead") % {"days": row.value}
    if row.kind == EntitlementKind.fee_discount:
        whole, rest = divmod(row.value, 100)
        percent = f"{whole}.{rest:02d}".rstrip("0").rstrip(".")
        return _("%(percent)s%% off fees") % {"percent": percent}
    return _("Consultation orders handled first")


env.globals["manages_talent_cards"] = manages_talent_cards


def error_message(exc: DomainError) -> str:
    """A card problem in the user's language."""
    texts = {
        "card_number_taken": _("This card number is already registered."),
        "invalid_card_number": _("A card number is 1 to 40 letters, digits and hyphens."),
        "unknown_scheme": _("Choose the card's scheme."),
        "card_expired": _("This card has expired."),
        "missing_field": _("Fill in the required fields."),
        "too_long": _("The text is too long."),
        "invalid_date": _("Enter the date as YYYY-MM-DD."),
        "holder_name_mismatch": _("The name on the card differs from the account's name; tick the box to "
                                  "confirm they are the same person."),
        "card_not_pending": _("This card has been decided already; here is its current state."),
        "card_not_verified": _("Only a verified card can be revoked."),
        "card_changed": _("Someone else decided on this card at the same moment; here is its current state."),
        "unknown_region": _("Choose a region."),
        "invalid_choice": _("Choose an entitlement."),
        "out_of_range": _("Enter a number from %(min)s to %(max)s.") % {"min": exc.details.get("min", ""),
                                                                       "max": exc.details.get("max", "")},
        "invalid_number": _("Enter a whole number."),
        "not_found": _("There is nothing at this address, or you may not see it."),
    }
    return texts.get(exc.code, _("Some of what was sent is not valid."))


# --- my cards -------------------------------------------------------------------------------------------------


def _my_page(request: Request, db: Database, actor: Actor, status_code: int = 200, **context: Any) -> HTMLResponse:
    with db.unit_of_work(write=False) as session:
        cards = talent.my_cards(session, actor)
        schemes = talent.list_schemes(session)
        by_scheme = talent.entitlements_by_scheme(session)
        regions = {r.code: r for r in session.scalars(select(Region))}
    context.setdefault("error", None)
    context.setdefault("error_field", None)
    context.setdefault("form", {"scheme_code": "", "card_number": "", "holder_name": actor.name, "valid_until": ""})
    names = {s.code: s for s in schemes}
    return render(request, "billing/talent_cards.html", status_code, page_path="/account/talent-cards",
                  cards=cards, schemes=schemes, scheme_of=names, entitlements=by_scheme, regions=regions,
                  card_status_label=lambda s: _(CARD_STATUS_LABELS[CardStatus(s)]),
                  card_badge=lambda s: _CARD_BADGES[CardStatus(s)], entitlement_text=entitlement_text,
                  kind_label=lambda k: _(KIND_LABELS[EntitlementKind(k)]), today=talent.today(), **context)


@router.get("/account/talent-cards", response_class=HTMLResponse)
def my_cards(request: Request, db: Db) -> HTMLResponse:
    """My talent cards, what each gives in each region, and the form to submit one."""
    return _my_page(request, db, require_actor(request))


@router.post("/account/talent-cards", response_model=None)
def submit_card(
    request: Request, db: Db, csrf_token: Annotated[str, Form()] = "",
    scheme_code: Annotated[str, Form(max_length=32)] = "", card_number: Annotated[str, Form(max_length=100)] = "",
    holder_name: Annotated[str, Form(max_length=400)] = "", valid_until: Annotated[str, Form(max_length=40)] = "",
) -> Response:
    """Submit a card for verification; the page again with the problem named, else back with a flash."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    form = {"scheme_code": scheme_code, "card_number": card_number, "holder_name": holder_name,
            "valid_until": valid_until}
    try:
        if not scheme_code.strip():
            raise InvalidInput("Choose the scheme.", field="scheme_code", code="unknown_scheme")
        day = parse_day(valid_until, "valid_until")
        with db.unit_of_work() as session:
            card = talent.submit_card(session, actor, scheme_code, card_number, holder_name, day,
                                      today=talent.today())
            number = card.card_number
    except (InvalidInput, Conflict) as exc:
        return _my_page(request, db, actor, 409 if isinstance(exc, Conflict) else 422, error=error_message(exc),
                        error_field=exc.field, form=form)
    return redirect("/account/talent-cards",
                    flash=_("Card %(number)s submitted; the issuing region will verify it.") % {"number": number})


# --- the authority's queue and entitlement editor --------------------------------------------------------------

_STATUS_FILTERS = ("pending", "verified", "all")


def _manage_page(request: Request, db: Database, actor: Actor, show: str = "pending", status_code: int = 200,
                 **context: Any) -> HTMLResponse:
    status = None if show == "all" else CardStatus(show)
    with db.unit_of_work(write=False) as session:
        rows = talent.authority_cards(session, actor, status)
        schemes = talent.list_schemes(session)
        by_scheme = talent.entitlements_by_scheme(session)
        regions = [code for code in session.scalars(select(Region.code).order_by(Region.code))
                   if talent.may_set_entitlements(actor, code)]
    context.setdefault("error", None)
    context.setdefault("error_form", None)
    context.setdefault("error_field", None)
    context.setdefault("ent_form", {"scheme_code": "", "provider_region_code": "", "kind": "", "value": ""})
    return render(request, "billing/talent_manage.html", status_code, page_path="/manage/talent-cards",
                  rows=rows, schemes=schemes, entitlements=by_scheme, regions=regions, show=show,
                  filters=_STATUS_FILTERS, kinds=list(EntitlementKind),
                  card_status_label=lambda s: _(CARD_STATUS_LABELS[CardStatus(s)]),
                  card_badge=lambda s: _CARD_BADGES[CardStatus(s)], entitlement_text=entitlement_text,
                  kind_label=lambda k: _(KIND_LABELS[EntitlementKind(k)]), **context)


def _authority(request: Request) -> Actor:
    actor = require_actor(request)
    roles.require_some(actor, Action.issue_vouchers)
    return actor


@router.get("/manage/talent-cards", response_class=HTMLResponse)
def manage_cards(request: Request, db: Db, show: Annotated[str, Query(max_length=20)] = "pending") -> HTMLResponse:
    """The cards of the schemes of the authority's regions (pending first), and their entitlements."""
    actor = _authority(request)
    if show not in _STATUS_FILTERS:
        show = "pending"
    return _manage_page(request, db, actor, show)


def _decided(exc: DomainError) -> Response:
    return redirect("/manage/talent-cards", flash=error_message(exc), kind="error")


@router.post("/manage/talent-cards/{card_id}/verify", response_model=None)
def verify_card(card_id: Id, request: Request, db: Db, csrf_token: Annotated[str, Form()] = "",
                confirm_holder: Annotated[str, Form(max_length=10)] = "",
                note: Annotated[str, Form(max_length=4000)] = "") -> Response:
    """Verify a pending card (confirming a differing holder name explicitly)."""
    actor = _authority(request)
    check_csrf(request, csrf_token)
    try:
        with db.unit_of_work() as session:
            card = talent.verify_card(session, actor, card_id, confirm_holder=bool(confirm_holder), note=note,
                                      today=talent.today())
            number = card.card_number
    except InvalidInput as exc:
        return _manage_page(request, db, actor, status_code=422, error=error_message(exc),
                            error_form=f"card-{card_id}", error_field=exc.field)
    except (Conflict, NotFound) as exc:
        return _decided(exc)
    return redirect("/manage/talent-cards", flash=_("Card %(number)s verified.") % {"number": number})


def _close(request: Request, db: Database, card_id: int, csrf_token: str, note: str, verified: bool) -> Response:
    actor = _authority(request)
    check_csrf(request, csrf_token)
    try:
        with db.unit_of_work() as session:
            if verified:
                card = talent.revoke_card(session, actor, card_id, note)
            else:
                card = talent.reject_card(session, actor, card_id, note)
            number = card.card_number
    except InvalidInput as exc:
        return _manage_page(request, db, actor, "verified" if verified else "pending", 422,
                            error=_("Say why; the holder is told.") if exc.code == "missing_field"
                            else error_message(exc), error_form=f"card-{card_id}", error_field=exc.field)
    except (Conflict, NotFound) as exc:
        return _decided(exc)
    text = _("Card %(number)s revoked.") if verified else _("Card %(number)s rejected.")
    return redirect("/manage/talent-cards" + ("?show=verified" if verified else ""), flash=text % {"number": number})


@router.post("/manage/talent-cards/{card_id}/reject", response_model=None)
def reject_card(card_id: Id, request: Request, db: Db, csrf_token: Annotated[str, Form()] = "",
                note: Annotated[str, Form(max_length=4000)] = "") -> Response:
    """Reject a pending card, saying why."""
    return _close(request, db, card_id, csrf_token, note, verified=False)


@router.post("/manage/talent-cards/{card_id}/revoke", response_model=None)
def revoke_card(card_id: Id, request: Request, db: Db, csrf_token: Annotated[str, Form()] = "",
                note: Annotated[str, Form(max_length=4000)] = "") -> Response:
    """Revoke a verified card, saying why."""
    return _close(request, db, card_id, csrf_token, note, verified=True)


@router.post("/manage/talent-entitlements", response_model=None)
def set_entitlement(
    request: Request, db: Db, csrf_token: Annotated[str, Form()] = "",
    scheme_code: Annotated[str, Form(max_length=32)] = "",
    provider_region_code: Annotated[str, Form(max_length=16)] = "", kind: Annotated[str, Form(max_length=32)] = "",
    value: Annotated[str, Form(max_length=20)] = "",
) -> Response:
    """Add or change one entitlement of a scheme of the authority's region."""
    actor = _authority(request)
    check_csrf(request, csrf_token)
    form = {"scheme_code": scheme_code, "provider_region_code": provider_region_code, "kind": kind, "value": value}
    try:
        number = parse_int(value, "value", default=0)
        with db.unit_of_work() as session:
            talent.set_entitlement(session, actor, scheme_code, provider_region_code, kind, number)
    except InvalidInput as exc:
        return _manage_page(request, db, actor, status_code=422, error=error_message(exc),
                            error_form="entitlement", error_field=exc.field, ent_form=form)
    except Conflict as exc:
        return _decided(exc)
    return redirect("/manage/talent-cards#entitlements", flash=_("Entitlement saved."))


@router.post("/manage/talent-entitlements/{entitlement_id}/remove", response_model=None)
def remove_entitlement(entitlement_id: Id, request: Request, db: Db,
                       csrf_token: Annotated[str, Form()] = "") -> Response:
    """Remove one entitlement of a scheme of the authority's region."""
    actor = _authority(request)
    check_csrf(request, csrf_token)
    try:
        with db.unit_of_work() as session:
            talent.remove_entitlement(session, actor, entitlement_id)
    except NotFound as exc:
        return _decided(exc)
    return redirect("/manage/talent-cards#entitlements", flash=_("Entitlement removed."))
