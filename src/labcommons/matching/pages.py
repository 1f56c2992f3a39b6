"""Pages of demand matching and the expert directory: /match (describe a need, get ranked providers with reasons),
/demands (saved demands, their matches and offers), /experts (the directory and profiles), and the providers'
side under /manage/demands (subscription, inbox, offers).

Every page works as plain HTML forms; htmx only swaps the results block of /match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from labcommons.actor import Actor
from labcommons.billing.pages import CATEGORY_LABELS, billing_error_message, form_account_id
from labcommons.billing.pages import label as billing_label
from labcommons.catalog import service as catalog
from labcommons.catalog.models import Category, Facility, Institution, Region, Service
from labcommons.db import Database
from labcommons.errors import Conflict, DomainError, Forbidden, InvalidInput, NotFound
from labcommons.http import Id, page_actor, request_db
from labcommons.i18n import gettext_ as _
from labcommons.identity import roles
from labcommons.identity.roles import Action
from labcommons.matching import demands, experts
from labcommons.matching import service as matching
from labcommons.matching.models import (
    Availability,
    DemandOffer,
    DemandStatus,
    Expert,
    OfferStatus,
)
from labcommons.orders.pages import parse_day, parse_int, parse_yuan
from labcommons.orders.service import facility_today
from labcommons.pages import N_, check_csrf, is_htmx, localized, localtime, redirect, render, require_actor, yuan

router = APIRouter(include_in_schema=False)
Db = Annotated[Database, Depends(request_db)]

KIND_LABELS = {"instrument": N_("Instrument"), "service": N_("Service"), "expert": N_("Expert")}
AVAILABILITY_LABELS = {
    Availability.available: N_("Takes consultations"),
    Availability.limited: N_("Limited availability"),
    Availability.unavailable: N_("Not taking consultations now"),
}
DEMAND_STATUS_LABELS = {DemandStatus.open: N_("Open for offers"), DemandStatus.fulfilled: N_("Fulfilled"),
                        DemandStatus.closed: N_("Closed without an order")}
OFFER_STATUS_LABELS = {OfferStatus.open: N_("Awaiting a decision"), OfferStatus.accepted: N_("Accepted"),
                       OfferStatus.declined: N_("Declined"), OfferStatus.withdrawn: N_("Withdrawn")}
UNIT_LABELS = {"hour": N_("per hour"), "sample": N_("per sample"), "project": N_("per project")}
LANGUAGE_NAMES = {"zh": "中文", "en": "English"}
# Form inputs in yuan (or percent) carry other names than the services' fen (or fraction) fields.
_FIELD_OF = {"budget_fen": "budget", "price_fen": "price", "min_score": "min_score",
             "share_with_providers": "share", "service_id": "service_id"}
EXPERTS_PAGE = 30


def _label(table: dict[Any, str], value: Any) -> str:
    text = table.get(value)
    return _(text) if text else str(value or "")


def error_message(exc: DomainError) -> str:
    """What went wrong with a matching form, in the user's language."""
    texts = {
        "missing_field": _("Fill in the required fields."),
        "too_long": _("The text is too long."),
        "unknown_region": _("Choose one of the regions."),
        "invalid_amount": _("Enter an amount in yuan with at most two decimals, such as 1200 or 1200.50."),
        "out_of_range": _("The number is out of range."),
        "invalid_number": _("Enter a whole number."),
        "invalid_date": _("Enter the date as YYYY-MM-DD."),
        "date_in_past": _("The date must not be in the past."),
        "invalid_text": _("Some of what was sent is not valid."),
        "invalid_choice": _("Choose one of the options."),
        "demand_not_open": _("This demand is no longer open."),
        "offer_not_open": _("This offer is no longer open; reload the page."),
        "offer_exists": _("Your facility has an open offer on this demand already; withdraw it first."),
        "invalid_service": _("Choose an active service of this facility."),
        "invalid_expert": _("Choose an active expert of this facility."),
        "unknown_category": _("Use taxonomy codes for the fields, such as GEN.SEQ."),
        "invalid_list": _("Some of what was sent is not valid."),
        "too_many": _("Too many entries."),
        "user_taken": _("That user already has an expert profile."),
    }
    if exc.code in texts:
        return texts[exc.code]
    if isinstance(exc, Forbidden):
        return _("You may not do this.")
    return billing_error_message(exc) or _("Some of what was sent is not valid.")


def _field(exc: DomainError) -> str | None:
    return _FIELD_OF.get(exc.field or "", exc.field)


