"""API shapes of bookings and availability."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from labcommons.booking.models import Booking, BookingStatus
from labcommons.booking.service import Availability, Slot
from labcommons.catalog.schemas import InstrumentSummary
from labcommons.db import MAX_ID
from labcommons.http import Instant


class BookingCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instrument_id: int = Field(gt=0, le=MAX_ID)
    starts_at: Instant
    ends_at: Instant
    purpose: str = Field(default="", max_length=2000)
    # The funding account to charge when the facility charges; omitted: the caller's only account.
    account_id: int | None = Field(default=None, gt=0, le=MAX_ID)


class BookingRead(BaseModel):
    id: int
    instrument_id: int
    instrument_name_zh: str
    instrument_name_en: str
    user_id: int
    starts_at: datetime
    ends_at: datetime
    status: BookingStatus
    purpose: str
    created_at: datetime
    cancelled_at: datetime | None

    @classmethod
    def of(cls, b: Booking) -> BookingRead:
        return cls(
            id=b.id, instrument_id=b.instrument_id, instrument_name_zh=b.instrument.name_zh,
            instrument_name_en=b.instrument.name_en, user_id=b.user_id, starts_at=b.starts_at,
            ends_at=b.ends_at, status=b.status, purpose=b.purpose, created_at=b.created_at,
            cancelled_at=b.cancelled_at,
        )


class BookingPage(BaseModel):
    items: list[BookingRead]
    next_cursor: str | None


class IntervalRead(BaseModel):
    starts_at: datetime
    ends_at: datetime


class AvailabilityRead(BaseModel):
    instrument_id: int
    starts_at: datetime
    ends_at: datetime
    free: list[IntervalRead]
    busy: list[IntervalRead]

    @classmethod
    def of(cls, a: Availability) -> AvailabilityRead:
        return cls(
            instrument_id=a.instrument_id, starts_at=a.window.starts_at, ends_at=a.window.ends_at,
            free=[IntervalRead(starts_at=i.starts_at, ends_at=i.ends_at) for i in a.free],
            busy=[IntervalRead(starts_at=i.starts_at, ends_at=i.ends_at) for i in a.busy],
        )


class SlotRead(BaseModel):
    instrument: InstrumentSummary
    starts_at: datetime
    ends_at: datetime

    @classmethod
    def of(cls, s: Slot) -> SlotRead:
        return cls(instrument=InstrumentSummary.of(s.instrument), starts_at=s.starts_at, ends_at=s.ends_at)


class SlotList(BaseModel):
    items: list[SlotRead]
