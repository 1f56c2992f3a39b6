"""Catalogue endpoints under /api/v1."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import AwareDatetime

from labcommons.catalog import service
from labcommons.catalog.models import InstrumentStatus, ServiceKind
from labcommons.catalog.schemas import (
    FacetValueRead,
    InstrumentPage,
    InstrumentRead,
    InstrumentSummary,
    Named,
    ServiceRead,
)
from labcommons.db import Database
from labcommons.http import get_db

router = APIRouter(tags=["catalogue"])


@router.get("/instruments", response_model=InstrumentPage)
def search_instruments(
    db: Annotated[Database, Depends(get_db)],
    q: Annotated[str, Query(max_length=200, description="Keywords in Chinese or English")] = "",
    region: Annotated[str | None, Query(max_length=16)] = None,
    category: Annotated[
        str | None, Query(max_length=32, description="A taxonomy code; a parent matches its children")
    ] = None,
    institution: Annotated[str | None, Query(max_length=40, description="An institution code")] = None,
    status: InstrumentStatus | None = None,
    free_from: AwareDatetime | None = None,
    free_to: AwareDatetime | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
    facets: Annotated[bool, Query(description="Include facet counts")] = False,
) -> InstrumentPage:
    """Search the shared catalogue; filter by region, institution, category, status and a free window."""
    query = service.InstrumentQuery(
        q=q, region=region, institution=institution, category=category, status=status,
        free_from=free_from, free_to=free_to,
    )
    with db.unit_of_work(write=False) as session:
        page = service.search_instruments(session, query, limit=limit, cursor=cursor, with_facets=facets)
        return InstrumentPage(
            items=[InstrumentSummary.of(i) for i in page.items],
            next_cursor=page.next_cursor,
            facets={k: [FacetValueRead.model_validate(v) for v in vs] for k, vs in page.facets.items()}
            if page.facets is not None else None,
        )


@router.get("/instruments/{instrument_id}", response_model=InstrumentRead)
def get_instrument(instrument_id: int, db: Annotated[Database, Depends(get_db)]) -> InstrumentRead:
    """One instrument with its facility, booking rules and descriptions."""
    with db.unit_of_work(write=False) as session:
        return InstrumentRead.of(service.get_instrument(session, instrument_id))


@router.get("/services", response_model=list[ServiceRead])
def list_services(
    db: Annotated[Database, Depends(get_db)], kind: ServiceKind | None = None
) -> list[ServiceRead]:
    """The facilities' services (testing, R&D, consultation)."""
    with db.unit_of_work(write=False) as session:
        return [
            ServiceRead(
                id=s.id, code=s.code, kind=s.kind, name_zh=s.name_zh, name_en=s.name_en,
                description_zh=s.description_zh, description_en=s.description_en, category=s.category_code,
                facility=Named(code=s.facility.code, name_zh=s.facility.name_zh, name_en=s.facility.name_en),
                turnaround_days=s.turnaround_days, list_price_fen=s.list_price_fen,
            )
            for s in service.list_services(session)
            if kind is None or s.kind == kind
        ]


@router.get("/categories", response_model=list[Named])
def list_categories(db: Annotated[Database, Depends(get_db)]) -> list[Named]:
    """The instrument taxonomy."""
    with db.unit_of_work(write=False) as session:
        return [Named(code=c.code, name_zh=c.name_zh, name_en=c.name_en) for c in service.list_categories(session)]


@router.get("/regions", response_model=list[Named])
def list_regions(db: Annotated[Database, Depends(get_db)]) -> list[Named]:
    with db.unit_of_work(write=False) as session:
        return [Named(code=r.code, name_zh=r.name_zh, name_en=r.name_en) for r in service.list_regions(session)]
