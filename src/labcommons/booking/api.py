"""Booking and availability endpoints under /api/v1."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.booking import service
from labcommons.booking.models import BookingStatus
from labcommons.booking.schemas import AvailabilityRead, BookingCreate, BookingPage, BookingRead, SlotList, SlotRead
from labcommons.catalog.service import InstrumentQuery
from labcommons.db import Database, utcnow
from labcommons.http import Id, Instant, idempotent_post, link, request_db, require_scope
from labcommons.idempotency import Outcome

router = APIRouter(tags=["booking"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API token"},
    403: {"description": "The token lacks the scope the route needs (`insufficient_scope`)"},
    404: {"description": "Unknown instrument or booking"},
    409: {"description": "Conflicts with the current state, e.g. overlapping_booking"},
    422: {"description": "Invalid input; `field` names it"},
}
# OpenAPI links: what a client (and the stateful fuzzer) can do next with the booking it made.
BOOKING_LINKS = {
    "GetBooking": link("get_booking_api_v1_bookings__booking_id__get", booking_id="id"),
    "CancelBooking": link("cancel_booking_api_v1_bookings__booking_id__cancel_post", booking_id="id"),
}


@router.get("/instruments/{instrument_id}/availability", response_model=AvailabilityRead, responses=ERRORS)
def instrument_availability(
    instrument_id: Id,
    db: Annotated[Database, Depends(request_db)],
    from_: Annotated[Instant, Query(alias="from")],
    to: Instant,
) -> AvailabilityRead:
    """Free and busy intervals of one instrument in [from, to) (at most 62 days)."""
    with db.unit_of_work(write=False) as session:
        return AvailabilityRead.of(service.availability(session, instrument_id, from_, to))


@router.get("/slots/earliest", response_model=SlotList, responses=ERRORS)
def earliest_slot(
    db: Annotated[Database, Depends(request_db)],
    duration_minutes: Annotated[int, Query(ge=1, le=44640)],
    q: Annotated[str, Query(max_length=200)] = "",
    category: Annotated[str | None, Query(max_length=32)] = None,
    region: Annotated[str | None, Query(max_length=16)] = None,
    institution: Annotated[str | None, Query(max_length=40)] = None,
    after: Instant | None = None,
    limit: Annotated[int, Query(ge=1, le=20)] = 5,
) -> SlotList:
    """The earliest free slots of the given length after a time, one per matching instrument, soonest first."""
    query = InstrumentQuery(q=q, category=category, region=region, institution=institution)
    start: datetime = max(after, utcnow()) if after else utcnow()
    with db.unit_of_work(write=False) as session:
        slots = service.earliest_slots(session, query, duration_minutes, start, limit=limit)
        return SlotList(items=[SlotRead.of(s) for s in slots])


@router.post("/bookings", status_code=201, response_model=BookingRead,
             responses={**ERRORS, 201: {"description": "The booking", "links": BOOKING_LINKS}})
def create_booking(
    body: BookingCreate,
    request: Request,
    actor: Annotated[Actor, Depends(require_scope("bookings:write"))],
    db: Annotated[Database, Depends(request_db)],
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    """Book time on an instrument. 409 `overlapping_booking` when taken; retries with one Idempotency-Key are safe."""

    def work(session: Session) -> Outcome:
        booking = service.reserve_slot(
            session, actor, body.instrument_id, body.starts_at, body.ends_at, body.purpose,
            account_id=body.account_id,
        )
        return Outcome(201, BookingRead.of(booking).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.get("/bookings", response_model=BookingPage, responses=ERRORS)
def list_my_bookings(
    actor: Annotated[Actor, Depends(require_scope("bookings:read"))],
    db: Annotated[Database, Depends(request_db)],
    status: BookingStatus | None = None,
    period: service.BookingPeriod = service.BookingPeriod.all,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> BookingPage:
    """The caller's bookings: all or upcoming by start time, past newest first."""
    with db.unit_of_work(write=False) as session:
        rows, next_cursor = service.list_bookings(
            session, actor, status=status, period=period, limit=limit, cursor=cursor
        )
        return BookingPage(items=[BookingRead.of(b) for b in rows], next_cursor=next_cursor)


@router.get("/bookings/{booking_id}", response_model=BookingRead, responses=ERRORS)
def get_booking(
    booking_id: Id,
    actor: Annotated[Actor, Depends(require_scope("bookings:read"))],
    db: Annotated[Database, Depends(request_db)],
) -> BookingRead:
    """One of the caller's bookings; anyone else's is 404."""
    with db.unit_of_work(write=False) as session:
        return BookingRead.of(service.get_booking(session, actor, booking_id))


@router.post("/bookings/{booking_id}/cancel", response_model=BookingRead, responses=ERRORS)
def cancel_booking(
    booking_id: Id,
    request: Request,
    actor: Annotated[Actor, Depends(require_scope("bookings:write"))],
    db: Annotated[Database, Depends(request_db)],
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    """Cancel one of the caller's bookings; its time becomes free at once."""

    def work(session: Session) -> Outcome:
        booking = service.cancel_booking(session, actor, booking_id)
        return Outcome(200, BookingRead.of(booking).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, None, work)


