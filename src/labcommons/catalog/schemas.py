"""API shapes of the catalogue."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from labcommons.catalog.models import Instrument, InstrumentStatus, OpenTo, ServiceKind


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


class InstrumentPage(BaseModel):
    items: list[InstrumentSummary]
    next_cursor: str | None
    facets: dict[str, list[FacetValueRead]] | None = None


class ServiceRead(BaseModel):
    id: int
    code: str
    kind: ServiceKind
    name_zh: str
    name_en: str
    description_zh: str
    description_en: str
    category: str
    facility: Named
    turnaround_days: int | None
    list_price_fen: int | None
