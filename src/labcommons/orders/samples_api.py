"""Sample endpoints under /api/v1: registering samples, custody events, labels."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Header, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy.orm import Session

from labcommons import i18n
from labcommons.actor import Actor
from labcommons.config import get_settings
from labcommons.db import Database
from labcommons.http import Id, idempotent_post, request_db, require_scope
from labcommons.i18n import gettext_ as _
from labcommons.idempotency import Outcome
from labcommons.orders import labels, samples, service
from labcommons.orders.models import CustodyEvent, Sample, SampleEvent, SampleStatus, ServiceOrder

router = APIRouter(tags=["orders"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API token"},
    403: {"description": "The token lacks the scope, or only facility staff may do this (`staff_only`)"},
    404: {"description": "Unknown order or sample, or not yours to see"},
    409: {"description": "`illegal_custody_event` (with `allowed`) or `order_status_forbids`"},
    422: {"description": "Invalid input; `field` names it"},
}
Reader = Annotated[Actor, Depends(require_scope("orders:read"))]
Writer = Annotated[Actor, Depends(require_scope("orders:write"))]
Description = Annotated[str, StringConstraints(max_length=samples.MAX_DESCRIPTION)]


class SampleEventRead(BaseModel):
    id: int
    event: CustodyEvent
    at: datetime
    actor_id: int | None
    actor_name: str | None
    location: str
    note: str


class SampleRead(BaseModel):
    id: int
    order_id: int
    order_number: str | None
    position: int
    code: str
    description: str
    status: SampleStatus
    location: str
    created_at: datetime
    received_at: datetime | None
    # The custody events the caller may record now (none for the customer).
    allowed_events: list[CustodyEvent]
    label_url: str
    events: list[SampleEventRead]

    @classmethod
    def of(cls, sample: Sample, order: ServiceOrder, events: list[SampleEvent], names: dict[int, str],
           staff: bool) -> SampleRead:
        return cls(
            id=sample.id, order_id=order.id, order_number=order.number, position=sample.position, code=sample.code,
            description=sample.description, status=sample.status, location=sample.location,
            created_at=sample.created_at, received_at=samples.received_at(events),
            allowed_events=[CustodyEvent(e) for e in samples.allowed_events(sample, order)] if staff else [],
            label_url=f"/api/v1/samples/{sample.id}/label.svg",
            events=[SampleEventRead(id=e.id, event=e.event, at=e.at, actor_id=e.actor_id,
                                    actor_name=names.get(e.actor_id) if e.actor_id is not None else None,
                                    location=e.location, note=e.note) for e in events],
        )


class SampleList(BaseModel):
    items: list[SampleRead]


class SampleCreate(BaseModel):
    """Samples to register: one description per sample, or only their number. Staff may receive them at once."""

    model_config = ConfigDict(extra="forbid")

    descriptions: list[Description] | None = Field(default=None, max_length=samples.MAX_SAMPLES_PER_REQUEST)
    count: int | None = Field(default=None, ge=1, le=samples.MAX_SAMPLES_PER_REQUEST)
    receive: bool = False
    location: str = Field(default="", max_length=samples.MAX_LOCATION)
    note: str = Field(default="", max_length=samples.MAX_NOTE)


class CustodyEventCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event: CustodyEvent
    location: str = Field(default="", max_length=samples.MAX_LOCATION)
    note: str = Field(default="", max_length=samples.MAX_NOTE)


def _is_staff(actor: Actor, order: ServiceOrder) -> bool:
    return service.Party.staff in service.parties_of(actor, order)


def _read_all(session: Session, actor: Actor, order: ServiceOrder,
              rows: list[tuple[Sample, list[SampleEvent]]]) -> list[SampleRead]:
    names = samples.sample_actor_names(session, rows)
    staff = _is_staff(actor, order)
    return [SampleRead.of(s, order, events, names, staff) for s, events in rows]


@router.get("/orders/{order_id}/samples", response_model=SampleList, responses=ERRORS)
def list_order_samples(order_id: Id, actor: Reader, db: Annotated[Database, Depends(request_db)]) -> SampleList:
    """The samples of an order with their custody trail, for its customer and the facility's staff."""
    with db.unit_of_work(write=False) as session:
        order, rows = samples.list_samples(session, actor, order_id)
        return SampleList(items=_read_all(session, actor, order, rows))


