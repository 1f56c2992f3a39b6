"""Demand matching endpoints under /api/v1: matching without saving, saved demands and their offers, facilities'
subscriptions and inbox, the expert directory and the matcher's status.

Reads need the token scope `demands:read`, writes `demands:write`; every POST takes an Idempotency-Key. Matching
(`POST /demands/match`) and the expert directory are public; a signed-in caller's matches include instruments
open only to their institution or region.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.db import MAX_ID
from labcommons.http import (
    Db,
    Id,
    IdempotencyKey,
    api_actor,
    has_scope,
    idempotent_post,
    link,
    page_actor,
    require_role_for,
    require_scope,
)
from labcommons.idempotency import Outcome
from labcommons.identity.roles import Action
from labcommons.matching import demands, embeddings, experts
from labcommons.matching import service as matching
from labcommons.matching.models import DemandOffer, MatchDocument
from labcommons.matching.schemas import (
    DemandCreate,
    DemandDetail,
    DemandList,
    DemandRead,
    DemandSummary,
    ExpertCreate,
    ExpertList,
    ExpertRead,
    ExpertUpdate,
    InboxItem,
    InboxRead,
    MatchingStatus,
    MatchRequest,
    MatchResponse,
    OfferAccept,
    OfferAccepted,
    OfferCreate,
    OfferRead,
    OrderRef,
    SavedMatch,
    SubscriptionRead,
    SubscriptionUpdate,
)

router = APIRouter(tags=["matching"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API token"},
    403: {"description": "The caller's roles do not allow it (not staff of the facility, not the expert or their "
                         "facility's manager), or the token lacks the scope"},
    404: {"description": "Unknown demand, offer, facility or expert, or one the caller may not see"},
    409: {"description": "Conflicts with the current state: `demand_not_open`, `offer_not_open`, `offer_exists`, "
                         "`code_taken`, `user_taken`"},
    422: {"description": "Invalid input; `field` names it and `error` the rule (e.g. `unknown_region`, "
                         "`date_in_past`, `out_of_range`, `invalid_service`, `invalid_expert`)"},
}
Reader = Annotated[Actor, Depends(require_scope("demands:read"))]
Writer = Annotated[Actor, Depends(require_scope("demands:write"))]
StaffReader = Annotated[Actor, Depends(require_role_for("demands:read", Action.answer_demands))]
StaffWriter = Annotated[Actor, Depends(require_role_for("demands:write", Action.answer_demands))]
ExpertManager = Annotated[Actor, Depends(require_role_for("demands:write", Action.manage_experts))]


def optional_actor(request: Request) -> Actor | None:
    """The caller when they identify themselves (token or signed-in browser), else None: anonymous.

    A bad token is still 401. A token without `demands:read` matches as an anonymous visitor: the scope limits what
    the token may do in its owner's name, and anonymous matching needs nothing."""
    if request.headers.get("authorization"):
        actor = api_actor(request)
        return actor if has_scope(actor, "demands:read") else None
    return page_actor(request)


MaybeActor = Annotated[Actor | None, Depends(optional_actor)]


def _detail(session: Session, actor: Actor, demand_id: int) -> dict[str, Any]:
    return DemandDetail.of_view(demands.get_demand(session, actor, demand_id)).model_dump(mode="json")


def _offer(offer: DemandOffer, session: Session) -> OfferRead:
    return OfferRead.of(demands.offer_view(session, offer))


# --- matching ---------------------------------------------------------------------------------------------------


@router.post("/demands/match", response_model=MatchResponse, responses=ERRORS)
def match(body: MatchRequest, actor: MaybeActor, db: Db) -> MatchResponse:
    """Rank instruments, services and experts for a demand in the caller's own words, each with why it matches
    (terms, concepts, category, semantic similarity, region, price, earliest free slot). Nothing is saved."""
    with db.unit_of_work(write=False) as session:
        outcome = matching.match(session, actor, body.text, region=body.region, limit=body.limit,
                                 kinds=[k.value for k in body.types] if body.types else None)
        results = [demands.plain(r.as_json()) for r in outcome.results]
    return MatchResponse(mode=outcome.mode, notice=outcome.notice, took_ms=round(outcome.took_ms, 2),
                         index_size=outcome.index_size, corrections=outcome.corrections, results=results)


@router.get("/matching/status", response_model=MatchingStatus, responses=ERRORS)
def status(db: Db) -> MatchingStatus:
    """How many items the matcher knows, how many wait for re-indexing, and whether semantic ranking is on."""
    with db.unit_of_work(write=False) as session:
        documents = session.scalar(
            select(func.count()).select_from(MatchDocument).where(MatchDocument.active.is_(True))
        ) or 0
        dirty = session.scalar(
            select(func.count()).select_from(MatchDocument).where(MatchDocument.dirty.is_(True))
        ) or 0
    encoder = embeddings.get_encoder()
    notice = None
    if encoder is None:
        notice = matching.KEYWORD_NOTICE.format(reason=embeddings.unavailable_reason() or "no model")
    return MatchingStatus(documents=documents, dirty=dirty, mode="hybrid" if encoder else "keyword",
                          model=encoder.name if encoder else None, notice=notice)


