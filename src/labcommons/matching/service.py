"""Demand matching: rank instruments, services and experts for a demand in the user's own words, and explain
each result (terms and thesaurus concepts matched, category, semantic similarity, region, price, earliest free
slot). Saving a demand keeps its matches; see matching/demands.py for demands, subscriptions and offers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from labcommons.actor import Actor
from labcommons.booking import service as booking
from labcommons.catalog import service as catalog
from labcommons.catalog.models import Category, Facility, Institution, Instrument, InstrumentStatus, Region, Service
from labcommons.db import utcnow
from labcommons.errors import InvalidInput
from labcommons.matching import embeddings
from labcommons.matching import text as mtext
from labcommons.matching.index import Candidate, MatchIndex, QueryPlan, document_tokens, load_index
from labcommons.matching.models import Expert, ItemKind

MAX_TEXT = 2000
MAX_LIMIT = 50
DEFAULT_LIMIT = 10
# How far ahead the earliest free slot of an instrument is looked for.
SLOT_HORIZON = timedelta(days=30)
KEYWORD_NOTICE = "Semantic ranking is unavailable ({reason}); results are ranked by keywords only."


@dataclass
class MatchResult:
    """One ranked item with everything the results page and the API show about it."""

    type: str
    id: int
    code: str
    name_zh: str
    name_en: str
    score: float
    category: str | None
    category_name_zh: str
    category_name_en: str
    region: str | None
    facility_id: int | None
    facility_name_zh: str
    facility_name_en: str
    institution_name_zh: str
    institution_name_en: str
    explanation: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "type": self.type, "id": self.id, "code": self.code, "name": {"zh": self.name_zh, "en": self.name_en},
            "score": round(self.score, 4), "category": self.category, "region": self.region,
            "facility_id": self.facility_id,
            "provider": {"facility": {"zh": self.facility_name_zh, "en": self.facility_name_en},
                         "institution": {"zh": self.institution_name_zh, "en": self.institution_name_en}},
            "explanation": self.explanation,
        }


@dataclass
class MatchOutcome:
    mode: str  # "hybrid" | "keyword"
    notice: str | None
    results: list[MatchResult]
    took_ms: float
    corrections: dict[str, str] = field(default_factory=dict)
    index_size: int = 0


def check_demand_text(text: Any) -> str:
    """The demand text, stripped; a clear error when it is missing or too long."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("Describe what you need.", field="text", code="missing_field")
    if len(text) > MAX_TEXT:
        raise InvalidInput(f"The text is too long ({MAX_TEXT} characters at most).", field="text", code="too_long")
    if "\x00" in text or not _encodable(text):
        raise InvalidInput("The text contains characters that are not valid text.", field="text",
                           code="invalid_text")
    return text.strip()


def _encodable(text: str) -> bool:
    # A lone surrogate ("\ud800") survives JSON decoding but no database or model can take it.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_region(session: Session, region: str | None) -> str | None:
    if region is None or region == "":
        return None
    if session.get(Region, region) is None:
        raise InvalidInput(f"Unknown region {region!r}.", field="region", code="unknown_region")
    return region


def check_limit(limit: int | None) -> int:
    if limit is None:
        return DEFAULT_LIMIT
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be 1 to {MAX_LIMIT}.", field="limit", code="out_of_range")
    return limit


def match(
    session: Session,
    actor: Actor | None,
    text: str,
    *,
    region: str | None = None,
    limit: int | None = None,
    kinds: Sequence[str] | None = None,
    now: datetime | None = None,
    details: bool = True,
) -> MatchOutcome:
    """Rank what can serve a demand; nothing is saved. `details=False` skips prices and free slots (benchmarks)."""
    started = time.perf_counter()
    text = check_demand_text(text)
    region = check_region(session, region)
    limit = check_limit(limit)
    wanted_kinds = set(kinds or [])
    unknown = wanted_kinds - {k.value for k in ItemKind}
    if unknown:
        raise InvalidInput(f"Unknown result type {sorted(unknown)[0]!r}.", field="types", code="invalid_choice")
    index = load_index(session)
    encoder = embeddings.get_encoder()
    plan = index.plan(text)
    # Ask for more than needed: some are dropped below (instruments the user may not book).
    candidates, mode = index.rank(plan, encoder=encoder, region=region, limit=limit * 3 + 10,
                                  kinds=wanted_kinds or None)
    results = _describe(session, actor, index, plan, candidates, region, limit, now or utcnow(), details)
    notice = None
    if mode == "keyword":
        reason = embeddings.unavailable_reason()
        if reason is not None:
            notice = KEYWORD_NOTICE.format(reason=reason)
        elif encoder is not None and not plan.semantic_text:
            notice = "No English gist could be derived from this demand; ranked by keywords only."
        elif encoder is not None:
            notice = ("The catalogue's embeddings are not computed yet (run `labcommons matching reindex`); "
                      "ranked by keywords only.")
    return MatchOutcome(
        mode=mode, notice=notice, results=results, took_ms=(time.perf_counter() - started) * 1000,
        corrections=plan.corrections, index_size=index.size,
    )


