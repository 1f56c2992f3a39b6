"""API shapes of the catalogue."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Protocol

from pydantic import BaseModel, ConfigDict, Field

from labcommons.catalog.models import Instrument, InstrumentStatus, OpenTo, PriceUnit, Service, ServiceKind
from labcommons.catalog.service import MAX_PRICE_FEN, MAX_TURNAROUND_DAYS, ServiceDetail
from labcommons.db import MAX_ID
from labcommons.http import Day


class Named(BaseModel):
    code: str
    name_zh: str
    name_en: str


class InstrumentSummary(BaseModel):
    id: int
    code: str
    name_zh: str
    name_en: str
    category: Named
    region: str
    institution: Named
    status: InstrumentStatus
    manufacturer: str
    model: str
    open_to: OpenTo

    @classmethod
    def of(cls, i: Instrument) -> InstrumentSummary:
        return cls(
            id=i.id, code=i.code, name_zh=i.name_zh, name_en=i.name_en,
            category=Named(code=i.category.code, name_zh=i.category.name_zh, name_en=i.category.name_en),
            region=i.region_code,
            institution=Named(code=i.institution.code, name_zh=i.institution.name_zh, name_en=i.institution.name_en),
            status=i.status, manufacturer=i.manufacturer, model=i.model, open_to=i.open_to,
        )


class InstrumentRead(InstrumentSummary):
    description_zh: str
    description_en: str
    facility: Named
    location_zh: str
    location_en: str
    slot_minutes: int
    min_booking_minutes: int
    max_booking_minutes: int

    @classmethod
    def of(cls, i: Instrument) -> InstrumentRead:
        base = InstrumentSummary.of(i).model_dump()
        return cls(
            **base, description_zh=i.description_zh, description_en=i.description_en,
            facility=Named(code=i.facility.code, name_zh=i.facility.name_zh, name_en=i.facility.name_en),
            location_zh=i.location_zh, location_en=i.location_en, slot_minutes=i.slot_minutes,
            min_booking_minutes=i.min_booking_minutes, max_booking_minutes=i.max_booking_minutes,
        )


class FacetValueRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    value: str
    label_zh: str
    label_en: str
    count: int
    # True when more rows matched than the facets count (catalog.service.FACET_CAP): `count` is a lower bound.
    capped: bool = False


class InstrumentPage(BaseModel):
    items: list[InstrumentSummary]
    next_cursor: str | None
    facets: dict[str, list[FacetValueRead]] | None = None


class _HasNames(Protocol):
    @property
    def code(self) -> str: ...
    @property
    def name_zh(self) -> str: ...
    @property
    def name_en(self) -> str: ...


def _named(row: _HasNames) -> Named:
    return Named(code=row.code, name_zh=row.name_zh, name_en=row.name_en)


class ServiceSummary(BaseModel):
    """A service as search results list it; prices in integer fen, null meaning a quote on request."""

    id: int
    code: str
    kind: ServiceKind
    name_zh: str
    name_en: str
    category: Named
    facility: Named
    institution: Named
    region: str
    turnaround_days: int | None
    list_price_fen: int | None
    price_unit: PriceUnit
    accreditation_schemes: list[str]
    rating_average: float | None
    rating_count: int
    is_active: bool

    @classmethod
    def of(cls, s: Service, *, schemes: list[str], rating: tuple[float, int] | None) -> ServiceSummary:
        return cls(
            id=s.id, code=s.code, kind=s.kind, name_zh=s.name_zh, name_en=s.name_en, category=_named(s.category),
            facility=_named(s.facility), institution=_named(s.facility.institution), region=s.region_code or "",
            turnaround_days=s.turnaround_days, list_price_fen=s.list_price_fen, price_unit=s.price_unit,
            accreditation_schemes=schemes, rating_average=round(rating[0], 2) if rating else None,
            rating_count=rating[1] if rating else 0, is_active=s.is_active,
        )


class ServicePage(BaseModel):
    items: list[ServiceSummary]
    next_cursor: str | None
    facets: dict[str, list[FacetValueRead]] | None = None


class AccreditationRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    scheme: str
    certificate_no: str
    valid_until: date | None


class InstrumentRef(BaseModel):
    id: int
    code: str
    name_zh: str
    name_en: str
    status: InstrumentStatus


class ServiceRead(ServiceSummary):
    """A service's details: what a customer needs to decide and order."""

    description_zh: str
    description_en: str
    sample_requirements_zh: str
    sample_requirements_en: str
    accreditations: list[AccreditationRead]
    instruments: list[InstrumentRef]

    @classmethod
    def of_detail(cls, d: ServiceDetail) -> ServiceRead:
        s = d.service
        rating = (d.rating_average, d.rating_count) if d.rating_average is not None else None
        base = ServiceSummary.of(s, schemes=[a.scheme for a in d.accreditations], rating=rating).model_dump()
        return cls(
            **base, description_zh=s.description_zh, description_en=s.description_en,
            sample_requirements_zh=s.sample_requirements_zh, sample_requirements_en=s.sample_requirements_en,
            accreditations=[AccreditationRead.model_validate(a) for a in d.accreditations],
            instruments=[InstrumentRef(id=i.id, code=i.code, name_zh=i.name_zh, name_en=i.name_en, status=i.status)
                         for i in d.instruments],
        )


PriceFen = Annotated[int, Field(ge=0, le=MAX_PRICE_FEN, strict=True, description="Integer fen (1 yuan = 100)")]
TurnaroundDays = Annotated[int, Field(ge=0, le=MAX_TURNAROUND_DAYS)]
LongText = Annotated[str, Field(max_length=5000)]
Name = Annotated[str, Field(max_length=200)]
InstrumentId = Annotated[int, Field(gt=0, le=MAX_ID)]


class AccreditationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scheme: str = Field(min_length=1, max_length=20, description="CMA, CNAS, …")
    certificate_no: str = Field(default="", max_length=80)
    valid_until: Day | None = None


class ServiceCreate(BaseModel):
    """A new service of a facility the caller manages. Without list_price_fen it is quoted on request."""

    model_config = ConfigDict(extra="forbid")

    facility: str = Field(max_length=40, description="The facility's code")
    code: str = Field(max_length=40)
    kind: ServiceKind
    name_zh: Name = ""
    name_en: Name = ""
    description_zh: LongText = ""
    description_en: LongText = ""
    sample_requirements_zh: LongText = ""
    sample_requirements_en: LongText = ""
    category_code: str = Field(max_length=32)
    turnaround_days: TurnaroundDays | None = None
    list_price_fen: PriceFen | None = None
    price_unit: PriceUnit = PriceUnit.sample
    is_active: bool = True
    accreditations: list[AccreditationIn] = Field(default_factory=list, max_length=20)
    instrument_ids: list[InstrumentId] = Field(default_factory=list, max_length=100)


class ServiceUpdate(BaseModel):
    """Only the fields sent change; list_price_fen null means quoted on request from now on."""

    model_config = ConfigDict(extra="forbid")

    kind: ServiceKind | None = None
    name_zh: Name | None = None
    name_en: Name | None = None
    description_zh: LongText | None = None
    description_en: LongText | None = None
    sample_requirements_zh: LongText | None = None
    sample_requirements_en: LongText | None = None
    category_code: str | None = Field(default=None, max_length=32)
    turnaround_days: TurnaroundDays | None = None
    list_price_fen: PriceFen | None = None
    price_unit: PriceUnit | None = None
    is_active: bool | None = None
    accreditations: list[AccreditationIn] | None = Field(default=None, max_length=20)
    instrument_ids: list[InstrumentId] | None = Field(default=None, max_length=100)