# --- result cards -------------------------------------------------------------------------------------------------


@dataclass
class Card:
    """One match as the pages show it, all text in the page's language (a live result or a saved match)."""

    kind: str
    kind_label: str
    item_id: int
    code: str
    name: str
    other_name: str
    provider: str
    region: str
    score: float
    category: str
    href: str
    action_label: str = ""
    action_href: str = ""
    matched_terms: list[str] = field(default_factory=list)
    related_terms: list[str] = field(default_factory=list)
    concepts: list[str] = field(default_factory=list)
    category_match: bool = False
    semantic: int | None = None
    region_match: bool | None = None
    price: str = ""
    slot: str = ""
    availability: str = ""
    languages: str = ""
    status: str = ""
    available: bool = True

    @property
    def percent(self) -> int:
        return max(0, min(100, round(self.score * 100)))


def price_text(price: dict[str, Any] | None) -> str:
    """A match's price: "from ¥80.00 per hour" (the lowest of the rate card), or the caller's own price."""
    if not price:
        return ""
    amount = f"{yuan(price.get('amount_fen'))} {_label(UNIT_LABELS, price.get('unit'))}".strip()
    if price.get("from"):
        return _("from %(price)s") % {"price": amount}
    category = price.get("payer_category")
    if category:
        return f"{amount} ({billing_label(CATEGORY_LABELS, category)})"
    return amount


def _card(request: Request, *, kind: str, item_id: int, code: str, name_zh: str, name_en: str,
          facility_zh: str, facility_en: str, institution_zh: str, institution_en: str, region: str | None,
          score: float, category: str | None, category_name: str, explanation: dict[str, Any],
          regions: dict[str, Region], chosen_region: str | None, available: bool = True) -> Card:
    names = _Names(name_zh, name_en)
    name = localized(names, "name")
    other = name_en if name == name_zh else name_zh
    facility = localized(_Names(facility_zh, facility_en), "name")
    institution = localized(_Names(institution_zh, institution_en), "name")
    provider = " · ".join(p for p in (facility, institution) if p)
    region_row = regions.get(region or "")
    region_match = explanation.get("region_match")
    if chosen_region and region:
        region_match = region == chosen_region
    card = Card(
        kind=kind, kind_label=_label(KIND_LABELS, kind), item_id=item_id, code=code, name=name,
        other_name=other if other and other != name else "", provider=provider,
        region=localized(region_row, "name") if region_row else (region or ""), score=float(score),
        category=category_name, href=f"/{kind}s/{item_id}", available=available,
        matched_terms=list(explanation.get("matched_terms") or []),
        related_terms=list(explanation.get("related_terms") or []),
        concepts=[f"{c.get('term', '')} ≈ {', '.join(c.get('means') or [])}"
                  for c in explanation.get("concepts") or []
                  if c.get("means") and _concept_fits(c, category, explanation)],
        category_match=bool(explanation.get("category_match")),
        semantic=None if explanation.get("semantic") is None else round(float(explanation["semantic"]) * 100),
        region_match=region_match,
        price=price_text(explanation.get("price")),
    )
    if kind == "instrument":
        card.action_label, card.action_href = _("Book"), f"/instruments/{item_id}#book"
        slot = explanation.get("earliest_slot")
        if slot:
            try:
                card.slot = localtime(request, datetime.fromisoformat(slot))
            except ValueError:
                card.slot = ""
        if explanation.get("status") == "maintenance":
            card.status = _("Under maintenance")
    elif kind == "service":
        card.action_label, card.action_href = _("Order this service"), f"/services/{item_id}/order"
    else:
        if explanation.get("availability") in {a.value for a in Availability}:
            card.availability = _label(AVAILABILITY_LABELS, Availability(explanation["availability"]))
        card.languages = ", ".join(LANGUAGE_NAMES.get(lang, lang) for lang in explanation.get("languages") or [])
        service_id = explanation.get("consultation_service_id")
        if service_id:
            card.action_label, card.action_href = _("Request a consultation"), f"/services/{service_id}"
    return card


_WORD = re.compile(r"[^0-9a-z\u3400-\u9fff]+")


