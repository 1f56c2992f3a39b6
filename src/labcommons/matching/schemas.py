"""API shapes of demand matching: match requests and results, saved demands, offers, subscriptions, the providers'
inbox and the expert directory. Money is integer fen (`*_fen`); a float or a boolean for a number is refused."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt

from labcommons.db import MAX_ID
from labcommons.http import Day
from labcommons.matching import demands, experts
from labcommons.matching.models import Availability, Demand, DemandStatus, Expert, ItemKind, OfferStatus
from labcommons.matching.service import MAX_LIMIT, MAX_TEXT


def _no_nul(value: str) -> str:
    # PostgreSQL cannot store NUL in text; refuse it here, naming the field, rather than fail on the insert.
    if "\x00" in value:
        raise ValueError("text may not contain the NUL character")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
DbId = Annotated[StrictInt, Field(gt=0, le=MAX_ID)]
Fen = Annotated[StrictInt, Field(ge=0, le=demands.MAX_FEN)]
Limit = Annotated[StrictInt, Field(ge=1, le=MAX_LIMIT)]
RegionCode = Annotated[str, Field(max_length=16)]
DemandText = Annotated[Text, Field(max_length=MAX_TEXT)]
Short = Annotated[Text, Field(max_length=100)]
Item = Annotated[Text, Field(min_length=1, max_length=experts.MAX_ITEM_LENGTH)]
Items = Annotated[list[Item], Field(max_length=experts.MAX_LIST_ITEMS)]
Score = Annotated[float, Field(ge=0, le=1, strict=True)]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Names(BaseModel):
    zh: str
    en: str


# --- matching ---------------------------------------------------------------------------------------------------


class MatchRequest(_Input):
    """A demand in the user's own words (Chinese, English or both); nothing is saved."""

    text: DemandText
    region: RegionCode | None = Field(default=None, description="Prefer items of this region (CQ, SC)")
    limit: Limit | None = None
    types: list[ItemKind] | None = Field(default=None, max_length=3, description="Only these kinds of result")


class MatchResponse(BaseModel):
    mode: str = Field(description="hybrid: keywords and semantic embeddings; keyword: keywords only")
    notice: str | None
    took_ms: float
    index_size: int
    corrections: dict[str, str]
    results: list[dict[str, Any]]


class MatchingStatus(BaseModel):
    documents: int
    dirty: int
    mode: str
    model: str | None
    notice: str | None


# --- demands ----------------------------------------------------------------------------------------------------


class DemandCreate(_Input):
    """A demand to save with its matches; shared with subscribed providers unless `share_with_providers` is false."""

    text: DemandText
    budget_fen: Fen | None = None
    deadline: Day | None = None
    region: RegionCode | None = None
    sample_type: Annotated[Text, Field(max_length=demands.MAX_SAMPLE_TYPE)] = ""
    share_with_providers: StrictBool = True
    limit: Limit = 10


class DemandRead(BaseModel):
    id: int
    text: str
    budget_fen: int | None
    deadline: date | None
    region: str | None
    sample_type: str
    share_with_providers: bool
    status: DemandStatus
    mode: str
    created_at: datetime
    updated_at: datetime
    mine: bool = Field(description="Whether the caller posted it (otherwise they see it as a provider)")

    @classmethod
    def of(cls, d: Demand, *, mine: bool) -> DemandRead:
        return cls(id=d.id, text=d.text, budget_fen=d.budget_fen, deadline=d.deadline, region=d.region_code,
                   sample_type=d.sample_type, share_with_providers=d.share_with_providers, status=d.status,
                   mode=d.mode, created_at=d.created_at, updated_at=d.updated_at, mine=mine)


class DemandSummary(DemandRead):
    match_count: int
    open_offers: int


class DemandList(BaseModel):
    items: list[DemandSummary]


class SavedMatch(BaseModel):
    rank: int
    type: str
    id: int
    code: str
    name: Names
    score: float
    facility_id: int | None
    provider: dict[str, Names]
    region: str | None
    category: str | None
    available: bool = Field(description="False when the item was retired or switched off since")
    explanation: dict[str, Any]

    @classmethod
    def of(cls, m: demands.MatchView) -> SavedMatch:
        return cls(rank=m.rank, type=m.kind, id=m.item_id, code=m.code, name=Names(zh=m.name_zh, en=m.name_en),
                   score=round(m.score, 4), facility_id=m.facility_id,
                   provider={"facility": Names(zh=m.facility_name_zh, en=m.facility_name_en),
                             "institution": Names(zh=m.institution_name_zh, en=m.institution_name_en)},
                   region=m.region, category=m.category, available=m.available, explanation=m.explanation)


class OfferRead(BaseModel):
    id: int
    demand_id: int
    facility_id: int
    facility_name: Names
    service_id: int
    service_name: Names
    expert_id: int | None
    expert_name: Names | None
    message: str
    price_fen: int | None
    available_from: date | None
    status: OfferStatus
    order_id: int | None
    created_at: datetime
    decided_at: datetime | None

    @classmethod
    def of(cls, v: demands.OfferView) -> OfferRead:
        o = v.offer
        expert = None if v.expert_name_zh is None else Names(zh=v.expert_name_zh, en=v.expert_name_en or "")
        return cls(id=o.id, demand_id=o.demand_id, facility_id=o.facility_id,
                   facility_name=Names(zh=v.facility_name_zh, en=v.facility_name_en), service_id=o.service_id,
                   service_name=Names(zh=v.service_name_zh, en=v.service_name_en), expert_id=o.expert_id,
                   expert_name=expert, message=o.message, price_fen=o.price_fen, available_from=o.available_from,
                   status=o.status, order_id=o.order_id, created_at=o.created_at, decided_at=o.decided_at)


