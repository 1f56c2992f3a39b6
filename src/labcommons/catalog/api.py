"""Catalogue endpoints under /api/v1."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.catalog import service
from labcommons.catalog.models import InstrumentStatus, ServiceKind
from labcommons.catalog.schemas import (
    FacetValueRead,
    InstrumentPage,
    InstrumentRead,
    InstrumentSummary,
    Named,
    ServiceCreate,
    ServicePage,
    ServiceRead,
    ServiceSummary,
    ServiceUpdate,
)
from labcommons.db import Database
from labcommons.http import Id, Instant, idempotent_post, request_db, require_scope
from labcommons.idempotency import Outcome

router = APIRouter(tags=["catalogue"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API token"},
    403: {"description": "Your roles or the token's scopes do not allow this"},
    404: {"description": "Unknown service or facility"},
    409: {"description": "Conflicts with the current state, e.g. duplicate_code"},
    422: {"description": "Invalid input; `field` names it and `error` the rule"},
}
Admin = Annotated[Actor, Depends(require_scope("admin"))]


@router.get("/instruments", response_model=InstrumentPage)
def search_instruments(
    db: Annotated[Database, Depends(request_db)],
    q: Annotated[str, Query(max_length=200, description="Keywords in Chinese or English")] = "",
    region: Annotated[str | None, Query(max_length=16)] = None,
    category: Annotated[
        str | None, Query(max_length=32, description="A taxonomy code; a parent matches its children")
    ] = None,
    institution: Annotated[str | None, Query(max_length=40, description="An institution code")] = None,
    status: InstrumentStatus | None = None,
    free_from: Instant | None = None,
    free_to: Instant | None = None,
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
def get_instrument(instrument_id: Id, db: Annotated[Database, Depends(request_db)]) -> InstrumentRead:
    """One instrument with its facility, booking rules and descriptions."""
    with db.unit_of_work(write=False) as session:
        return InstrumentRead.of(service.get_instrument(session, instrument_id))


@router.get("/services", response_model=ServicePage, responses=ERRORS)
def search_services(
    db: Annotated[Database, Depends(request_db)],
    q: Annotated[str, Query(max_length=200, description="Keywords in Chinese or English")] = "",
    kind: ServiceKind | None = None,
    region: Annotated[str | None, Query(max_length=16)] = None,
    institution: Annotated[str | None, Query(max_length=40, description="An institution code")] = None,
    category: Annotated[
        str | None, Query(max_length=32, description="A taxonomy code; a parent matches its children")
    ] = None,
    facility: Annotated[str | None, Query(max_length=40, description="A facility code")] = None,
    include_inactive: Annotated[bool, Query(description="Also list services no longer offered")] = False,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
    facets: Annotated[bool, Query(description="Include facet counts (kind, region, institution, category)")] = False,
) -> ServicePage:
    """Search the facilities' services (testing, R&D, consultation); prices are integer fen, null = on request."""
    query = service.ServiceQuery(
        q=q, kind=kind, region=region, institution=institution, category=category, facility=facility,
        include_inactive=include_inactive,
    )
    with db.unit_of_work(write=False) as session:
        page = service.search_services(session, query, limit=limit, cursor=cursor, with_facets=facets)
        ids = [s.id for s in page.items]
        ratings = service.service_ratings(session, ids)
        schemes = service.service_schemes(session, ids)
        return ServicePage(
            items=[ServiceSummary.of(s, schemes=schemes[s.id], rating=ratings.get(s.id)) for s in page.items],
            next_cursor=page.next_cursor,
            facets={k: [FacetValueRead.model_validate(v) for v in vs] for k, vs in page.facets.items()}
            if page.facets is not None else None,
        )


@router.get("/services/{service_id}", response_model=ServiceRead, responses=ERRORS)
def get_service(service_id: Id, db: Annotated[Database, Depends(request_db)]) -> ServiceRead:
    """One service: prices, turnaround, sample requirements, accreditations, instruments used, rating."""
    with db.unit_of_work(write=False) as session:
        return ServiceRead.of_detail(service.get_service(session, service_id))


@router.post("/services", status_code=201, response_model=ServiceRead, responses=ERRORS)
def create_service(
    body: ServiceCreate,
    request: Request,
    actor: Admin,
    db: Annotated[Database, Depends(request_db)],
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    """Add a service to a facility the caller manages (edit_facility_catalogue); retries with one
    Idempotency-Key are safe."""

    def work(session: Session) -> Outcome:
        facility = service.facility_for_editing(session, actor, body.facility)
        fields = body.model_dump(exclude={"facility", "code", "accreditations"})
        created = service.create_service(
            session, actor, facility.id, code=body.code,
            accreditations=[a.model_dump() for a in body.accreditations], **fields,
        )
        return Outcome(201, ServiceRead.of_detail(service.get_service(session, created.id)).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.patch("/services/{service_id}", response_model=ServiceRead, responses=ERRORS)
def update_service(
    service_id: Id, body: ServiceUpdate, actor: Admin, db: Annotated[Database, Depends(request_db)]
) -> ServiceRead:
    """Change a service; only the fields sent change. Deactivate with is_active false (services are never
    deleted: orders refer to them)."""
    fields = body.model_dump(exclude_unset=True, exclude={"accreditations"})
    if body.accreditations is not None:
        fields["accreditations"] = [a.model_dump() for a in body.accreditations]
    with db.unit_of_work() as session:
        service.update_service(session, actor, service_id, **fields)
        return ServiceRead.of_detail(service.get_service(session, service_id))


@router.get("/categories", response_model=list[Named])
def list_categories(db: Annotated[Database, Depends(request_db)]) -> list[Named]:
    """The instrument taxonomy."""
    with db.unit_of_work(write=False) as session:
        return [Named(code=c.code, name_zh=c.name_zh, name_en=c.name_en) for c in service.list_categories(session)]


@router.get("/regions", response_model=list[Named])
def list_regions(db: Annotated[Database, Depends(request_db)]) -> list[Named]:
    with db.unit_of_work(write=False) as session:
        return [Named(code=r.code, name_zh=r.name_zh, name_en=r.name_en) for r in service.list_regions(session)]