def _concept_fits(concept: dict[str, Any], item_category: str | None, explanation: dict[str, Any]) -> bool:
    """Whether a thesaurus concept of the demand concerns this item: it is of the item's field, or words of the
    concept are among the item's matched words (the matcher lists every concept touching any shared word)."""
    field_code = concept.get("category")
    if field_code and item_category and (item_category.startswith(field_code) or field_code.startswith(item_category)):
        return True
    words: set[str] = set()
    for text in [concept.get("term") or "", *(concept.get("means") or [])]:
        low = str(text).lower()
        words.update(w for w in _WORD.split(low) if w)
        words.add(_WORD.sub("", low))
    for term in [*(explanation.get("matched_terms") or []), *(explanation.get("related_terms") or [])]:
        low = str(term).lower()
        if low in words or (len(low) >= 2 and not low.isascii() and any(low in w for w in words)):
            return True
    return False


@dataclass
class _Names:
    """Something with name_zh and name_en, for `localized`."""

    name_zh: str
    name_en: str


def facility_regions(session: Session, facility_ids: set[int | None]) -> dict[int, str]:
    """The region of each facility (its institution's), for items whose own region is not recorded."""
    ids = {i for i in facility_ids if i is not None}
    if not ids:
        return {}
    rows = session.execute(
        select(Facility.id, Institution.region_code).join(Institution, Institution.id == Facility.institution_id)
        .where(Facility.id.in_(ids))
    ).all()
    return {int(fid): str(code) for fid, code in rows}


def result_cards(request: Request, session: Session, results: list[matching.MatchResult],
                 regions: dict[str, Region], chosen_region: str | None) -> list[Card]:
    by_facility = facility_regions(session, {r.facility_id for r in results})
    return [
        _card(request, kind=r.type, item_id=r.id, code=r.code, name_zh=r.name_zh, name_en=r.name_en,
              facility_zh=r.facility_name_zh, facility_en=r.facility_name_en, institution_zh=r.institution_name_zh,
              institution_en=r.institution_name_en, region=r.region or by_facility.get(r.facility_id or 0),
              score=r.score, category=r.category,
              category_name=localized(_Names(r.category_name_zh, r.category_name_en), "name"),
              explanation=r.explanation, regions=regions, chosen_region=chosen_region)
        for r in results
    ]


def saved_cards(request: Request, session: Session, views: list[demands.MatchView], regions: dict[str, Region],
                categories: dict[str, Category], chosen_region: str | None) -> list[Card]:
    by_facility = facility_regions(session, {m.facility_id for m in views})
    cards = []
    for m in views:
        category = categories.get(m.category or "")
        cards.append(_card(
            request, kind=m.kind, item_id=m.item_id, code=m.code, name_zh=m.name_zh, name_en=m.name_en,
            facility_zh=m.facility_name_zh, facility_en=m.facility_name_en, institution_zh=m.institution_name_zh,
            institution_en=m.institution_name_en, region=m.region or by_facility.get(m.facility_id or 0),
            score=m.score, category=m.category, category_name=localized(category, "name") if category else "",
            explanation=m.explanation, regions=regions, chosen_region=chosen_region, available=m.available,
        ))
    return cards


def _regions(session: Session) -> dict[str, Region]:
    return {r.code: r for r in catalog.list_regions(session)}


def _categories(session: Session) -> dict[str, Category]:
    return {c.code: c for c in session.scalars(select(Category))}


# --- /match -------------------------------------------------------------------------------------------------------


@router.get("/match", response_class=HTMLResponse)
def match_page(
    request: Request, db: Db, q: Annotated[str, Query(max_length=4000)] = "",
    region: Annotated[str, Query(max_length=16)] = "",
) -> HTMLResponse:
    """Describe a need in your own words; instruments, services and experts ranked with why they match."""
    actor = page_actor(request)
    outcome: matching.MatchOutcome | None = None
    cards: list[Card] = []
    error = None
    status_code = 200
    with db.unit_of_work(write=False) as session:
        regions = _regions(session)
        if q.strip():
            try:
                outcome = matching.match(session, actor, q, region=region or None)
                cards = result_cards(request, session, outcome.results, regions, region or None)
            except InvalidInput as exc:
                error, status_code = error_message(exc), 422
    notice = None
    if outcome is not None and outcome.mode == "keyword":
        notice = _("Semantic ranking is unavailable right now; results are ranked by keywords only.")
    back = request.url.path + ("?" + request.url.query if request.url.query else "")
    context: dict[str, Any] = {
        "q": q, "region": region, "regions": list(regions.values()), "outcome": outcome, "cards": cards,
        "error": error, "notice": notice, "corrections": outcome.corrections if outcome else {},
        "login_next": "/login?" + urlencode({"next": back}),
    }
    template = "matching/_match_results.html" if is_htmx(request) else "matching/match.html"
    return render(request, template, status_code, **context)


