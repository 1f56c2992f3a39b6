"""API of maintenance blocks, recurring bookings and the waitlist under /api/v1."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from labcommons.actor import Actor
from labcommons.booking import maintenance, recurrence, waitlist
from labcommons.booking.models import Booking, WaitlistEntry, WaitlistStatus
from labcommons.booking.schemas import BookingRead
from labcommons.db import MAX_ID, Database
from labcommons.http import Id, Instant, link, request_db, require_scope

router = APIRouter(tags=["booking"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API token"},
    403: {"description": "Not allowed, or the token lacks the scope the route needs"},
    404: {"description": "Unknown instrument, block or waitlist entry"},
    409: {"description": "Conflicts with the current state (displaced bookings, taken or free slots)"},
    422: {"description": "Invalid input; `field` names it"},
}


# --- maintenance -----------------------------------------------------------------------------------------


class MaintenanceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    starts_at: Instant
    ends_at: Instant
    reason: str = Field(min_length=1, max_length=2000)
    confirm: bool = False


class MaintenanceRead(BaseModel):
    id: int
    instrument_id: int
    starts_at: datetime
    ends_at: datetime
    reason: str
    status: str
    created_by_id: int

    @classmethod
    def of(cls, b: Booking) -> MaintenanceRead:
        return cls(id=b.id, instrument_id=b.instrument_id, starts_at=b.starts_at, ends_at=b.ends_at, reason=b.purpose,
                   status=b.status.value, created_by_id=b.user_id)


class DisplacedRead(BaseModel):
    booking_id: int
    user_id: int
    starts_at: datetime
    ends_at: datetime


class MaintenanceCreated(BaseModel):
    block: MaintenanceRead
    displaced: list[DisplacedRead]


class MaintenanceList(BaseModel):
    items: list[MaintenanceRead]


@router.get("/instruments/{instrument_id}/maintenance", response_model=MaintenanceList, responses=ERRORS)
def list_maintenance(
    instrument_id: Id,
    actor: Annotated[Actor, Depends(require_scope("admin"))],
    db: Annotated[Database, Depends(request_db)],
) -> MaintenanceList:
    """Maintenance blocks of an instrument that have not ended (facility staff)."""
    with db.unit_of_work(write=False) as session:
        _instrument, blocks = maintenance.list_blocks(session, actor, instrument_id)
        return MaintenanceList(items=[MaintenanceRead.of(b) for b in blocks])


@router.post("/instruments/{instrument_id}/maintenance", status_code=201, response_model=MaintenanceCreated,
             responses=ERRORS)
def create_maintenance(
    instrument_id: Id,
    body: MaintenanceCreate,
    actor: Annotated[Actor, Depends(require_scope("admin"))],
    db: Annotated[Database, Depends(request_db)],
) -> MaintenanceCreated:
    """Block time for maintenance. 409 `displaces_bookings` lists the bookings in the way unless `confirm` is true;
    confirmed, they are cancelled with the reason and their owners notified."""
    with db.unit_of_work() as session:
        block, displaced = maintenance.create_block(
            session, actor, instrument_id, body.starts_at, body.ends_at, body.reason, body.confirm
        )
        return MaintenanceCreated(
            block=MaintenanceRead.of(block),
            displaced=[DisplacedRead(booking_id=b.id, user_id=b.user_id, starts_at=b.starts_at, ends_at=b.ends_at)
                       for b in displaced],
        )


@router.delete("/instruments/{instrument_id}/maintenance/{block_id}", response_model=MaintenanceRead,
               responses=ERRORS)
def delete_maintenance(
    instrument_id: Id,
    block_id: Id,
    actor: Annotated[Actor, Depends(require_scope("admin"))],
    db: Annotated[Database, Depends(request_db)],
) -> MaintenanceRead:
    """Lift a maintenance block; its time becomes bookable again."""
    with db.unit_of_work() as session:
        return MaintenanceRead.of(maintenance.cancel_block(session, actor, instrument_id, block_id))


# --- recurring bookings ----------------------------------------------------------------------------------


class SeriesCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instrument_id: int = Field(gt=0, le=MAX_ID)
    first_starts_at: Instant
    duration_minutes: int = Field(gt=0, le=44640)
    rrule: str = Field(min_length=1, max_length=500, examples=["FREQ=WEEKLY;COUNT=8"])
    purpose: str = Field(default="", max_length=2000)
    timezone: str | None = Field(default=None, max_length=64, description="Zone the rule repeats in")
    account_id: int | None = Field(default=None, gt=0, le=MAX_ID, description="Funding account to charge")
    keep_partial: bool | None = Field(
        default=None, description="When some occurrences are refused: true keeps the rest, false books nothing, "
        "null (default) books nothing and answers 409 with the preview")


class OccurrenceRead(BaseModel):
    starts_at: datetime
    ends_at: datetime
    bookable: bool
    booking_id: int | None
    error: str | None
    message: str | None


class SeriesRead(BaseModel):
    status: str
    series_id: int | None
    occurrences: list[OccurrenceRead]

    @classmethod
    def of(cls, r: recurrence.SeriesResult) -> SeriesRead:
        return cls(
            status=r.status, series_id=r.series.id if r.series else None,
            occurrences=[OccurrenceRead(starts_at=o.starts_at, ends_at=o.ends_at, bookable=o.bookable,
                                        booking_id=o.booking.id if o.booking else None, error=o.code,
                                        message=o.message) for o in r.occurrences],
        )


@router.post("/bookings/series", status_code=201, response_model=SeriesRead, responses={**ERRORS, 201: {
    "description": "The series and its occurrences",
    "links": {"CancelSeries": link("cancel_series_api_v1_bookings_series__series_id__cancel_post",
                                   series_id="series_id")}}})
def create_series(
    body: SeriesCreate,
    actor: Annotated[Actor, Depends(require_scope("bookings:write"))],
    db: Annotated[Database, Depends(request_db)],
) -> JSONResponse:
    """Book a recurring series (RFC 5545 RRULE with COUNT or UNTIL; at most 52 occurrences within a year).

    When some occurrences are refused and `keep_partial` is not true, nothing is booked: 409 `series_conflicts`
    lists every occurrence, bookable or not and why.
    """
    with db.unit_of_work() as session:
        result = recurrence.book_series(
            session, actor, body.instrument_id, body.first_starts_at, body.duration_minutes, body.rrule,
            body.purpose, body.keep_partial, timezone=body.timezone, account_id=body.account_id,
        )
        read = SeriesRead.of(result).model_dump(mode="json")
    if result.status in ("preview", "none"):
        refused = sum(1 for o in result.occurrences if not o.bookable)
        return JSONResponse(
            {"error": "series_conflicts", "field": "rrule",
             "message": f"{refused} of {len(result.occurrences)} occurrences cannot be booked; nothing was booked.",
             **read},
            status_code=409,
        )
    return JSONResponse(read, status_code=201)


class SkippedRead(BaseModel):
    booking_id: int
    starts_at: datetime
    ends_at: datetime
    error: str
    message: str


class SeriesCancelRead(BaseModel):
    series_id: int
    cancelled: list[BookingRead]
    skipped: list[SkippedRead]


@router.post("/bookings/series/{series_id}/cancel", response_model=SeriesCancelRead, responses=ERRORS)
def cancel_series(
    series_id: Id,
    actor: Annotated[Actor, Depends(require_scope("bookings:write"))],
    db: Annotated[Database, Depends(request_db)],
) -> SeriesCancelRead:
    """Cancel every occurrence of the caller's series that has not ended, each like a single booking; those that
    cannot be cancelled (past the cancellation deadline, checked in) are left and listed in `skipped` with why."""
    with db.unit_of_work() as session:
        result = recurrence.cancel_series(session, actor, series_id)
        return SeriesCancelRead(
            series_id=result.series.id,
            cancelled=[BookingRead.of(b) for b in result.cancelled],
            skipped=[SkippedRead(booking_id=o.booking.id, starts_at=o.booking.starts_at, ends_at=o.booking.ends_at,
                                 error=o.code, message=o.message) for o in result.skipped],
        )


# --- waitlist --------------------------------------------------------------------------------------------


class WaitlistCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instrument_id: int = Field(gt=0, le=MAX_ID)
    starts_at: Instant
    ends_at: Instant
    purpose: str = Field(default="", max_length=2000)


class WaitlistRead(BaseModel):
    id: int
    instrument_id: int
    starts_at: datetime
    ends_at: datetime
    purpose: str
    status: WaitlistStatus
    created_at: datetime
    offered_at: datetime | None
    offer_expires_at: datetime | None
    booking_id: int | None

    @classmethod
    def of(cls, e: WaitlistEntry) -> WaitlistRead:
        return cls(id=e.id, instrument_id=e.instrument_id, starts_at=e.starts_at, ends_at=e.ends_at, purpose=e.purpose,
                   status=e.status, created_at=e.created_at, offered_at=e.offered_at,
                   offer_expires_at=e.offer_expires_at, booking_id=e.booking_id)


class WaitlistList(BaseModel):
    items: list[WaitlistRead]


@router.post("/waitlist", status_code=201, response_model=WaitlistRead, responses=ERRORS)
def join_waitlist(
    body: WaitlistCreate,
    actor: Annotated[Actor, Depends(require_scope("bookings:write"))],
    db: Annotated[Database, Depends(request_db)],
) -> WaitlistRead:
    """Wait for a taken interval; 409 `slot_is_free` when it is free (book it instead)."""
    with db.unit_of_work() as session:
        entry = waitlist.join(session, actor, body.instrument_id, body.starts_at, body.ends_at, body.purpose)
        return WaitlistRead.of(entry)


@router.get("/waitlist", response_model=WaitlistList, responses=ERRORS)
def list_waitlist(
    actor: Annotated[Actor, Depends(require_scope("bookings:read"))],
    db: Annotated[Database, Depends(request_db)],
) -> WaitlistList:
    """The caller's waitlist entries, open ones first."""
    with db.unit_of_work(write=False) as session:
        return WaitlistList(items=[WaitlistRead.of(v.entry) for v in waitlist.list_entries(session, actor)])


@router.post("/waitlist/{entry_id}/accept", status_code=201, response_model=BookingRead, responses=ERRORS)
def accept_offer(
    entry_id: Id,
    actor: Annotated[Actor, Depends(require_scope("bookings:write"))],
    db: Annotated[Database, Depends(request_db)],
    account_id: Annotated[int | None, Query(gt=0, le=MAX_ID, description="Funding account to charge")] = None,
) -> BookingRead:
    """Book the time a live offer names; 409 `slot_taken` if someone booked it first, `offer_not_live` if it ran out."""
    with db.unit_of_work() as session:
        return BookingRead.of(waitlist.accept(session, actor, entry_id, account_id=account_id))


@router.delete("/waitlist/{entry_id}", response_model=WaitlistRead, responses=ERRORS)
def withdraw_entry(
    entry_id: Id,
    actor: Annotated[Actor, Depends(require_scope("bookings:write"))],
    db: Annotated[Database, Depends(request_db)],
) -> WaitlistRead:
    """Leave the waitlist; an offer held passes to the next waiter."""
    with db.unit_of_work() as session:
        return WaitlistRead.of(waitlist.withdraw(session, actor, entry_id))