def _describe(
    session: Session, actor: Actor | None, index: MatchIndex, plan: QueryPlan, candidates: list[Candidate],
    region: str | None, limit: int, now: datetime, details: bool,
) -> list[MatchResult]:
    by_kind: dict[str, list[int]] = {}
    for c in candidates:
        by_kind.setdefault(c.kind, []).append(c.item_id)
    instruments = {
        i.id: i for i in session.scalars(
            select(Instrument).where(Instrument.id.in_(by_kind.get("instrument", [])))
            .options(joinedload(Instrument.facility), joinedload(Instrument.institution))
        )
    }
    services = {
        s.id: s for s in session.scalars(
            select(Service).where(Service.id.in_(by_kind.get("service", []))).options(joinedload(Service.facility))
        )
    }
    experts = {
        e.id: e for e in session.scalars(
            select(Expert).where(Expert.id.in_(by_kind.get("expert", [])))
            .options(joinedload(Expert.institution), joinedload(Expert.facility))
        )
    }
    kept: list[tuple[Candidate, Any]] = []
    for c in candidates:
        pools: dict[str, dict[int, Any]] = {"instrument": instruments, "service": services, "expert": experts}
        item = pools[c.kind].get(c.item_id)
        if item is None:
            continue
        if c.kind == "instrument":
            if item.status == InstrumentStatus.retired:
                continue
            if not _may_book(actor, item):
                continue
        elif (c.kind == "service" and not item.is_active) or (c.kind == "expert" and not item.is_active):
            continue
        kept.append((c, item))
        if len(kept) >= limit:
            break
    if not kept:
        return []
    facility_ids = {getattr(item, "facility_id", None) for _, item in kept} - {None}
    facilities = {
        f.id: f for f in session.scalars(
            select(Facility).where(Facility.id.in_(facility_ids)).options(joinedload(Facility.institution))
        )
    }
    institution_ids = {e.institution_id for _, e in kept if isinstance(e, Expert)}
    institutions = {i.id: i for i in session.scalars(select(Institution).where(Institution.id.in_(institution_ids)))}
    categories = {c.code: c for c in session.scalars(select(Category))}
    tokens = document_tokens(session, [(c.kind, c.item_id) for c, _ in kept])
    prices = _price_context(session, actor, kept, now) if details else None
    results: list[MatchResult] = []
    for c, item in kept:
        facility = facilities.get(getattr(item, "facility_id", None) or -1)
        institution = facility.institution if facility is not None else institutions.get(item.institution_id)
        category = categories.get(c.category_code or "")
        explanation = _explain(session, plan, c, item, tokens.get((c.kind, c.item_id), set()), region, now,
                               prices)
        results.append(MatchResult(
            type=c.kind, id=c.item_id, code=item.code, name_zh=item.name_zh, name_en=item.name_en, score=c.score,
            category=c.category_code, category_name_zh=category.name_zh if category else "",
            category_name_en=category.name_en if category else "", region=c.region_code,
            facility_id=facility.id if facility else None,
            facility_name_zh=facility.name_zh if facility else "",
            facility_name_en=facility.name_en if facility else "",
            institution_name_zh=institution.name_zh if institution else "",
            institution_name_en=institution.name_en if institution else "",
            explanation=explanation,
        ))
    return results


def _may_book(actor: Actor | None, instrument: Instrument) -> bool:
    if actor is None:
        # Anonymous visitors see what is open beyond one institution; signing in shows their own institution's.
        return catalog.instrument_is_open_to(instrument, None, instrument.region_code)
    return catalog.instrument_is_open_to(instrument, actor.institution_id, actor.region_code)


def _explain(
    session: Session, plan: QueryPlan, c: Candidate, item: Any, doc_tokens: set[str], region: str | None,
    now: datetime, prices: _PriceContext | None,
) -> dict[str, Any]:
    matched = [w for w in plan.words if w in doc_tokens]
    concepts = []
    related: list[str] = []
    for term, concept in plan.concepts:
        # A concept explains this item when the item is in the concept's field or carries one of its terms whole.
        in_field = bool(concept.category and c.category_code
                        and (c.category_code + ".").startswith(concept.category + "."))
        carried = [other for other in concept.terms
                   if other != term and len(other) >= 2 and _carries(doc_tokens, other)]
        if in_field or carried:
            concepts.append({"term": term, "category": concept.category,
                             "means": (carried or [t for t in concept.terms if t != term])[:4]})
            related.extend(t for t in carried if t not in related and t not in matched)
    explanation: dict[str, Any] = {
        "matched_terms": _readable(matched)[:12],
        "related_terms": related[:8],
        "concepts": concepts[:5],
        "category_match": c.category > 0,
        "keyword": round(c.keyword, 4),
        "semantic": None if c.semantic is None else round(c.semantic, 4),
        "category": round(c.category, 4),
        "region": c.region_code,
        "region_match": None if region is None else c.region_code == region,
        "corrections": plan.corrections,
    }
    if c.kind == "expert":
        explanation["availability"] = item.availability.value
        explanation["languages"] = list(item.languages or [])
        explanation["consultation_service_id"] = item.consultation_service_id
    if c.kind == "instrument" and item.status != InstrumentStatus.active:
        explanation["status"] = item.status.value
    if prices is not None:
        explanation["price"] = _price(prices, c.kind, item)
        if c.kind == "instrument":
            slot = earliest_free(item, now, prices.busy.get(item.id, []))
            explanation["earliest_slot"] = None if slot is None else slot.isoformat()
            explanation["earliest_slot_minutes"] = item.min_booking_minutes
    return explanation