@router.post("/orders/{order_id}/samples", status_code=201, response_model=SampleList, responses=ERRORS)
def register_samples(
    order_id: Id,
    body: SampleCreate,
    request: Request,
    actor: Writer,
    db: Annotated[Database, Depends(request_db)],
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    """Register samples (codes <order number>-S01, -S02, …): the customer announces expected ones; staff may
    receive them in the same step (`receive: true`), which moves an accepted order to samples_received."""

    def work(session: Session) -> Outcome:
        created = samples.register_samples(
            session, actor, order_id, descriptions=body.descriptions, count=body.count, receive=body.receive,
            location=body.location, note=body.note,
        )
        order = service.get_order(session, actor, order_id)
        rows = [(s, samples.custody_events(session, s)) for s in created]
        items = _read_all(session, actor, order, rows)
        return Outcome(201, SampleList(items=items).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


# Declared before /samples/{sample_id}: "by-code" is not a sample id.
@router.get("/samples/by-code/{code}", response_model=SampleRead, responses=ERRORS)
def sample_by_code(
    code: Annotated[str, Path(max_length=64)], actor: Reader, db: Annotated[Database, Depends(request_db)]
) -> SampleRead:
    """The sample with a label code, as a scanner reads it."""
    with db.unit_of_work(write=False) as session:
        sample, order, events = samples.find_by_code(session, actor, code)
        return _read_all(session, actor, order, [(sample, events)])[0]


@router.get("/samples/{sample_id}", response_model=SampleRead, responses=ERRORS)
def get_sample(sample_id: Id, actor: Reader, db: Annotated[Database, Depends(request_db)]) -> SampleRead:
    """One sample with its chain of custody (who, when, where)."""
    with db.unit_of_work(write=False) as session:
        sample, order, events = samples.get_sample(session, actor, sample_id)
        return _read_all(session, actor, order, [(sample, events)])[0]


@router.post("/samples/{sample_id}/events", status_code=201, response_model=SampleRead, responses=ERRORS)
def record_custody_event(
    sample_id: Id,
    body: CustodyEventCreate,
    request: Request,
    actor: Writer,
    db: Annotated[Database, Depends(request_db)],
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    """Record a custody step (received, stored with a location, consumed, returned, disposed); facility staff
    only. 409 `illegal_custody_event` lists the events allowed next."""

    def work(session: Session) -> Outcome:
        sample, order = samples.record_event(session, actor, sample_id, body.event, location=body.location,
                                             note=body.note)
        read = _read_all(session, actor, order, [(sample, samples.custody_events(session, sample))])[0]
        return Outcome(201, read.model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.get(
    "/samples/{sample_id}/label.svg", response_class=Response, responses={
        **ERRORS, 200: {"content": {"image/svg+xml": {}}, "description": "A 62 mm × 29 mm label"}},
)
def sample_label(sample_id: Id, actor: Reader, db: Annotated[Database, Depends(request_db)]) -> Response:
    """The sample's printable label as SVG: QR code, Code 128 barcode, code, order number, description, date."""
    with db.unit_of_work(write=False) as session:
        sample, order, events = samples.get_sample(session, actor, sample_id)
    arrived = samples.received_at(events)
    zone = ZoneInfo(get_settings().default_timezone)
    text = labels.LabelText(
        code=sample.code, order_number=order.number or "", description=sample.description,
        received_on=arrived.astimezone(zone).date() if arrived else None,
        received_caption=_("Received"),
    )
    headers = {"Content-Disposition": f'inline; filename="{sample.code}.svg"', "Content-Language":
               "zh-CN" if i18n.get_locale() == "zh_CN" else "en"}
    return Response(labels.label_svg(text), media_type="image/svg+xml", headers=headers)
