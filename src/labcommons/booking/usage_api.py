"""The interlock API: an instrument's computer checks users in and out with its instrument token."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from labcommons.booking import usage
from labcommons.booking.models import Booking, InstrumentToken
from labcommons.db import MAX_ID, Database, utcnow
from labcommons.errors import InvalidInput, Unauthenticated
from labcommons.http import request_db
from labcommons.identity import service as identity

router = APIRouter(prefix="/instrument-usage", tags=["instrument usage"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No instrument token, or an unknown or revoked one"},
    404: {"description": "Unknown user or booking"},
    409: {"description": "no_current_booking, check_in_too_early, booking_ended, not_checked_in, ..."},
    422: {"description": "Invalid input (e.g. wrong_instrument); `field` names it"},
}


class UsageRequest(BaseModel):
    """Who is at the instrument: a user's e-mail (their current booking is found) or a booking id."""

    user_email: Annotated[str | None, Field(max_length=254)] = None
    booking_id: int | None = Field(default=None, gt=0, le=MAX_ID)


class UsageRead(BaseModel):
    booking_id: int
    instrument_id: int
    kind: str
    status: str
    user_email: str | None
    user_name: str | None
    starts_at: datetime
    ends_at: datetime
    checked_in_at: datetime | None
    checked_out_at: datetime | None
    usage_minutes: int | None
    no_show: bool

    @classmethod
    def of(cls, b: Booking) -> UsageRead:
        # Maintenance blocks are held by staff; the interlock needs only to know the instrument is down.
        person = b.kind == "use"
        return cls(
            booking_id=b.id, instrument_id=b.instrument_id, kind=b.kind, status=b.status.value,
            user_email=b.user.email if person else None, user_name=b.user.name if person else None,
            starts_at=b.starts_at, ends_at=b.ends_at, checked_in_at=b.checked_in_at, checked_out_at=b.checked_out_at,
            usage_minutes=usage.usage_minutes(b), no_show=b.no_show,
        )


class CurrentRead(BaseModel):
    instrument_id: int
    now: datetime
    current: UsageRead | None
    next: list[UsageRead]


def instrument_secret(request: Request) -> str:
    """The secret of 'Authorization: Instrument <token>'."""
    scheme, _sep, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "instrument" or not token.strip():
        raise Unauthenticated("Send the instrument token as 'Authorization: Instrument <token>'.",
                              field="Authorization")
    return token.strip()


Secret = Annotated[str, Depends(instrument_secret)]
Db = Annotated[Database, Depends(request_db)]


def _booking_of(session: Session, token: InstrumentToken, body: UsageRequest, *, check_out: bool, now: datetime
                ) -> Booking:
    if body.booking_id is not None:
        booking = usage.get_booking(session, body.booking_id, lock=True)
        if booking.instrument_id != token.instrument_id:
            raise usage.WrongInstrument("The booking is for another instrument than the token's.", field="booking_id")
        return booking
    if not body.user_email:
        raise InvalidInput("Give user_email or booking_id.", field="user_email", code="missing_field")
    user = identity.find_user(session, body.user_email)
    if check_out:
        return usage.booking_to_check_out(session, token.instrument_id, user.id)
    return usage.booking_to_check_in(session, token.instrument_id, user.id, now=now)


@router.post("/check-in", response_model=UsageRead, responses=ERRORS)
def check_in(body: UsageRequest, secret: Secret, db: Db) -> UsageRead:
    """Check the user in at this token's instrument (idempotent: a second call keeps the first time)."""
    now = utcnow()
    with db.unit_of_work() as session:
        token = usage.authenticate_instrument(session, secret)
        booking = _booking_of(session, token, body, check_out=False, now=now)
        return UsageRead.of(usage.check_in(session, booking, now=now))


@router.post("/check-out", response_model=UsageRead, responses=ERRORS)
def check_out(body: UsageRequest, secret: Secret, db: Db) -> UsageRead:
    """Check the user out; the booking becomes completed and the rest of its time is released."""
    now = utcnow()
    with db.unit_of_work() as session:
        token = usage.authenticate_instrument(session, secret)
        booking = _booking_of(session, token, body, check_out=True, now=now)
        return UsageRead.of(usage.check_out(session, booking, now=now))


@router.get("/current", response_model=CurrentRead, responses=ERRORS)
def current(secret: Secret, db: Db) -> CurrentRead:
    """Who is booked at this token's instrument now and next, for an interlock to unlock for them only."""
    now = utcnow()
    with db.unit_of_work(write=False) as session:
        token = usage.authenticate_instrument(session, secret)
        view = usage.now_and_next(session, token.instrument_id, now=now)
        return CurrentRead(
            instrument_id=token.instrument_id, now=now,
            current=UsageRead.of(view.current) if view.current else None,
            next=[UsageRead.of(b) for b in view.upcoming],
        )
