"""Facility management under /api/v1: an instrument's booking rules, the approval queue, qualifications.

Manager actions need the token scope `admin` (a browser session is limited by its roles alone).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field

from labcommons.actor import Actor
from labcommons.booking import approvals, policy, qualifications
from labcommons.booking.models import Booking, BookingPolicy, Qualification, QualificationLevel
from labcommons.booking.schemas import BookingRead
from labcommons.catalog import service as catalog
from labcommons.catalog.models import Instrument, OpenTo
from labcommons.db import Database
from labcommons.http import Id, Instant, request_db, require_scope

router = APIRouter(tags=["management"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API token"},
    403: {"description": "Your roles or the token's scopes do not allow this"},
    404: {"description": "Unknown, or not yours to manage"},
    409: {"description": "Conflicts with the current state, e.g. booking_not_pending"},
    422: {"description": "Invalid input; `field` names it and `error` the rule"},
}
Admin = Annotated[Actor, Depends(require_scope("admin"))]
HoursIn = dict[str, list[list[str]]]


class PolicyRead(BaseModel):
    instrument_id: int
    open_to: OpenTo
    slot_minutes: int
    min_booking_minutes: int
    max_booking_minutes: int
    requires_approval: bool
    requires_qualification: bool
    horizon_days: int
    min_notice_minutes: int
    max_hours_per_week: int | None
    cancellation_deadline_hours: int
    buffer_minutes: int
    opening_hours: HoursIn | None
    assisted_hours: HoursIn | None
    timezone: str
    no_show_grace_minutes: int
    waitlist_offer_minutes: int

    @classmethod
    def of(cls, instrument: Instrument, p: BookingPolicy) -> PolicyRead:
        def hours(raw: str | None) -> HoursIn | None:
            return json.loads(raw) if raw else None

        return cls(
            instrument_id=instrument.id, open_to=instrument.open_to, slot_minutes=instrument.slot_minutes,
            min_booking_minutes=instrument.min_booking_minutes, max_booking_minutes=instrument.max_booking_minutes,
            requires_approval=p.requires_approval, requires_qualification=p.requires_qualification,
            horizon_days=p.horizon_days, min_notice_minutes=p.min_notice_minutes,
            max_hours_per_week=p.max_hours_per_week, cancellation_deadline_hours=p.cancellation_deadline_hours,
            buffer_minutes=p.buffer_minutes, opening_hours=hours(p.opening_hours),
            assisted_hours=hours(p.assisted_hours), timezone=p.timezone,
            no_show_grace_minutes=p.no_show_grace_minutes, waitlist_offer_minutes=p.waitlist_offer_minutes,
        )


class PolicyUpdate(BaseModel):
    """Only the fields sent change; null clears hours (always open / no assisted period) and the weekly quota."""

    model_config = ConfigDict(extra="forbid")

    open_to: OpenTo | None = None
    slot_minutes: int | None = None
    min_booking_minutes: int | None = None
    max_booking_minutes: int | None = None
    requires_approval: bool | None = None
    requires_qualification: bool | None = None
    horizon_days: int | None = None
    min_notice_minutes: int | None = None
    max_hours_per_week: int | None = None
    cancellation_deadline_hours: int | None = None
    buffer_minutes: int | None = None
    opening_hours: HoursIn | None = None
    assisted_hours: HoursIn | None = None
    timezone: str | None = Field(default=None, max_length=64)
    no_show_grace_minutes: int | None = None
    waitlist_offer_minutes: int | None = None


class PendingBookingRead(BookingRead):
    user_email: str
    user_name: str

    @classmethod
    def of_pending(cls, b: Booking) -> PendingBookingRead:
        return cls(**BookingRead.of(b).model_dump(), user_email=b.user.email, user_name=b.user.name)


class PendingList(BaseModel):
    items: list[PendingBookingRead]


class DecidedBookingRead(BookingRead):
    decided_by_id: int | None
    decided_at: datetime | None
    cancel_kind: str | None
    cancel_note: str

    @classmethod
    def of_decided(cls, b: Booking) -> DecidedBookingRead:
        return cls(**BookingRead.of(b).model_dump(), decided_by_id=b.decided_by_id, decided_at=b.decided_at,
                   cancel_kind=b.cancel_kind, cancel_note=b.cancel_note)


class DeclineBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(max_length=1000)


class QualificationCreate(BaseModel):
    """Grant on this instrument, or with `category_code` on a whole category (platform administrators only)."""

    model_config = ConfigDict(extra="forbid")

    user_email: str = Field(max_length=254)
    level: QualificationLevel = QualificationLevel.independent
    category_code: str | None = Field(default=None, max_length=32)
    expires_at: Instant | None = None
    note: str = Field(default="", max_length=1000)


class QualificationRead(BaseModel):
    id: int
    user_id: int
    user_email: str
    instrument_id: int | None
    category_code: str | None
    level: QualificationLevel
    granted_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    note: str

    @classmethod
    def of(cls, q: Qualification, email: str) -> QualificationRead:
        return cls(id=q.id, user_id=q.user_id, user_email=email, instrument_id=q.instrument_id,
                   category_code=q.category_code, level=q.level, granted_at=q.granted_at, expires_at=q.expires_at,
                   revoked_at=q.revoked_at, note=q.note)


class QualificationList(BaseModel):
    items: list[QualificationRead]


@router.get("/instruments/{instrument_id}/policy", response_model=PolicyRead, responses=ERRORS)
def get_policy(instrument_id: Id, db: Annotated[Database, Depends(request_db)]) -> PolicyRead:
    """An instrument's booking rules (defaults when its manager has set none)."""
    with db.unit_of_work(write=False) as session:
        instrument = catalog.get_instrument(session, instrument_id)
        return PolicyRead.of(instrument, policy.policy_for(session, instrument_id))