# --- my demands ---------------------------------------------------------------------------------------------------


def _demand_form(text: str = "", region: str = "") -> dict[str, str]:
    return {"text": text, "budget": "", "deadline": "", "region": region, "sample_type": "", "share": "1"}


def _demands_page(request: Request, db: Database, actor: Actor, status_code: int = 200, **context: Any) -> HTMLResponse:
    with db.unit_of_work(write=False) as session:
        entries = demands.list_demands(session, actor)
        regions = list(catalog.list_regions(session))
        answers = bool(demands.answerable_facilities(session, actor))
    context.setdefault("form", _demand_form())
    context.setdefault("error", None)
    context.setdefault("error_field", None)
    return render(request, "matching/demands.html", status_code, page_path="/demands", entries=entries,
                  regions=regions, answers=answers, today=facility_today().isoformat(),
                  status_label=lambda s: _label(DEMAND_STATUS_LABELS, s), **context)


@router.get("/demands", response_class=HTMLResponse)
def my_demands(
    request: Request, db: Db, text: Annotated[str, Query(max_length=4000)] = "",
    region: Annotated[str, Query(max_length=16)] = "",
) -> HTMLResponse:
    """My saved demands, and the full form to save a new one (prefilled from /match)."""
    actor = require_actor(request)
    roles.require(actor, Action.post_demand)
    return _demands_page(request, db, actor, form=_demand_form(text, region))


@router.post("/demands", response_model=None)
def save_demand(
    request: Request, db: Db, csrf_token: Annotated[str, Form()] = "", text: Annotated[str, Form()] = "",
    budget: Annotated[str, Form()] = "", deadline: Annotated[str, Form()] = "",
    region: Annotated[str, Form()] = "", sample_type: Annotated[str, Form()] = "",
    share: Annotated[str, Form()] = "",
) -> Response:
    """Save a demand with its matches; subscribed providers may answer it when it is shared."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    roles.require(actor, Action.post_demand)
    form = {"text": text, "budget": budget, "deadline": deadline, "region": region, "sample_type": sample_type,
            "share": share}
    try:
        budget_fen = parse_yuan(budget, "budget") if budget.strip() else None
        day = parse_day(deadline, "deadline")
        with db.unit_of_work() as session:
            demand = demands.post_demand(session, actor, text=text, budget_fen=budget_fen, deadline=day,
                                         region=region or None, sample_type=sample_type,
                                         share_with_providers=bool(share))
            demand_id = demand.id
    except (InvalidInput, Conflict) as exc:
        return _demands_page(request, db, actor, exc.status_code, form=form, error=error_message(exc),
                             error_field=_field(exc))
    flash = _("Demand saved. Providers that match it can now answer with offers.") if share \
        else _("Demand saved. It is kept private: providers do not see it.")
    return redirect(f"/demands/{demand_id}", flash=flash)


# --- one demand ---------------------------------------------------------------------------------------------------


@dataclass
class OfferRow:
    view: demands.OfferView
    service: Service | None
    service_name: str
    facility_name: str
    expert_name: str
    status: str
    price: str


def _demand_page(request: Request, db: Database, actor: Actor, demand_id: int, status_code: int = 200,
                 **context: Any) -> HTMLResponse:
    with db.unit_of_work(write=False) as session:
        view = demands.get_demand(session, actor, demand_id)
        regions = _regions(session)
        cards = saved_cards(request, session, view.matches, regions, _categories(session), view.demand.region_code)
        service_ids = {o.offer.service_id for o in view.offers}
        services = {s.id: s for s in session.scalars(
            select(Service).where(Service.id.in_(service_ids))
            .options(joinedload(Service.facility))
        )} if service_ids else {}
    offers = [
        OfferRow(
            view=o, service=services.get(o.offer.service_id),
            service_name=localized(_Names(o.service_name_zh, o.service_name_en), "name"),
            facility_name=localized(_Names(o.facility_name_zh, o.facility_name_en), "name"),
            expert_name=localized(_Names(o.expert_name_zh or "", o.expert_name_en or ""), "name"),
            status=_label(OFFER_STATUS_LABELS, o.offer.status),
            price=yuan(o.offer.price_fen) if o.offer.price_fen is not None else "",
        )
        for o in view.offers
    ]
    region = regions.get(view.demand.region_code or "")
    context.setdefault("error", None)
    context.setdefault("error_offer", None)
    context.setdefault("chosen_account", "")
    return render(
        request, "matching/demand.html", status_code, page_path=f"/demands/{demand_id}", view=view,
        demand=view.demand, cards=cards, offers=offers, region_name=localized(region, "name") if region else "",
        status=_label(DEMAND_STATUS_LABELS, view.demand.status), is_open=view.demand.status == DemandStatus.open,
        **context,
    )


@router.get("/demands/{demand_id}", response_class=HTMLResponse)
def demand_page(demand_id: Id, request: Request, db: Db) -> HTMLResponse:
    """A saved demand with its matches and the offers providers made (the author; staff see their part)."""
    actor = require_actor(request)
    return _demand_page(request, db, actor, demand_id)


@router.post("/demands/{demand_id}/close", response_model=None)
def close_demand(demand_id: Id, request: Request, db: Db, csrf_token: Annotated[str, Form()] = "") -> Response:
    """The author closes an open demand; its open offers are declined."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    try:
        with db.unit_of_work() as session:
            demands.close_demand(session, actor, demand_id)
    except Conflict as exc:
        return redirect(f"/demands/{demand_id}", flash=error_message(exc), kind="error")
    return redirect(f"/demands/{demand_id}", flash=_("Demand closed. Its open offers were declined."))