# --- demands ----------------------------------------------------------------------------------------------------


@router.post("/demands", status_code=201, response_model=DemandDetail, responses={**ERRORS, 201: {
    "description": "The demand and its matches",
    # OpenAPI links: what a client (and the stateful fuzzer) can do next with the demand it posted.
    "links": {
        "GetDemand": link("get_demand_api_v1_demands__demand_id__get", demand_id="id"),
        "CloseDemand": link("close_demand_api_v1_demands__demand_id__close_post", demand_id="id"),
        "MakeOffer": link("make_offer_api_v1_demands__demand_id__offers_post", demand_id="id"),
    }}})
def post_demand(body: DemandCreate, request: Request, actor: Writer, db: Db,
                idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Save a demand with its matches; subscribed facilities that match it are told (and may answer) unless
    `share_with_providers` is false."""

    def work(session: Session) -> Outcome:
        demand = demands.post_demand(
            session, actor, text=body.text, budget_fen=body.budget_fen, deadline=body.deadline, region=body.region,
            sample_type=body.sample_type, share_with_providers=body.share_with_providers, limit=body.limit,
        )
        return Outcome(201, _detail(session, actor, demand.id))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.get("/demands", response_model=DemandList, responses=ERRORS)
def list_demands(actor: Reader, db: Db) -> DemandList:
    """The caller's demands, newest first, with their numbers of matches and open offers."""
    with db.unit_of_work(write=False) as session:
        entries = demands.list_demands(session, actor)
        return DemandList(items=[
            DemandSummary(**DemandRead.of(e.demand, mine=True).model_dump(), match_count=e.match_count,
                          open_offers=e.open_offers)
            for e in entries
        ])


@router.get("/demands/{demand_id}", response_model=DemandDetail, responses=ERRORS)
def get_demand(demand_id: Id, actor: Reader, db: Db) -> DemandDetail:
    """A demand with its matches and offers: all of them for its author; a facility's own for its staff when the
    facility may answer it. 404 for anyone else."""
    with db.unit_of_work(write=False) as session:
        return DemandDetail.of_view(demands.get_demand(session, actor, demand_id))


@router.post("/demands/{demand_id}/close", response_model=DemandDetail, responses=ERRORS)
def close_demand(demand_id: Id, request: Request, actor: Writer, db: Db,
                 idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """The author closes an open demand; its open offers are declined."""

    def work(session: Session) -> Outcome:
        demands.close_demand(session, actor, demand_id)
        return Outcome(200, _detail(session, actor, demand_id))

    return idempotent_post(request, db, actor, idempotency_key, {}, work)


# --- offers -----------------------------------------------------------------------------------------------------


@router.post("/demands/{demand_id}/offers", status_code=201, response_model=OfferRead, responses=ERRORS)
def make_offer(demand_id: Id, body: OfferCreate, request: Request, actor: StaffWriter, db: Db,
               idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Staff answer a shared open demand their facility matched with one of its services (one open offer per
    facility and demand)."""

    def work(session: Session) -> Outcome:
        offer = demands.make_offer(session, actor, demand_id, **body.model_dump())
        return Outcome(201, _offer(offer, session).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.post("/offers/{offer_id}/accept", response_model=OfferAccepted, responses=ERRORS)
def accept_offer(offer_id: Id, request: Request, actor: Writer, db: Db, body: OfferAccept | None = None,
                 idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """The demand's author accepts an offer: an order of the offered service (with the expert, if any) is created
    and submitted to the provider, quoted at the offer's price when it has one; the demand is fulfilled and the
    other offers are declined. Of two acceptances at once, one gets 409."""
    account_id = body.account_id if body is not None else None

    def work(session: Session) -> Outcome:
        order = demands.accept_offer(session, actor, offer_id, account_id=account_id)
        offer = session.get(DemandOffer, offer_id)
        assert offer is not None
        answer = OfferAccepted(offer=_offer(offer, session),
                               order=OrderRef(id=order.id, number=order.number or "", status=order.status.value))
        return Outcome(200, answer.model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, {"account_id": account_id}, work)


@router.post("/offers/{offer_id}/decline", response_model=OfferRead, responses=ERRORS)
def decline_offer(offer_id: Id, request: Request, actor: Writer, db: Db,
                  idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """The demand's author turns an open offer down."""

    def work(session: Session) -> Outcome:
        offer = demands.decline_offer(session, actor, offer_id)
        return Outcome(200, _offer(offer, session).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, {}, work)


@router.post("/offers/{offer_id}/withdraw", response_model=OfferRead, responses=ERRORS)
def withdraw_offer(offer_id: Id, request: Request, actor: StaffWriter, db: Db,
                   idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Staff of the offering facility take back an open offer."""

    def work(session: Session) -> Outcome:
        offer = demands.withdraw_offer(session, actor, offer_id)
        return Outcome(200, _offer(offer, session).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, {}, work)


# --- subscriptions and the inbox --------------------------------------------------------------------------------


def _subscription_read(facility_id: int, subscription: Any) -> SubscriptionRead:
    if subscription is None:
        return SubscriptionRead(facility_id=facility_id, subscribed=False, active=False,
                                min_score=demands.DEFAULT_MIN_SCORE, notify_email=True, updated_at=None)
    return SubscriptionRead(facility_id=facility_id, subscribed=True, active=subscription.active,
                            min_score=subscription.min_score, notify_email=subscription.notify_email,
                            updated_at=subscription.updated_at)


@router.get("/facilities/{facility_id}/demand-inbox", response_model=InboxRead, responses=ERRORS)
def demand_inbox(facility_id: Id, actor: StaffReader, db: Db, include_closed: bool = False) -> InboxRead:
    """Shared open demands matching the facility at or above its minimum score, newest first, with the matched
    items and the facility's own offer; empty (`subscribed: false`) when it does not subscribe."""
    with db.unit_of_work(write=False) as session:
        box = demands.inbox(session, actor, facility_id, include_closed=include_closed)
        items = [
            InboxItem(demand=DemandRead.of(e.demand, mine=e.demand.user_id == actor.user_id),
                      best_score=round(e.best_score, 4), matches=[SavedMatch.of(m) for m in e.matches],
                      offered=e.offered,
                      offer=None if e.offer is None else _offer(e.offer, session))
            for e in box.entries
        ]
        return InboxRead(facility_id=box.facility.id, subscribed=box.subscribed,
                         min_score=box.subscription.min_score if box.subscription else None, items=items)


@router.get("/facilities/{facility_id}/demand-subscription", response_model=SubscriptionRead, responses=ERRORS)
def get_subscription(facility_id: Id, actor: StaffReader, db: Db) -> SubscriptionRead:
    """The facility's subscription to matching demands (`subscribed: false` when it never subscribed)."""
    with db.unit_of_work(write=False) as session:
        return _subscription_read(facility_id, demands.get_subscription(session, actor, facility_id))


@router.put("/facilities/{facility_id}/demand-subscription", response_model=SubscriptionRead, responses=ERRORS)
def put_subscription(facility_id: Id, body: SubscriptionUpdate, actor: StaffWriter, db: Db) -> SubscriptionRead:
    """Subscribe the facility to demands matching it at `min_score` or more (0 to 1), with or without e-mail;
    `active: false` pauses it."""
    with db.unit_of_work() as session:
        subscription = demands.set_subscription(session, actor, facility_id, **body.model_dump())
        return _subscription_read(facility_id, subscription)


# --- experts ----------------------------------------------------------------------------------------------------


@router.get("/experts", response_model=ExpertList, responses=ERRORS)
def list_experts(
    db: Db,
    q: Annotated[str | None, Query(max_length=experts.MAX_Q)] = None,
    field: Annotated[str | None, Query(max_length=32, description="Taxonomy code or prefix, e.g. GEN")] = None,
    region: Annotated[str | None, Query(max_length=16)] = None,
    available: bool = False,
    limit: Annotated[int, Query(ge=1, le=experts.MAX_LIMIT)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> ExpertList:
    """Active experts by code, filtered by words, field, region and (with `available`) who take consultations."""
    with db.unit_of_work(write=False) as session:
        page = experts.search_experts(session, q=q, field=field, region=region, available_only=available,
                                      limit=limit, offset=offset)
        return ExpertList(items=[ExpertRead.of(e) for e in page.items], total=page.total)


@router.get("/experts/{expert_id}", response_model=ExpertRead, responses=ERRORS)
def get_expert(expert_id: Id, db: Db) -> ExpertRead:
    """One active expert's profile."""
    with db.unit_of_work(write=False) as session:
        return ExpertRead.of(experts.get_expert(session, expert_id))


@router.post("/experts", status_code=201, response_model=ExpertRead, responses=ERRORS)
def create_expert(body: ExpertCreate, request: Request, actor: ExpertManager, db: Db,
                  idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """A facility manager adds an expert of their facility (institution and region follow the facility)."""

    def work(session: Session) -> Outcome:
        values = body.model_dump(exclude_unset=True)
        expert = experts.create_expert(session, actor, **values)
        return Outcome(201, ExpertRead.of(experts.get_expert(session, expert.id, include_inactive=True))
                       .model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.patch("/experts/{expert_id}", response_model=ExpertRead, responses=ERRORS)
def update_expert(expert_id: Id, body: ExpertUpdate, actor: Writer, db: Db) -> ExpertRead:
    """Change some fields of a profile: the expert their own profile, their facility's managers any field."""
    with db.unit_of_work() as session:
        experts.update_expert(session, actor, expert_id, **body.model_dump(exclude_unset=True))
        session.expire_all()
        return ExpertRead.of(experts.get_expert(session, expert_id, include_inactive=True))