class DemandDetail(DemandRead):
    matches: list[SavedMatch]
    offers: list[OfferRead]
    facility_ids: list[int] = Field(description="Facilities of the caller that may answer the demand")

    @classmethod
    def of_view(cls, v: demands.DemandView) -> DemandDetail:
        return cls(**DemandRead.of(v.demand, mine=v.is_owner).model_dump(),
                   matches=[SavedMatch.of(m) for m in v.matches], offers=[OfferRead.of(o) for o in v.offers],
                   facility_ids=v.facility_ids)


# --- offers -----------------------------------------------------------------------------------------------------


class OfferCreate(_Input):
    """A facility's answer to a demand: one of its active services, a message, optionally a price, a first
    available day and the expert who would consult."""

    facility_id: DbId
    service_id: DbId
    message: Annotated[Text, Field(max_length=demands.MAX_MESSAGE)]
    price_fen: Fen | None = None
    available_from: Day | None = None
    expert_id: DbId | None = None


class OfferAccept(_Input):
    # The funding account the order will be charged to; omitted: the caller's only account.
    account_id: DbId | None = None


class OrderRef(BaseModel):
    id: int
    number: str
    status: str


class OfferAccepted(BaseModel):
    offer: OfferRead
    order: OrderRef


# --- subscriptions and the inbox --------------------------------------------------------------------------------


class SubscriptionUpdate(_Input):
    active: StrictBool = True
    min_score: Score = demands.DEFAULT_MIN_SCORE
    notify_email: StrictBool = True


class SubscriptionRead(BaseModel):
    facility_id: int
    subscribed: bool = Field(description="Whether the facility has a subscription (active or paused)")
    active: bool
    min_score: float
    notify_email: bool
    updated_at: datetime | None


class InboxItem(BaseModel):
    demand: DemandRead
    best_score: float
    matches: list[SavedMatch]
    offered: bool = Field(description="Whether the facility has an open offer on the demand")
    offer: OfferRead | None = Field(description="The facility's latest offer on it, in any status")


class InboxRead(BaseModel):
    facility_id: int
    subscribed: bool = Field(description="False: the facility does not subscribe, and the inbox is empty")
    min_score: float | None
    items: list[InboxItem]


# --- experts ----------------------------------------------------------------------------------------------------


class ExpertRead(BaseModel):
    id: int
    code: str
    name: Names
    title: Names
    bio: Names
    fields: list[str]
    skills_zh: list[str]
    skills_en: list[str]
    languages: list[str]
    availability: Availability
    region: str
    institution_id: int
    institution_name: Names
    facility_id: int | None
    facility_name: Names | None
    consultation_service_id: int | None
    is_active: bool

    @classmethod
    def of(cls, e: Expert) -> ExpertRead:
        facility = None if e.facility is None else Names(zh=e.facility.name_zh, en=e.facility.name_en)
        return cls(id=e.id, code=e.code, name=Names(zh=e.name_zh, en=e.name_en),
                   title=Names(zh=e.title_zh, en=e.title_en), bio=Names(zh=e.bio_zh, en=e.bio_en),
                   fields=list(e.fields or []), skills_zh=list(e.skills_zh or []), skills_en=list(e.skills_en or []),
                   languages=list(e.languages or []), availability=e.availability, region=e.region_code,
                   institution_id=e.institution_id,
                   institution_name=Names(zh=e.institution.name_zh, en=e.institution.name_en),
                   facility_id=e.facility_id, facility_name=facility,
                   consultation_service_id=e.consultation_service_id, is_active=e.is_active)


class ExpertList(BaseModel):
    items: list[ExpertRead]
    total: int


class ExpertUpdate(_Input):
    """Fields to change; the expert may change their own profile, their facility's managers every field."""

    name_zh: Annotated[Short, Field(min_length=1)] | None = None
    name_en: Annotated[Short, Field(min_length=1)] | None = None
    title_zh: Short | None = None
    title_en: Short | None = None
    bio_zh: Annotated[Text, Field(max_length=experts.MAX_BIO)] | None = None
    bio_en: Annotated[Text, Field(max_length=experts.MAX_BIO)] | None = None
    fields: Items | None = None
    skills_zh: Items | None = None
    skills_en: Items | None = None
    languages: Annotated[list[Annotated[Text, Field(min_length=1, max_length=experts.MAX_LANGUAGE_LENGTH)]],
                         Field(max_length=experts.MAX_LIST_ITEMS)] | None = None
    availability: Availability | None = None
    consultation_service_id: DbId | None = None
    is_active: StrictBool | None = None
    user_id: DbId | None = None


class ExpertCreate(ExpertUpdate):
    facility_id: DbId
    code: Annotated[Text, Field(min_length=1, max_length=40)]
    name_zh: Annotated[Short, Field(min_length=1)]
    name_en: Annotated[Short, Field(min_length=1)]