def _offer_of_demand(session: Session, demand_id: int, offer_id: int) -> DemandOffer:
    offer = session.get(DemandOffer, offer_id)
    if offer is None or offer.demand_id != demand_id:
        raise NotFound(f"Offer {offer_id} does not exist.", field="offer_id")
    return offer


@router.post("/demands/{demand_id}/offers/{offer_id}/accept", response_model=None)
def accept_offer(demand_id: Id, offer_id: Id, request: Request, db: Db, csrf_token: Annotated[str, Form()] = "",
                 account_id: Annotated[str, Form()] = "") -> Response:
    """The author accepts an offer: an order of the offered service is made and submitted; its page comes next."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    try:
        account = form_account_id(account_id)
        with db.unit_of_work() as session:
            _offer_of_demand(session, demand_id, offer_id)
            order = demands.accept_offer(session, actor, offer_id, account_id=account)
            order_id, number = order.id, order.number
    except (InvalidInput, Conflict) as exc:
        return _demand_page(request, db, actor, demand_id, exc.status_code, error=error_message(exc),
                            error_offer=offer_id, chosen_account=account_id)
    message = _("Offer accepted. Order %(number)s was sent to the provider; accept its quote when it comes.")
    return redirect(f"/orders/{order_id}", flash=message % {"number": number})


@router.post("/demands/{demand_id}/offers/{offer_id}/decline", response_model=None)
def decline_offer(demand_id: Id, offer_id: Id, request: Request, db: Db,
                  csrf_token: Annotated[str, Form()] = "") -> Response:
    """The author turns an offer down."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    try:
        with db.unit_of_work() as session:
            _offer_of_demand(session, demand_id, offer_id)
            demands.decline_offer(session, actor, offer_id)
    except Conflict as exc:
        return redirect(f"/demands/{demand_id}", flash=error_message(exc), kind="error")
    return redirect(f"/demands/{demand_id}", flash=_("Offer declined."))


# --- experts ------------------------------------------------------------------------------------------------------


def _expert_facts(expert: Expert) -> dict[str, Any]:
    return {
        "availability": _label(AVAILABILITY_LABELS, expert.availability),
        "available": expert.availability != Availability.unavailable,
        "languages": ", ".join(LANGUAGE_NAMES.get(lang, lang) for lang in expert.languages or []),
        "skills": list(localized(expert, "skills") or []),
    }


