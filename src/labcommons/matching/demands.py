"""Posted demands and what providers do with them: saving a demand with its matches, telling subscribed facilities,
their inbox, offers, and accepting an offer as a service order.

Who sees a demand: its author; and staff of a facility that answered it with an offer, or that is among its
matches, subscribes to demands and was allowed to see it (`share_with_providers`). Anyone else gets NotFound, as
if it did not exist. Staff see only their own facilities' matches and offers, never the author's identity.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from labcommons import jobs
from labcommons.actor import Actor
from labcommons.catalog.models import Facility, Instrument, Service
from labcommons.config import get_settings
from labcommons.db import MAX_ID, utcnow
from labcommons.errors import Conflict, Forbidden, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity.models import User
from labcommons.identity.roles import Action, FacilityRef
from labcommons.matching import service as matching
from labcommons.matching.models import (
    Demand,
    DemandMatch,
    DemandOffer,
    DemandStatus,
    DemandSubscription,
    Expert,
    OfferStatus,
)
from labcommons.orders import quotes
from labcommons.orders import service as orders
from labcommons.orders.models import OrderStatus, ServiceOrder

# ¥100 million, as for a quote line's unit price (a demand's budget or an offer's price may be a large R&D contract).
MAX_FEN = 10_000_000_000
MAX_SAMPLE_TYPE = 200
MAX_MESSAGE = 5000
DEFAULT_MIN_SCORE = 0.3
# How many demands an inbox lists (newest first).
INBOX_LIMIT = 200
ORDER_TITLE_LENGTH = 80
MAIL_EXCERPT = 300


# --- views ------------------------------------------------------------------------------------------------------


@dataclass
class MatchView:
    """A saved match with the item's names as they are now; `explanation` is the one saved with the demand."""

    rank: int
    kind: str
    item_id: int
    code: str
    name_zh: str
    name_en: str
    score: float
    facility_id: int | None
    facility_name_zh: str
    facility_name_en: str
    institution_name_zh: str
    institution_name_en: str
    region: str | None
    category: str | None
    explanation: dict[str, Any]
    # False when the item was removed, retired or switched off since the demand was matched.
    available: bool = True


@dataclass
class OfferView:
    offer: DemandOffer
    service_name_zh: str
    service_name_en: str
    facility_name_zh: str
    facility_name_en: str
    expert_name_zh: str | None = None
    expert_name_en: str | None = None


@dataclass
class DemandView:
    """A demand as one viewer may see it: the author sees everything; facility staff see their facilities' part."""

    demand: Demand
    is_owner: bool
    matches: list[MatchView]
    offers: list[OfferView]
    # Facilities the viewer works for that may answer this demand (empty for the author alone).
    facility_ids: list[int] = field(default_factory=list)


@dataclass
class DemandEntry:
    """One of the caller's demands in their list."""

    demand: Demand
    match_count: int
    open_offers: int


@dataclass
class InboxEntry:
    demand: Demand
    best_score: float
    matches: list[MatchView]
    # The facility's latest offer on the demand (any status), None when it has not answered.
    offer: DemandOffer | None

    @property
    def offered(self) -> bool:
        return self.offer is not None and self.offer.status == OfferStatus.open


@dataclass
class Inbox:
    facility: Facility
    subscription: DemandSubscription | None
    entries: list[InboxEntry]

    @property
    def subscribed(self) -> bool:
        return self.subscription is not None and self.subscription.active


# --- checks -----------------------------------------------------------------------------------------------------


