"""Booking tables. The no-overlap invariant is a database constraint; see the first migration."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, Index, Integer, String, Text, UniqueConstraint, false
from sqlalchemy.orm import Mapped, mapped_column, relationship

from labcommons.catalog.models import Instrument, _enum
from labcommons.db import Base, UTCDateTime, utcnow
from labcommons.identity.models import User


class BookingStatus(enum.StrEnum):
    pending = "pending"
    confirmed = "confirmed"
    cancelled = "cancelled"
    completed = "completed"


class BookingKind(enum.StrEnum):
    use = "use"
    maintenance = "maintenance"


# Bookings in these states hold their time; the exclusion constraint covers exactly these.
ACTIVE_STATUSES = (BookingStatus.pending, BookingStatus.confirmed)


class Booking(Base):
    __tablename__ = "booking"
    __table_args__ = (
        CheckConstraint("ends_at > starts_at", name="ends_after_start"),
        Index("ix_booking_instrument_starts", "instrument_id", "starts_at"),
        Index("ix_booking_user_starts", "user_id", "starts_at"),
        Index("ix_booking_ends_at", "ends_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    # active_history: the statistics' flush listener needs the old values of a move even when they were expired.
    instrument_id: Mapped[int] = mapped_column(ForeignKey("instrument.id"), active_history=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id"))
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime, active_history=True)
    ends_at: Mapped[datetime] = mapped_column(UTCDateTime, active_history=True)
    status: Mapped[BookingStatus] = mapped_column(
        _enum(BookingStatus, "booking_status"), default=BookingStatus.confirmed
    )
    purpose: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # "use" (a user's time) or "maintenance" (a downtime block held by facility staff). Blocks are bookings so
    # that the exclusion constraint keeps users out of them too. Columns added after the first migration carry
    # no foreign keys: SQLite can add a column only without one (rebuilding the table would drop its triggers).
    kind: Mapped[str] = mapped_column(String(20), default=BookingKind.use, server_default="use")
    series_id: Mapped[int | None] = mapped_column(Integer, index=True)
    # Approval: who decided a pending booking, when, and why (a declined booking is cancelled with the reason).
    decided_by_id: Mapped[int | None] = mapped_column(Integer)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Why a booking was cancelled: "user", "declined", "maintenance", "staff", "no_show"; and any note.
    cancel_kind: Mapped[str | None] = mapped_column(String(20))
    cancel_note: Mapped[str] = mapped_column(Text, default="", server_default="")
    cancelled_by_id: Mapped[int | None] = mapped_column(Integer)
    # Usage as it really happened (check-in / check-out at the instrument); feeds statistics and billing.
    checked_in_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    checked_out_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    no_show: Mapped[bool] = mapped_column(default=False, server_default=false())

    instrument: Mapped[Instrument] = relationship(lazy="raise")
    user: Mapped[User] = relationship(lazy="raise")


class BookingPolicy(Base):
    """The facility manager's rules for one instrument, beyond the slot grid and lengths kept on Instrument.

    Times of day are wall-clock times in `timezone`. Hours are JSON: {"mon": [["09:00", "18:00"]], ...};
    null opening hours means always open, null assisted hours means no staff-assisted period.
    """

    __tablename__ = "booking_policy"

    instrument_id: Mapped[int] = mapped_column(ForeignKey("instrument.id", ondelete="CASCADE"), primary_key=True)
    requires_approval: Mapped[bool] = mapped_column(default=False)
    requires_qualification: Mapped[bool] = mapped_column(default=False)
    horizon_days: Mapped[int] = mapped_column(Integer, default=90)
    min_notice_minutes: Mapped[int] = mapped_column(Integer, default=0)
    max_hours_per_week: Mapped[int | None] = mapped_column(Integer)
    cancellation_deadline_hours: Mapped[int] = mapped_column(Integer, default=0)
    buffer_minutes: Mapped[int] = mapped_column(Integer, default=0)
    opening_hours: Mapped[str | None] = mapped_column(Text)
    assisted_hours: Mapped[str | None] = mapped_column(Text)
    timezone: Mapped[str] = mapped_column(String(64), default="Asia/Shanghai")
    no_show_grace_minutes: Mapped[int] = mapped_column(Integer, default=15)
    waitlist_offer_minutes: Mapped[int] = mapped_column(Integer, default=60)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    updated_by_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id", ondelete="SET NULL"))


class QualificationLevel(enum.StrEnum):
    """Assisted users may book only in staff-assisted hours; independent users whenever the instrument is open."""

    assisted = "assisted"
    independent = "independent"


class Qualification(Base):
    """A training record: a user may use an instrument, or every instrument of a category, at a level."""

    __tablename__ = "qualification"
    __table_args__ = (
        CheckConstraint("(instrument_id IS NULL) <> (category_code IS NULL)", name="one_target"),
        Index("ix_qualification_user", "user_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"))
    instrument_id: Mapped[int | None] = mapped_column(ForeignKey("instrument.id", ondelete="CASCADE"))
    category_code: Mapped[str | None] = mapped_column(ForeignKey("category.code"))
    level: Mapped[QualificationLevel] = mapped_column(
        _enum(QualificationLevel, "qualification_level"), default=QualificationLevel.independent
    )
    granted_by_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id", ondelete="SET NULL"))
    granted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    note: Mapped[str] = mapped_column(Text, default="")


class BookingSeries(Base):
    """A recurring booking: an RFC 5545 RRULE from a first occurrence; its bookings point back by series_id."""

    __tablename__ = "booking_series"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"), index=True)
    instrument_id: Mapped[int] = mapped_column(ForeignKey("instrument.id", ondelete="CASCADE"))
    rrule: Mapped[str] = mapped_column(String(500))
    first_starts_at: Mapped[datetime] = mapped_column(UTCDateTime)
    duration_minutes: Mapped[int] = mapped_column(Integer)
    # The wall-clock zone the rule repeats in, so a weekly 09:00 stays 09:00 locally.
    timezone: Mapped[str] = mapped_column(String(64), default="Asia/Shanghai")
    purpose: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WaitlistStatus(enum.StrEnum):
    waiting = "waiting"
    offered = "offered"
    accepted = "accepted"
    expired = "expired"
    withdrawn = "withdrawn"


class WaitlistEntry(Base):
    """A user waiting for a taken interval of an instrument; offered the slot in turn when it frees up."""

    __tablename__ = "waitlist_entry"
    __table_args__ = (Index("ix_waitlist_instrument_status", "instrument_id", "status", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    instrument_id: Mapped[int] = mapped_column(ForeignKey("instrument.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"), index=True)
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ends_at: Mapped[datetime] = mapped_column(UTCDateTime)
    purpose: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[WaitlistStatus] = mapped_column(_enum(WaitlistStatus, "waitlist_status"),
                                                   default=WaitlistStatus.waiting)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    offered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    offer_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    booking_id: Mapped[int | None] = mapped_column(ForeignKey("booking.id", ondelete="SET NULL"))


class InstrumentToken(Base):
    """The secret an instrument's computer or kiosk uses to check users in and out (the interlock)."""

    __tablename__ = "instrument_token"

    id: Mapped[int] = mapped_column(primary_key=True)
    instrument_id: Mapped[int] = mapped_column(ForeignKey("instrument.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class CalendarFeed(Base):
    """A secret iCalendar address: a user's bookings or an instrument's calendar. Only the token's hash is kept."""

    __tablename__ = "calendar_feed"
    __table_args__ = (CheckConstraint("(user_id IS NULL) <> (instrument_id IS NULL)", name="one_subject"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"))
    instrument_id: Mapped[int | None] = mapped_column(ForeignKey("instrument.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class IdempotencyRecord(Base):
    """The first answer to a write sent with an Idempotency-Key, replayed for retries of that key."""

    __tablename__ = "idempotency_record"
    __table_args__ = (UniqueConstraint("user_id", "key", name="uq_idempotency_record_user_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(200))
    # SHA-256 of method, path and body: the same key with a different request is refused.
    fingerprint: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response_body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# Registers the flush listener that marks changed bookings' days for the open-sharing statistics.
import labcommons.reporting.hooks  # noqa: E402,F401