def _carries(doc_tokens: set[str], term: str) -> bool:
    """Whether every word of a thesaurus term is among the item's tokens."""
    words = mtext.tokens(term, bigrams=False)
    return bool(words) and all(w in doc_tokens for w in words)


def _readable(tokens: list[str]) -> list[str]:
    # Drop a CJK bigram already inside a longer matched word: 「测序」 says what 「测序」+「序仪」 would.
    out: list[str] = []
    for token in sorted(tokens, key=len, reverse=True):
        if mtext.has_cjk(token) and any(token in longer for longer in out if mtext.has_cjk(longer)):
            continue
        out.append(token)
    return out


def earliest_free(instrument: Instrument, now: datetime, busy: list[tuple[datetime, datetime]]) -> datetime | None:
    """Start of the first free interval of the instrument's minimum booking length within the horizon, given its
    active bookings (start, end) in that window, in start order."""
    if instrument.status != InstrumentStatus.active:
        return None
    start = booking.align_up(now, instrument.slot_minutes)
    end = start + SLOT_HORIZON
    need = timedelta(minutes=instrument.min_booking_minutes)
    cursor = start
    for busy_start, busy_end in [*busy, (end, end)]:
        first = booking.align_up(cursor, instrument.slot_minutes)
        if min(busy_start, end) - first >= need:
            return first
        cursor = max(cursor, busy_end)
        if cursor >= end:
            break
    return None


@dataclass
class _PriceContext:
    """What pricing a page of results needs, fetched once: rates in force and the payer's institution."""

    rates: dict[str, list[Any]]
    payer: Institution | None
    services: dict[int, Service]
    # Active bookings of the listed instruments within the slot horizon, by instrument, in start order.
    busy: dict[int, list[tuple[datetime, datetime]]] = field(default_factory=dict)


def _price_context(session: Session, actor: Actor | None, kept: list[tuple[Candidate, Any]],
                   now: datetime) -> _PriceContext:
    from labcommons.billing import rates

    service_ids = {item.consultation_service_id for c, item in kept
                   if c.kind == "expert" and item.consultation_service_id is not None}
    services = {s.id: s for s in session.scalars(
        select(Service).where(Service.id.in_(service_ids)).options(joinedload(Service.facility))
    )}
    keys = [rates.target_key(instrument_id=item.id) if c.kind == "instrument" else rates.target_key(service_id=item.id)
            for c, item in kept if c.kind != "expert"]
    keys += [rates.target_key(service_id=i) for i in services]
    payer = session.get(Institution, actor.institution_id) if actor and actor.institution_id else None
    instrument_ids = [item.id for c, item in kept if c.kind == "instrument"]
    busy = booking.busy_intervals(session, instrument_ids, now, now + SLOT_HORIZON + timedelta(days=1))
    return _PriceContext(rates=rates.rates_in_force(session, keys, now.date()), payer=payer, services=services,
                         busy=busy)


def _price(prices: _PriceContext, kind: str, item: Any) -> dict[str, Any] | None:
    from labcommons.billing import rates
    from labcommons.billing.models import PayerCategory

    if kind == "expert":
        service = prices.services.get(item.consultation_service_id or -1)
        return _price(prices, "service", service) if service is not None else None
    key = rates.target_key(instrument_id=item.id) if kind == "instrument" else rates.target_key(service_id=item.id)
    in_force = prices.rates.get(key, [])
    provider_institution = item.institution_id if item.institution_id is not None else item.facility.institution_id
    if prices.payer is not None:
        category = rates.payer_category(prices.payer, provider_institution, item.region_code or "")
        rate = rates.pick_rate(in_force, category, False)
        if rate is not None:
            return {"amount_fen": rate.amount_fen, "unit": rate.unit.value, "payer_category": category.value}
    else:
        found = [r for r in (rates.pick_rate(in_force, c, False) for c in PayerCategory) if r is not None]
        if found:
            low = min(found, key=lambda r: r.amount_fen)
            return {"amount_fen": low.amount_fen, "unit": low.unit.value, "payer_category": None, "from": True}
    if kind == "service" and item.list_price_fen is not None:
        return {"amount_fen": item.list_price_fen, "unit": item.price_unit.value, "payer_category": None}
    return None