@router.get("/experts", response_class=HTMLResponse)
def expert_directory(
    request: Request, db: Db, q: Annotated[str, Query(max_length=200)] = "",
    field: Annotated[str, Query(max_length=32)] = "", region: Annotated[str, Query(max_length=16)] = "",
    available: Annotated[str, Query(max_length=8)] = "", page: Annotated[int, Query(ge=1, le=10_000)] = 1,
) -> HTMLResponse:
    """The expert directory: people who give technical consultation, filtered by words, field, region."""
    error = None
    status_code = 200
    with db.unit_of_work(write=False) as session:
        regions = _regions(session)
        categories = _categories(session)
        try:
            found = experts.search_experts(session, q=q or None, field=field or None, region=region or None,
                                           available_only=bool(available), limit=EXPERTS_PAGE,
                                           offset=(page - 1) * EXPERTS_PAGE)
        except InvalidInput as exc:
            found, error, status_code = experts.ExpertPage(items=[], total=0), error_message(exc), 422
    rows = [(e, _expert_facts(e)) for e in found.items]
    used_fields = sorted({code for e in found.items for code in e.fields or []} | ({field} if field else set()))
    return render(
        request, "matching/experts.html", status_code, rows=rows, total=found.total, page=page,
        pages=max(1, -(-found.total // EXPERTS_PAGE)), q=q, field=field, region=region, available=available,
        regions=list(regions.values()), region_names={c: localized(r, "name") for c, r in regions.items()},
        categories=[c for c in categories.values() if "." not in c.code or c.code in used_fields],
        category_names={c: localized(cat, "name") for c, cat in categories.items()}, error=error,
    )


@router.get("/experts/{expert_id}", response_class=HTMLResponse)
def expert_page(expert_id: Id, request: Request, db: Db) -> HTMLResponse:
    """An expert's profile: skills, languages, availability, and how to ask for a consultation."""
    actor = page_actor(request)
    with db.unit_of_work(write=False) as session:
        expert = experts.get_expert(session, expert_id)
        categories = _categories(session)
        region = session.get(Region, expert.region_code)
        service = session.get(Service, expert.consultation_service_id) if expert.consultation_service_id else None
    return render(
        request, "matching/expert.html", expert=expert, facts=_expert_facts(expert),
        fields=[(code, localized(categories[code], "name") if code in categories else code)
                for code in expert.fields or []],
        region_name=localized(region, "name") if region else expert.region_code,
        service=service if service is not None and service.is_active else None,
        may_edit=experts.may_edit(actor, expert),
    )


_EXPERT_FORM_FIELDS = ("name_zh", "name_en", "title_zh", "title_en", "bio_zh", "bio_en", "fields", "skills_zh",
                       "skills_en", "languages", "availability", "consultation_service_id", "is_active")


def _expert_form(expert: Expert) -> dict[str, str]:
    return {
        "name_zh": expert.name_zh, "name_en": expert.name_en, "title_zh": expert.title_zh,
        "title_en": expert.title_en, "bio_zh": expert.bio_zh, "bio_en": expert.bio_en,
        "fields": " ".join(expert.fields or []), "skills_zh": "\n".join(expert.skills_zh or []),
        "skills_en": "\n".join(expert.skills_en or []), "languages": " ".join(expert.languages or []),
        "availability": expert.availability.value,
        "consultation_service_id": str(expert.consultation_service_id or ""),
        "is_active": "1" if expert.is_active else "",
    }


def _editable_expert(session: Session, actor: Actor, expert_id: int) -> tuple[Expert, bool]:
    expert = experts.get_expert(session, expert_id, include_inactive=True)
    if not experts.may_edit(actor, expert):
        if expert.is_active:
            raise Forbidden("Only the expert and their facility's managers may edit this profile.")
        raise NotFound(f"Expert {expert_id} does not exist.", field="expert_id")
    return expert, experts.may_manage(actor, expert)


def _expert_edit_page(request: Request, db: Database, actor: Actor, expert_id: int, status_code: int = 200,
                      form: dict[str, str] | None = None, error: str | None = None,
                      error_field: str | None = None) -> HTMLResponse:
    with db.unit_of_work(write=False) as session:
        expert, manager = _editable_expert(session, actor, expert_id)
        services = experts.consultation_services(session, expert.facility_id) \
            if manager and expert.facility_id is not None else []
    return render(
        request, "matching/expert_edit.html", status_code, page_path=f"/experts/{expert_id}/edit", expert=expert,
        manager=manager, services=services, form=form or _expert_form(expert), error=error, error_field=error_field,
        availabilities=[(a.value, _label(AVAILABILITY_LABELS, a)) for a in Availability],
    )


@router.get("/experts/{expert_id}/edit", response_class=HTMLResponse)
def edit_expert_form(expert_id: Id, request: Request, db: Db) -> HTMLResponse:
    """The profile form (the expert themself, or their facility's managers)."""
    actor = require_actor(request)
    return _expert_edit_page(request, db, actor, expert_id)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.replace("\r", "").split("\n") if line.strip()]


def _words(text: str) -> list[str]:
    return [w for w in text.replace(",", " ").replace("，", " ").replace("、", " ").split() if w]


@router.post("/experts/{expert_id}/edit", response_model=None)
def edit_expert(
    expert_id: Id, request: Request, db: Db, csrf_token: Annotated[str, Form()] = "",
    name_zh: Annotated[str, Form()] = "", name_en: Annotated[str, Form()] = "",
    title_zh: Annotated[str, Form()] = "", title_en: Annotated[str, Form()] = "",
    bio_zh: Annotated[str, Form()] = "", bio_en: Annotated[str, Form()] = "",
    fields: Annotated[str, Form()] = "", skills_zh: Annotated[str, Form()] = "",
    skills_en: Annotated[str, Form()] = "", languages: Annotated[str, Form()] = "",
    availability: Annotated[str, Form()] = "available", consultation_service_id: Annotated[str, Form()] = "",
    is_active: Annotated[str, Form()] = "",
) -> Response:
    """Save the profile; the form again with the problem named, else the profile page."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    form = {"name_zh": name_zh, "name_en": name_en, "title_zh": title_zh, "title_en": title_en, "bio_zh": bio_zh,
            "bio_en": bio_en, "fields": fields, "skills_zh": skills_zh, "skills_en": skills_en,
            "languages": languages, "availability": availability,
            "consultation_service_id": consultation_service_id, "is_active": is_active}
    try:
        with db.unit_of_work() as session:
            _expert, manager = _editable_expert(session, actor, expert_id)
            values: dict[str, Any] = {
                "name_zh": name_zh, "name_en": name_en, "title_zh": title_zh, "title_en": title_en,
                "bio_zh": bio_zh, "bio_en": bio_en, "fields": _words(fields), "skills_zh": _lines(skills_zh),
                "skills_en": _lines(skills_en), "languages": _words(languages), "availability": availability,
            }
            if manager:
                values["consultation_service_id"] = (parse_int(consultation_service_id, "consultation_service_id")
                                                     if consultation_service_id.strip() else None)
                values["is_active"] = bool(is_active)
            experts.update_expert(session, actor, expert_id, **values)
    except (InvalidInput, Conflict) as exc:
        return _expert_edit_page(request, db, actor, expert_id, exc.status_code, form=form,
                                 error=error_message(exc), error_field=exc.field)
    target = f"/experts/{expert_id}" if not manager or bool(is_active) else f"/experts/{expert_id}/edit"
    return redirect(target, flash=_("Profile saved."))


# --- providers: subscription, inbox and offers --------------------------------------------------------------------


@router.get("/manage/demands", response_class=HTMLResponse)
def provider_home(request: Request, db: Db) -> HTMLResponse:
    """The facilities the user answers demands for, with their subscription and inbox size."""
    actor = require_actor(request)
    roles.require_some(actor, Action.answer_demands)
    with db.unit_of_work(write=False) as session:
        rows = [(f, demands.inbox(session, actor, f.id)) for f in demands.answerable_facilities(session, actor)]
    return render(request, "matching/provider_home.html", rows=rows)


def _provider_form() -> dict[str, str]:
    return {"service_id": "", "message": "", "price": "", "available_from": "", "expert_id": ""}


def _inbox_page(request: Request, db: Database, actor: Actor, facility_id: int, status_code: int = 200,
                **context: Any) -> HTMLResponse:
    with db.unit_of_work(write=False) as session:
        box = demands.inbox(session, actor, facility_id)
        services = [s for s in catalog.list_services(session, facility_id=facility_id) if s.is_active]
        staff_experts = list(session.scalars(
            select(Expert).where(Expert.facility_id == facility_id, Expert.is_active.is_(True)).order_by(Expert.code)
        ))
        regions = _regions(session)
        categories = _categories(session)
        entries = [(e, saved_cards(request, session, e.matches, regions, categories, e.demand.region_code))
                   for e in box.entries]
    subscription = box.subscription
    context.setdefault("sub_form", {
        "active": "1" if subscription is None or subscription.active else "",
        "min_score": str(round((subscription.min_score if subscription else demands.DEFAULT_MIN_SCORE) * 100)),
        "notify_email": "1" if subscription is None or subscription.notify_email else "",
    })
    context.setdefault("offer_form", _provider_form())
    context.setdefault("error", None)
    context.setdefault("error_form", None)
    context.setdefault("error_field", None)
    return render(
        request, "matching/inbox.html", status_code, page_path=f"/manage/demands/facilities/{facility_id}",
        box=box, entries=entries, services=services, experts=staff_experts, today=facility_today().isoformat(),
        region_names={c: localized(r, "name") for c, r in regions.items()},
        offer_status=lambda s: _label(OFFER_STATUS_LABELS, s), **context,
    )


@router.get("/manage/demands/facilities/{facility_id}", response_class=HTMLResponse)
def facility_inbox(facility_id: Id, request: Request, db: Db) -> HTMLResponse:
    """A facility's subscription to matching demands, its inbox and the offers it made."""
    actor = require_actor(request)
    roles.require_some(actor, Action.answer_demands)
    return _inbox_page(request, db, actor, facility_id)


def _percent(text: str) -> float:
    value = parse_int(text, "min_score", default=0)
    if value > 100:
        raise InvalidInput("The minimum score is 0 to 100.", field="min_score", code="out_of_range")
    return value / 100


@router.post("/manage/demands/facilities/{facility_id}/subscription", response_model=None)
def save_subscription(
    facility_id: Id, request: Request, db: Db, csrf_token: Annotated[str, Form()] = "",
    active: Annotated[str, Form()] = "", min_score: Annotated[str, Form()] = "",
    notify_email: Annotated[str, Form()] = "",
) -> Response:
    """Subscribe the facility to matching demands (or change or stop it)."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    roles.require_some(actor, Action.answer_demands)
    form = {"active": active, "min_score": min_score, "notify_email": notify_email}
    try:
        score = _percent(min_score)
        with db.unit_of_work() as session:
            demands.set_subscription(session, actor, facility_id, active=bool(active), min_score=score,
                                     notify_email=bool(notify_email))
    except InvalidInput as exc:
        return _inbox_page(request, db, actor, facility_id, 422, sub_form=form, error=error_message(exc),
                           error_form="subscription", error_field=_field(exc))
    text = _("Subscription saved.") if active else _("Subscription stopped: no new demands are listed here.")
    return redirect(f"/manage/demands/facilities/{facility_id}", flash=text)


def _form_id(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 9 and int(text) > 0 else None


@router.post("/manage/demands/facilities/{facility_id}/offers", response_model=None)
def make_offer(
    facility_id: Id, request: Request, db: Db, csrf_token: Annotated[str, Form()] = "",
    demand_id: Annotated[str, Form()] = "", service_id: Annotated[str, Form()] = "",
    message: Annotated[str, Form()] = "", price: Annotated[str, Form()] = "",
    available_from: Annotated[str, Form()] = "", expert_id: Annotated[str, Form()] = "",
) -> Response:
    """Answer a demand with an offer: one of the facility's services, a message, a price and a start day."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    roles.require_some(actor, Action.answer_demands)
    form = {"service_id": service_id, "message": message, "price": price, "available_from": available_from,
            "expert_id": expert_id}
    demand = _form_id(demand_id)
    if demand is None:
        raise NotFound("No such demand.", field="demand_id")
    try:
        service = _form_id(service_id)
        if service is None:
            raise InvalidInput("Choose a service.", field="service_id", code="invalid_service")
        price_fen = parse_yuan(price, "price") if price.strip() else None
        day = parse_day(available_from, "available_from")
        expert = parse_int(expert_id, "expert_id") if expert_id.strip() else None
        with db.unit_of_work() as session:
            demands.make_offer(session, actor, demand, facility_id=facility_id, service_id=service, message=message,
                               price_fen=price_fen, available_from=day, expert_id=expert)
    except (InvalidInput, Conflict) as exc:
        return _inbox_page(request, db, actor, facility_id, exc.status_code, offer_form=form,
                           error=error_message(exc), error_form=f"offer-{demand}", error_field=_field(exc))
    return redirect(f"/manage/demands/facilities/{facility_id}#demand-{demand}",
                    flash=_("Offer sent. The author of the demand is told on their demand's page."))


@router.post("/manage/demands/offers/{offer_id}/withdraw", response_model=None)
def withdraw_offer(offer_id: Id, request: Request, db: Db, csrf_token: Annotated[str, Form()] = "") -> Response:
    """Take back an open offer."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    roles.require_some(actor, Action.answer_demands)
    try:
        with db.unit_of_work() as session:
            offer = demands.withdraw_offer(session, actor, offer_id)
            facility_id, demand_id = offer.facility_id, offer.demand_id
    except Conflict as exc:
        with db.unit_of_work(write=False) as session:
            found = session.get(DemandOffer, offer_id)
            back = f"/manage/demands/facilities/{found.facility_id}" if found else "/manage/demands"
        return redirect(back, flash=error_message(exc), kind="error")
    return redirect(f"/manage/demands/facilities/{facility_id}#demand-{demand_id}", flash=_("Offer withdrawn."))