@router.put("/instruments/{instrument_id}/policy", response_model=PolicyRead, responses=ERRORS)
def put_policy(
    instrument_id: Id, body: PolicyUpdate, actor: Admin, db: Annotated[Database, Depends(request_db)]
) -> PolicyRead:
    """Change an instrument's booking rules; needs edit_facility_catalogue on its facility."""
    with db.unit_of_work() as session:
        saved = policy.save_policy(session, actor, instrument_id, **body.model_dump(exclude_unset=True))
        return PolicyRead.of(catalog.get_instrument(session, instrument_id), saved)


@router.get("/manage/approvals", response_model=PendingList, responses=ERRORS)
def list_approvals(actor: Admin, db: Annotated[Database, Depends(request_db)]) -> PendingList:
    """Pending bookings of the facilities the caller manages, oldest request first."""
    with db.unit_of_work(write=False) as session:
        return PendingList(items=[PendingBookingRead.of_pending(b) for b in approvals.pending_for(session, actor)])


@router.post("/bookings/{booking_id}/approve", response_model=DecidedBookingRead, responses=ERRORS)
def approve_booking(booking_id: Id, actor: Admin, db: Annotated[Database, Depends(request_db)]) -> DecidedBookingRead:
    """Confirm a pending booking of a facility the caller manages."""
    with db.unit_of_work() as session:
        return DecidedBookingRead.of_decided(approvals.approve(session, actor, booking_id))


@router.post("/bookings/{booking_id}/decline", response_model=DecidedBookingRead, responses=ERRORS)
def decline_booking(
    booking_id: Id, body: DeclineBody, actor: Admin, db: Annotated[Database, Depends(request_db)]
) -> DecidedBookingRead:
    """Decline a pending booking with a reason the user is told; its time becomes free."""
    with db.unit_of_work() as session:
        return DecidedBookingRead.of_decided(approvals.decline(session, actor, booking_id, body.reason))


@router.get("/instruments/{instrument_id}/qualifications", response_model=QualificationList, responses=ERRORS)
def list_qualifications(
    instrument_id: Id, actor: Admin, db: Annotated[Database, Depends(request_db)]
) -> QualificationList:
    """Qualifications reaching an instrument (its own and its categories'), newest first."""
    with db.unit_of_work(write=False) as session:
        rows = qualifications.list_for_instrument(session, actor, instrument_id)
        return QualificationList(items=[QualificationRead.of(r.qualification, r.email) for r in rows])


@router.post("/instruments/{instrument_id}/qualifications", status_code=201, response_model=QualificationRead,
             responses=ERRORS)
def grant_qualification(
    instrument_id: Id, body: QualificationCreate, actor: Admin, db: Annotated[Database, Depends(request_db)]
) -> QualificationRead:
    """Record that a user is trained on this instrument (or, with category_code, on a whole category)."""
    with db.unit_of_work() as session:
        q = qualifications.grant(
            session, actor, body.user_email,
            instrument_id=None if body.category_code else instrument_id, category_code=body.category_code,
            level=body.level, expires_at=body.expires_at, note=body.note,
        )
        return QualificationRead.of(q, body.user_email.strip().lower())


@router.delete("/qualifications/{qualification_id}", status_code=204, responses=ERRORS)
def revoke_qualification(qualification_id: Id, actor: Admin, db: Annotated[Database, Depends(request_db)]) -> Response:
    """Withdraw a qualification."""
    with db.unit_of_work() as session:
        qualifications.revoke(session, actor, qualification_id)
    return Response(status_code=204)