def _fen(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput("An amount is a whole number of fen.", field=name, code="invalid_amount")
    if not 0 <= value <= MAX_FEN:
        raise InvalidInput(f"The amount must be 0 to {MAX_FEN} fen.", field=name, code="out_of_range")
    return value


def _future_day(value: Any, name: str, now: datetime | None) -> date | None:
    if value is None:
        return None
    if isinstance(value, datetime) or not isinstance(value, date):
        raise InvalidInput("Give a date (YYYY-MM-DD).", field=name, code="invalid_date")
    if value < orders.facility_today(now):
        raise InvalidInput("The date is in the past.", field=name, code="date_in_past")
    return value


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput("Give true or false.", field=name, code="invalid_flag")
    return value


def _id(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_ID:
        raise NotFound(f"No such {name.removesuffix('_id')}.", field=name)
    return value


def _facility(session: Session, facility_id: int) -> Facility:
    facility = session.get(Facility, _id(facility_id, "facility_id"))
    if facility is None:
        raise NotFound(f"Facility {facility_id} does not exist.", field="facility_id")
    return facility


def _is_staff(actor: Actor | None, facility: Facility) -> bool:
    return roles.authorize(actor, Action.answer_demands, facility=FacilityRef.of(facility))


def _require_staff(actor: Actor, facility: Facility) -> None:
    roles.require(actor, Action.answer_demands, facility=FacilityRef.of(facility))


def plain(value: Any) -> Any:
    """The value as plain JSON types (scores may be numpy floats), for the JSON column and the API."""

    def convert(obj: Any) -> Any:
        if hasattr(obj, "item"):
            return obj.item()
        if isinstance(obj, datetime | date):
            return obj.isoformat()
        raise TypeError(f"not JSON: {type(obj).__name__}")

    return json.loads(json.dumps(value, default=convert, ensure_ascii=False))


# --- posting ----------------------------------------------------------------------------------------------------


def post_demand(
    session: Session,
    actor: Actor,
    *,
    text: str,
    budget_fen: int | None = None,
    deadline: date | None = None,
    region: str | None = None,
    sample_type: str = "",
    share_with_providers: bool = True,
    limit: int = matching.DEFAULT_LIMIT,
    now: datetime | None = None,
) -> Demand:
    """Save a demand with the matches it gets now, and queue e-mail to subscribed facilities that want it."""
    roles.require(actor, Action.post_demand)
    now = now or utcnow()
    text = matching.check_demand_text(text)
    budget_fen = _fen(budget_fen, "budget_fen")
    deadline = _future_day(deadline, "deadline", now)
    region = matching.check_region(session, region)
    if not isinstance(sample_type, str):
        raise InvalidInput("Describe the samples in words.", field="sample_type", code="invalid_text")
    sample_type = sample_type.strip()
    if len(sample_type) > MAX_SAMPLE_TYPE:
        raise InvalidInput(f"The sample type is too long ({MAX_SAMPLE_TYPE} characters at most).",
                           field="sample_type", code="too_long")
    share_with_providers = _flag(share_with_providers, "share_with_providers")
    limit = matching.check_limit(limit)
    outcome = matching.match(session, actor, text, region=region, limit=limit, now=now)
    demand = Demand(
        user_id=actor.user_id, text=text, budget_fen=budget_fen, deadline=deadline, region_code=region,
        sample_type=sample_type, share_with_providers=share_with_providers, status=DemandStatus.open,
        mode=outcome.mode, created_at=now, updated_at=now,
    )
    session.add(demand)
    session.flush()
    for rank, result in enumerate(outcome.results, start=1):
        session.add(DemandMatch(
            demand_id=demand.id, rank=rank, kind=result.type, item_id=result.id, facility_id=result.facility_id,
            score=float(result.score), explanation=plain(result.explanation),
        ))
    session.flush()
    if share_with_providers:
        _tell_subscribers(session, actor, demand)
    return demand


def _best_scores(session: Session, demand_id: int) -> dict[int, float]:
    rows = session.execute(
        select(DemandMatch.facility_id, func.max(DemandMatch.score))
        .where(DemandMatch.demand_id == demand_id, DemandMatch.facility_id.is_not(None))
        .group_by(DemandMatch.facility_id)
    ).all()
    return {int(fid): float(score) for fid, score in rows if fid is not None}


def _tell_subscribers(session: Session, actor: Actor, demand: Demand) -> None:
    best = _best_scores(session, demand.id)
    if not best:
        return
    subscriptions = session.scalars(
        select(DemandSubscription).where(DemandSubscription.facility_id.in_(best),
                                         DemandSubscription.active.is_(True),
                                         DemandSubscription.notify_email.is_(True))
        .order_by(DemandSubscription.facility_id)
    ).all()
    from labcommons.notifications import service as notifications
    from labcommons.orders.notify import facility_staff_ids

    for subscription in subscriptions:
        score = best[subscription.facility_id]
        if score < subscription.min_score:
            continue
        facility = session.get(Facility, subscription.facility_id)
        if facility is None:
            continue
        for user_id in facility_staff_ids(session, facility.id):
            if user_id == actor.user_id:
                continue
            user = session.get(User, user_id)
            if user is None:
                continue
            locale = notifications.user_locale(user)
            subject, body = _mail_text(locale, user.name, facility, demand, score)
            # Through the same queued "send_mail" job as other ready-made messages: sent after the commit, once
            # per demand and recipient (a staff member of two matched facilities hears of it once).
            jobs.enqueue(session, "send_mail", {"to": user.email, "subject": subject, "text": body},
                         dedupe_key=f"demand_match:{demand.id}:{user_id}")


def _mail_text(locale: str, name: str, facility: Facility, demand: Demand, score: float) -> tuple[str, str]:
    base = get_settings().public_base_url.rstrip("/")
    url = f"{base}/manage/demands/facilities/{facility.id}"
    excerpt = demand.text if len(demand.text) <= MAIL_EXCERPT else demand.text[:MAIL_EXCERPT] + "…"
    percent = round(score * 100)
    if locale == "en":
        facility_name = facility.name_en or facility.name_zh
        subject = f"A new demand matches {facility_name}"
        body = (f"Dear {name},\n\nA user has posted a demand that matches {facility_name} "
                f"(match {percent}%):\n\n{excerpt}\n\nSee it and answer with an offer: {url}\n\n"
                "You get this e-mail because the facility subscribes to matching demands; the subscription can "
                "be changed on the same page.\n")
    else:
        facility_name = facility.name_zh or facility.name_en
        subject = f"有新需求与「{facility_name}」匹配"
        body = (f"{name}，您好：\n\n有用户发布了一条与「{facility_name}」匹配的需求（匹配度 {percent}%）：\n\n"
                f"{excerpt}\n\n查看需求并提交报价：{url}\n\n"
                "您收到此邮件是因为该平台订阅了匹配需求提醒，可在上述页面修改订阅设置。\n")
    return subject, body


# --- reading ----------------------------------------------------------------------------------------------------


def list_demands(session: Session, actor: Actor, *, limit: int = 200) -> list[DemandEntry]:
    """The caller's own demands, newest first, with their number of matches and of open offers."""
    roles.require(actor, Action.post_demand)
    demands = session.scalars(
        select(Demand).where(Demand.user_id == actor.user_id)
        .order_by(Demand.created_at.desc(), Demand.id.desc()).limit(limit)
    ).all()
    ids = [d.id for d in demands]
    match_counts: dict[int, int] = {}
    offer_counts: dict[int, int] = {}
    if ids:
        match_counts = {int(i): int(n) for i, n in session.execute(
            select(DemandMatch.demand_id, func.count()).where(DemandMatch.demand_id.in_(ids))
            .group_by(DemandMatch.demand_id)
        )}
        offer_counts = {int(i): int(n) for i, n in session.execute(
            select(DemandOffer.demand_id, func.count())
            .where(DemandOffer.demand_id.in_(ids), DemandOffer.status == OfferStatus.open)
            .group_by(DemandOffer.demand_id)
        )}
    return [DemandEntry(demand=d, match_count=match_counts.get(d.id, 0), open_offers=offer_counts.get(d.id, 0))
            for d in demands]


def reached_facilities(session: Session, demand: Demand) -> set[int]:
    """Facilities a demand reaches: it is shared, the facility subscribes, and its best match there scores at
    least the subscription's minimum. The one rule for the inbox, the e-mails, reading and offering."""
    if not demand.share_with_providers:
        return set()
    return {int(f) for f in session.scalars(
        select(DemandMatch.facility_id)
        .join(DemandSubscription, DemandSubscription.facility_id == DemandMatch.facility_id)
        .where(DemandMatch.demand_id == demand.id, DemandSubscription.active.is_(True))
        .group_by(DemandMatch.facility_id, DemandSubscription.min_score)
        .having(func.max(DemandMatch.score) >= DemandSubscription.min_score)
    ) if f is not None}


def _answering_facilities(session: Session, actor: Actor | None, demand: Demand) -> list[int]:
    """Facilities the actor works for that may see and answer the demand: those that offered on it, and, when it
    is shared, matched facilities with an active subscription."""
    if actor is None or not actor.grants:
        return []
    candidates: set[int] = set(
        session.scalars(select(DemandOffer.facility_id).where(DemandOffer.demand_id == demand.id))
    )
    candidates |= reached_facilities(session, demand)
    if not candidates:
        return []
    facilities = session.scalars(select(Facility).where(Facility.id.in_(candidates)).order_by(Facility.id))
    return [f.id for f in facilities if _is_staff(actor, f)]


def _load_demand(session: Session, demand_id: Any, *, lock: bool = False) -> Demand:
    statement = select(Demand).where(Demand.id == _id(demand_id, "demand_id"))
    if lock:
        # Serialises offers on one demand (PostgreSQL; SQLite serialises writers anyway), so "one open offer
        # per facility" holds under concurrent requests.
        statement = statement.with_for_update()
    demand = session.scalars(statement).first()
    if demand is None:
        raise NotFound(f"Demand {demand_id} does not exist.", field="demand_id")
    return demand


def _visible(session: Session, actor: Actor, demand_id: Any) -> tuple[Demand, bool, list[int]]:
    demand = _load_demand(session, demand_id)
    if demand.user_id == actor.user_id:
        return demand, True, _answering_facilities(session, actor, demand)
    facility_ids = _answering_facilities(session, actor, demand)
    if not facility_ids:
        raise NotFound(f"Demand {demand_id} does not exist.", field="demand_id")
    return demand, False, facility_ids


def get_demand(session: Session, actor: Actor, demand_id: int) -> DemandView:
    """The demand with its matches and offers, as the actor may see it; NotFound for anyone else."""
    demand, is_owner, facility_ids = _visible(session, actor, demand_id)
    rows = session.scalars(
        select(DemandMatch).where(DemandMatch.demand_id == demand.id).order_by(DemandMatch.rank)
    ).all()
    if not is_owner:
        rows = [m for m in rows if m.facility_id in facility_ids]
    offers_q = select(DemandOffer).where(DemandOffer.demand_id == demand.id)
    if not is_owner:
        offers_q = offers_q.where(DemandOffer.facility_id.in_(facility_ids))
    offers = session.scalars(offers_q.order_by(DemandOffer.created_at, DemandOffer.id)).all()
    return DemandView(demand=demand, is_owner=is_owner, matches=describe_matches(session, rows),
                      offers=describe_offers(session, offers), facility_ids=facility_ids)


def describe_matches(session: Session, rows: Sequence[DemandMatch]) -> list[MatchView]:
    """Saved matches with their items' current names, providers and whether they can still be had."""
    ids: dict[str, list[int]] = {}
    for m in rows:
        ids.setdefault(m.kind, []).append(m.item_id)
    items: dict[tuple[str, int], Any] = {}
    models: dict[str, Any] = {"instrument": Instrument, "service": Service, "expert": Expert}
    for kind, model in models.items():
        if ids.get(kind):
            for found in session.scalars(select(model).where(model.id.in_(ids[kind]))):
                items[(kind, found.id)] = found
    facility_ids = {m.facility_id for m in rows if m.facility_id is not None}
    facilities = {f.id: f for f in session.scalars(
        select(Facility).where(Facility.id.in_(facility_ids)).options(joinedload(Facility.institution))
    )} if facility_ids else {}
    out: list[MatchView] = []
    for m in rows:
        item = items.get((m.kind, m.item_id))
        facility = facilities.get(m.facility_id) if m.facility_id is not None else None
        institution = facility.institution if facility is not None else None
        explanation = dict(m.explanation or {})
        out.append(MatchView(
            rank=m.rank, kind=m.kind, item_id=m.item_id, code=getattr(item, "code", ""),
            name_zh=getattr(item, "name_zh", ""), name_en=getattr(item, "name_en", ""), score=m.score,
            facility_id=m.facility_id, facility_name_zh=facility.name_zh if facility else "",
            facility_name_en=facility.name_en if facility else "",
            institution_name_zh=institution.name_zh if institution else "",
            institution_name_en=institution.name_en if institution else "",
            region=explanation.get("region") or getattr(item, "region_code", None),
            category=getattr(item, "category_code", None) or _first_field(item),
            explanation=explanation, available=_still_available(m.kind, item),
        ))
    return out


def _first_field(item: Any) -> str | None:
    fields = getattr(item, "fields", None)
    return fields[0] if fields else None


def _still_available(kind: str, item: Any) -> bool:
    if item is None:
        return False
    if kind == "instrument":
        return bool(item.status != "retired")
    return bool(item.is_active)


def describe_offers(session: Session, offers: Sequence[DemandOffer]) -> list[OfferView]:
    service_ids = {o.service_id for o in offers}
    services = {s.id: s for s in session.scalars(
        select(Service).where(Service.id.in_(service_ids)).options(joinedload(Service.facility))
    )} if service_ids else {}
    expert_ids = {o.expert_id for o in offers if o.expert_id is not None}
    experts = {e.id: e for e in session.scalars(select(Expert).where(Expert.id.in_(expert_ids)))} \
        if expert_ids else {}
    out: list[OfferView] = []
    for o in offers:
        svc = services[o.service_id]
        expert = experts.get(o.expert_id) if o.expert_id is not None else None
        out.append(OfferView(
            offer=o, service_name_zh=svc.name_zh, service_name_en=svc.name_en,
            facility_name_zh=svc.facility.name_zh, facility_name_en=svc.facility.name_en,
            expert_name_zh=expert.name_zh if expert else None, expert_name_en=expert.name_en if expert else None,
        ))
    return out


def close_demand(session: Session, actor: Actor, demand_id: int, *, now: datetime | None = None) -> Demand:
    """The author withdraws an open demand; its open offers are declined. Conflict when it is not open."""
    demand, is_owner, _facilities = _visible(session, actor, demand_id)
    if not is_owner:
        raise Forbidden("Only the demand's author may close it.", field="demand_id")
    now = now or utcnow()
    changed = session.execute(
        update(Demand).where(Demand.id == demand.id, Demand.status == DemandStatus.open)
        .values(status=DemandStatus.closed, updated_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    if not changed:
        session.refresh(demand)
        raise Conflict(f"The demand is {demand.status.value}, not open.", field="demand_id",
                       code="demand_not_open", status=demand.status.value)
    session.execute(
        update(DemandOffer).where(DemandOffer.demand_id == demand.id, DemandOffer.status == OfferStatus.open)
        .values(status=OfferStatus.declined, decided_at=now).execution_options(synchronize_session=False)
    )
    session.flush()
    session.refresh(demand)
    return demand


# --- subscriptions and the inbox --------------------------------------------------------------------------------


def get_subscription(session: Session, actor: Actor, facility_id: int) -> DemandSubscription | None:
    """The facility's subscription to matching demands (None: it never subscribed)."""
    facility = _facility(session, facility_id)
    _require_staff(actor, facility)
    return session.get(DemandSubscription, facility.id)


def set_subscription(
    session: Session,
    actor: Actor,
    facility_id: int,
    *,
    active: bool = True,
    min_score: float = DEFAULT_MIN_SCORE,
    notify_email: bool = True,
) -> DemandSubscription:
    """Create or change the facility's subscription (staff of the facility)."""
    facility = _facility(session, facility_id)
    _require_staff(actor, facility)
    active = _flag(active, "active")
    notify_email = _flag(notify_email, "notify_email")
    if isinstance(min_score, bool) or not isinstance(min_score, int | float) or not 0 <= min_score <= 1:
        raise InvalidInput("The minimum score must be between 0 and 1.", field="min_score", code="out_of_range")
    values = {"active": active, "min_score": float(min_score), "notify_email": notify_email,
              "created_by": actor.user_id, "updated_at": utcnow()}
    # An upsert: two first subscriptions at once must not collide on the primary key.
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = insert(DemandSubscription).values(facility_id=facility.id, **values)
    session.execute(statement.on_conflict_do_update(
        index_elements=[DemandSubscription.facility_id],
        set_={k: v for k, v in values.items() if k != "created_by"},
    ))
    session.flush()
    subscription = session.get(DemandSubscription, facility.id, populate_existing=True)
    assert subscription is not None
    return subscription


def inbox(session: Session, actor: Actor, facility_id: int, *, include_closed: bool = False) -> Inbox:
    """Shared demands matching the facility at or above its subscription's minimum score, newest first, with
    what matched there and the facility's own offer; empty when the facility does not subscribe."""
    facility = _facility(session, facility_id)
    _require_staff(actor, facility)
    subscription = session.get(DemandSubscription, facility.id)
    if subscription is None or not subscription.active:
        return Inbox(facility=facility, subscription=subscription, entries=[])
    best = (
        select(DemandMatch.demand_id, func.max(DemandMatch.score).label("best"))
        .where(DemandMatch.facility_id == facility.id).group_by(DemandMatch.demand_id).subquery()
    )
    statement = (
        select(Demand, best.c.best).join(best, best.c.demand_id == Demand.id)
        .where(Demand.share_with_providers.is_(True), best.c.best >= subscription.min_score)
        .order_by(Demand.created_at.desc(), Demand.id.desc()).limit(INBOX_LIMIT)
    )
    if not include_closed:
        statement = statement.where(Demand.status == DemandStatus.open)
    rows = session.execute(statement).all()
    ids = [d.id for d, _ in rows]
    if not ids:
        return Inbox(facility=facility, subscription=subscription, entries=[])
    matches = session.scalars(
        select(DemandMatch).where(DemandMatch.demand_id.in_(ids), DemandMatch.facility_id == facility.id)
        .order_by(DemandMatch.demand_id, DemandMatch.rank)
    ).all()
    views = describe_matches(session, matches)
    by_demand: dict[int, list[MatchView]] = {}
    for m, view in zip(matches, views, strict=True):
        by_demand.setdefault(m.demand_id, []).append(view)
    offers: dict[int, DemandOffer] = {}
    for offer in session.scalars(
        select(DemandOffer).where(DemandOffer.demand_id.in_(ids), DemandOffer.facility_id == facility.id)
        .order_by(DemandOffer.created_at, DemandOffer.id)
    ):
        offers[offer.demand_id] = offer  # the latest one wins
    entries = [InboxEntry(demand=d, best_score=float(score), matches=by_demand.get(d.id, []),
                          offer=offers.get(d.id)) for d, score in rows]
    return Inbox(facility=facility, subscription=subscription, entries=entries)


def answerable_facilities(session: Session, actor: Actor) -> list[Facility]:
    """The facilities whose demands the actor may answer (for the providers' pages), by name."""
    if not actor.grants:
        return []
    facilities = session.scalars(select(Facility).order_by(Facility.code)).all()
    return [f for f in facilities if _is_staff(actor, f)]


# --- offers -----------------------------------------------------------------------------------------------------


def make_offer(
    session: Session,
    actor: Actor,
    demand_id: int,
    *,
    facility_id: int,
    service_id: int,
    message: str,
    price_fen: int | None = None,
    available_from: date | None = None,
    expert_id: int | None = None,
    now: datetime | None = None,
) -> DemandOffer:
    """A subscribed facility answers a shared, open demand that reached it (see reached_facilities) with one of its
    active services."""
    facility = _facility(session, facility_id)
    _require_staff(actor, facility)
    demand = _load_demand(session, demand_id, lock=True)
    if facility.id not in reached_facilities(session, demand):
        # Not shared with this facility: as if it did not exist (the author's own view aside).
        raise NotFound(f"Demand {demand_id} does not exist.", field="demand_id")
    if demand.status != DemandStatus.open:
        raise Conflict(f"The demand is {demand.status.value}, not open.", field="demand_id", code="demand_not_open",
                       status=demand.status.value)
    if isinstance(service_id, bool) or not isinstance(service_id, int) or not 0 < service_id <= MAX_ID:
        raise InvalidInput("Choose one of the facility's services.", field="service_id", code="invalid_service")
    svc = session.get(Service, service_id)
    if svc is None or svc.facility_id != facility.id or not svc.is_active:
        raise InvalidInput("Choose an active service of this facility.", field="service_id", code="invalid_service")
    if not isinstance(message, str) or not message.strip():
        raise InvalidInput("Write a message to the author of the demand.", field="message", code="missing_field")
    message = message.strip()
    if len(message) > MAX_MESSAGE:
        raise InvalidInput(f"The message is too long ({MAX_MESSAGE} characters at most).", field="message",
                           code="too_long")
    price_fen = _fen(price_fen, "price_fen")
    available_from = _future_day(available_from, "available_from", now)
    if expert_id is not None:
        expert = session.get(Expert, expert_id) if isinstance(expert_id, int) and 0 < expert_id <= MAX_ID else None
        if expert is None or not expert.is_active or not (
            expert.facility_id == facility.id or expert.consultation_service_id == svc.id
        ):
            raise InvalidInput("Choose an active expert of this facility.", field="expert_id", code="invalid_expert")
    existing = session.scalar(
        select(DemandOffer.id).where(DemandOffer.demand_id == demand.id, DemandOffer.facility_id == facility.id,
                                     DemandOffer.status == OfferStatus.open)
    )
    if existing is not None:
        raise Conflict("This facility already has an open offer on the demand; withdraw it first.",
                       field="facility_id", code="offer_exists", offer_id=existing)
    offer = DemandOffer(
        demand_id=demand.id, facility_id=facility.id, service_id=svc.id, expert_id=expert_id, message=message,
        price_fen=price_fen, available_from=available_from, status=OfferStatus.open, created_by=actor.user_id,
        created_at=now or utcnow(),
    )
    session.add(offer)
    session.flush()
    return offer


def _load_offer(session: Session, offer_id: Any) -> DemandOffer:
    offer = session.get(DemandOffer, _id(offer_id, "offer_id"))
    if offer is None:
        raise NotFound(f"Offer {offer_id} does not exist.", field="offer_id")
    return offer


def offer_view(session: Session, offer: DemandOffer) -> OfferView:
    """One offer with its service's, facility's and expert's names."""
    return describe_offers(session, [offer])[0]


def _decide(session: Session, offer: DemandOffer, to: OfferStatus, now: datetime, **extra: Any) -> None:
    """Move an open offer to `to` with a compare-and-set: of two concurrent decisions, one finds it moved."""
    changed = session.execute(
        update(DemandOffer).where(DemandOffer.id == offer.id, DemandOffer.status == OfferStatus.open)
        .values(status=to, decided_at=now, **extra).execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    if not changed:
        session.refresh(offer)
        raise Conflict(f"The offer is {offer.status.value}, not open.", field="offer_id", code="offer_not_open",
                       status=offer.status.value)


def withdraw_offer(session: Session, actor: Actor, offer_id: int, *, now: datetime | None = None) -> DemandOffer:
    """Staff of the offer's facility take back an open offer."""
    offer = _load_offer(session, offer_id)
    facility = _facility(session, offer.facility_id)
    if not _is_staff(actor, facility):
        raise NotFound(f"Offer {offer_id} does not exist.", field="offer_id")
    _decide(session, offer, OfferStatus.withdrawn, now or utcnow())
    session.refresh(offer)
    return offer


def _owned_offer(session: Session, actor: Actor, offer_id: int) -> tuple[DemandOffer, Demand]:
    offer = _load_offer(session, offer_id)
    demand = session.get(Demand, offer.demand_id)
    if demand is None or demand.user_id != actor.user_id:
        if demand is not None and _is_staff(actor, _facility(session, offer.facility_id)):
            raise Forbidden("Only the demand's author may decide on its offers.", field="offer_id")
        raise NotFound(f"Offer {offer_id} does not exist.", field="offer_id")
    return offer, demand


def decline_offer(session: Session, actor: Actor, offer_id: int, *, now: datetime | None = None) -> DemandOffer:
    """The demand's author turns down an open offer."""
    roles.require(actor, Action.post_demand)
    offer, _demand = _owned_offer(session, actor, offer_id)
    _decide(session, offer, OfferStatus.declined, now or utcnow())
    session.refresh(offer)
    return offer


def accept_offer(session: Session, actor: Actor, offer_id: int, *, account_id: int | None = None,
                 now: datetime | None = None) -> ServiceOrder:
    """The demand's author accepts an open offer on their open demand: a service order of the offered service
    (with its expert) is created and submitted to the provider, the offer is accepted and the demand fulfilled.

    Both the offer and the demand move by compare-and-set, so of two concurrent acceptances (of one offer, or of two
    offers of one demand) exactly one creates an order; the other gets Conflict and its transaction rolls back.
    """
    roles.require(actor, Action.post_demand)
    now = now or utcnow()
    offer, demand = _owned_offer(session, actor, offer_id)
    if offer.status != OfferStatus.open:
        raise Conflict(f"The offer is {offer.status.value}, not open.", field="offer_id", code="offer_not_open",
                       status=offer.status.value)
    fulfilled = session.execute(
        update(Demand).where(Demand.id == demand.id, Demand.status == DemandStatus.open)
        .values(status=DemandStatus.fulfilled, updated_at=now).execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    if not fulfilled:
        session.refresh(demand)
        raise Conflict(f"The demand is {demand.status.value}, not open.", field="demand_id",
                       code="demand_not_open", status=demand.status.value)
    _decide(session, offer, OfferStatus.accepted, now)
    # A deadline that has passed since the demand was posted is no wanted-by date for a new order.
    wanted_by = demand.deadline if demand.deadline and demand.deadline >= orders.facility_today(now) else None
    description = demand.text + "\n\n" + offer.message if offer.message else demand.text
    order = orders.create_order(
        session, actor, offer.service_id, title=_title(demand.text), description=description,
        wanted_by=wanted_by, account_id=account_id, expert_id=offer.expert_id,
    )
    # Accepting the offer is the author's go-ahead: the order goes to the provider's queue at once. An offer with
    # a price comes back quoted at that price (the author then accepts the quote, which holds it on the account);
    # without one, the order is quoted as any submitted order (a fixed-price service at its rate card).
    comment = f"Accepted offer #{offer.id} on demand #{demand.id}"
    if offer.price_fen is None:
        order = orders.transition(session, actor, order.id, "submitted", comment=comment)
    else:
        orders.apply_transition(session, order, OrderStatus.submitted, actor_id=actor.user_id, comment=comment)
        quotes.quote_agreed_price(session, order, offer.price_fen, created_by_id=offer.created_by,
                                  note=f"报价即已接受的响应价格 / The price of the accepted offer #{offer.id}")
    # The demand is settled: the other facilities' offers are declined with it.
    session.execute(
        update(DemandOffer)
        .where(DemandOffer.demand_id == demand.id, DemandOffer.status == OfferStatus.open,
               DemandOffer.id != offer.id)
        .values(status=OfferStatus.declined, decided_at=now).execution_options(synchronize_session=False)
    )
    try:
        with session.begin_nested():
            session.execute(
                update(DemandOffer).where(DemandOffer.id == offer.id).values(order_id=order.id)
                .execution_options(synchronize_session=False)
            )
    except IntegrityError as exc:  # order_id is unique: an order belongs to one offer
        raise Conflict("The offer was accepted meanwhile.", field="offer_id", code="offer_not_open") from exc
    session.refresh(offer)
    session.refresh(demand)
    return order


def _title(text: str) -> str:
    line = " ".join(text.split())
    return line[:ORDER_TITLE_LENGTH]

