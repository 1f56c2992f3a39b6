"""Service orders: the order and its transitions, quotes with line items, samples with their custody trail,
result files, messages and the rating given after closing."""

from __future__ import annotations

import enum
from datetime import date, datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Date,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from labcommons.catalog.models import Facility, Service, _enum
from labcommons.db import Base, UTCDateTime, utcnow
from labcommons.identity.models import User


class OrderStatus(enum.StrEnum):
    draft = "draft"
    submitted = "submitted"
    quoted = "quoted"
    accepted = "accepted"
    samples_received = "samples_received"
    in_progress = "in_progress"
    results_delivered = "results_delivered"
    closed = "closed"
    rejected = "rejected"
    cancelled = "cancelled"
    on_hold = "on_hold"


class QuoteStatus(enum.StrEnum):
    offered = "offered"
    accepted = "accepted"
    declined = "declined"
    superseded = "superseded"
    withdrawn = "withdrawn"


class SampleStatus(enum.StrEnum):
    expected = "expected"
    received = "received"
    stored = "stored"
    consumed = "consumed"
    returned = "returned"
    disposed = "disposed"


class CustodyEvent(enum.StrEnum):
    received = "received"
    stored = "stored"
    consumed = "consumed"
    returned = "returned"
    disposed = "disposed"


class ResultKind(enum.StrEnum):
    report = "report"
    data = "data"


class ServiceOrder(Base):
    """One order of one service by one user; `status` changes only through orders.service.transition."""

    __tablename__ = "service_order"
    __table_args__ = (
        CheckConstraint("sample_count >= 0", name="sample_count"),
        CheckConstraint("version >= 1", name="version"),
        Index("ix_service_order_facility_status", "facility_id", "status"),
        Index("ix_service_order_user_created", "user_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    # Human reference printed on labels and mails, e.g. SO-2026-000042; set right after the row gets its id.
    number: Mapped[str | None] = mapped_column(String(32), unique=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("service.id"), index=True)
    # Copied from the service when the order is made, so staff queues need no join and a moved service keeps
    # its history where it was.
    facility_id: Mapped[int] = mapped_column(ForeignKey("facility.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id"))
    status: Mapped[OrderStatus] = mapped_column(_enum(OrderStatus, "order_status"), default=OrderStatus.draft)
    # Where an order on hold resumes.
    held_from: Mapped[OrderStatus | None] = mapped_column(_enum(OrderStatus, "order_held_from"))
    # Bumped by every transition: the compare-and-set that makes concurrent transitions lose cleanly.
    version: Mapped[int] = mapped_column(Integer, default=1)
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    sample_count: Mapped[int] = mapped_column(Integer, default=0)
    sample_description: Mapped[str] = mapped_column(Text, default="")
    wanted_by: Mapped[date | None] = mapped_column(Date)
    contact_phone: Mapped[str] = mapped_column(String(40), default="")
    # The expert a consultation order asks for (matching's expert directory). Added after the orders migration,
    # so without a foreign key (SQLite adds a column in place only without one); orders.service checks it.
    expert_id: Mapped[int | None] = mapped_column(Integer, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    service: Mapped[Service] = relationship(lazy="raise")
    facility: Mapped[Facility] = relationship(lazy="raise")
    user: Mapped[User] = relationship(lazy="raise")


class OrderEvent(Base):
    """One transition of an order: who moved it from where to where, when, and why.

    (order_id, version) is unique: of two transitions racing from the same version only one can be recorded.
    """

    __tablename__ = "order_event"
    __table_args__ = (UniqueConstraint("order_id", "version", name="uq_order_event_order_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("service_order.id", ondelete="CASCADE"), index=True)
    # The order's version after this transition.
    version: Mapped[int] = mapped_column(Integer)
    from_status: Mapped[OrderStatus | None] = mapped_column(_enum(OrderStatus, "order_event_from"))
    to_status: Mapped[OrderStatus] = mapped_column(_enum(OrderStatus, "order_event_to"))
    # None: the platform itself (e.g. the automatic quote of a fixed-price service).
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id"))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    comment: Mapped[str] = mapped_column(Text, default="")


class Quote(Base):
    """A priced offer for an order. Versions count up per order; once offered its lines never change, and the
    database refuses any change to an accepted quote (a change is a new version)."""

    __tablename__ = "quote"
    __table_args__ = (
        UniqueConstraint("order_id", "version", name="uq_quote_order_version"),
        CheckConstraint("total_fen >= 0", name="total"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("service_order.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[QuoteStatus] = mapped_column(_enum(QuoteStatus, "quote_status"), default=QuoteStatus.offered)
    total_fen: Mapped[int] = mapped_column(BigInteger)
    valid_until: Mapped[date] = mapped_column(Date)
    note: Mapped[str] = mapped_column(Text, default="")
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    decided_by_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id"))
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    decision_note: Mapped[str] = mapped_column(Text, default="")

    lines: Mapped[list[QuoteLine]] = relationship(lazy="raise", order_by="QuoteLine.position")


class QuoteLine(Base):
    """One priced line of a quote; amount = quantity × unit price, checked by the database."""

    __tablename__ = "quote_line"
    __table_args__ = (
        UniqueConstraint("quote_id", "position", name="uq_quote_line_position"),
        CheckConstraint("quantity > 0", name="quantity"),
        CheckConstraint("unit_price_fen >= 0", name="unit_price"),
        CheckConstraint("amount_fen = quantity * unit_price_fen", name="amount"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    quote_id: Mapped[int] = mapped_column(ForeignKey("quote.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(String(300))
    quantity: Mapped[int] = mapped_column(Integer)
    unit_price_fen: Mapped[int] = mapped_column(BigInteger)
    amount_fen: Mapped[int] = mapped_column(BigInteger)


class Sample(Base):
    """A physical sample of an order; `code` is printed on its label (QR code and barcode)."""

    __tablename__ = "sample"
    __table_args__ = (UniqueConstraint("order_id", "position", name="uq_sample_order_position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("service_order.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    code: Mapped[str] = mapped_column(String(48), unique=True)
    description: Mapped[str] = mapped_column(String(300), default="")
    status: Mapped[SampleStatus] = mapped_column(_enum(SampleStatus, "sample_status"), default=SampleStatus.expected)
    location: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SampleEvent(Base):
    """One chain-of-custody step of a sample: what happened, who did it, when and where."""

    __tablename__ = "sample_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("sample.id", ondelete="CASCADE"), index=True)
    event: Mapped[CustodyEvent] = mapped_column(_enum(CustodyEvent, "custody_event"))
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id"))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    location: Mapped[str] = mapped_column(String(200), default="")
    note: Mapped[str] = mapped_column(Text, default="")


class ResultFile(Base):
    """A report or data file delivered for an order; the bytes live in the result store under `storage_key`."""

    __tablename__ = "result_file"
    __table_args__ = (CheckConstraint("size_bytes >= 0", name="size"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("service_order.id", ondelete="CASCADE"), index=True)
    kind: Mapped[ResultKind] = mapped_column(_enum(ResultKind, "result_kind"), default=ResultKind.report)
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(120), default="application/octet-stream")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(300), unique=True)
    uploaded_by_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id"))
    uploaded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Withdrawn files stay listed for staff (with who and when) but are no longer downloadable by the user.
    withdrawn_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class OrderMessage(Base):
    """A message in an order's thread between the user and facility staff."""

    __tablename__ = "order_message"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("service_order.id", ondelete="CASCADE"), index=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("user_account.id"))
    # Whether the author wrote as facility staff (a staff member who also ordered writes as the user there).
    from_staff: Mapped[bool] = mapped_column(default=False)
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class OrderRating(Base):
    """The user's rating of a closed order (1–5) with feedback; one per order."""

    __tablename__ = "order_rating"
    __table_args__ = (CheckConstraint("score BETWEEN 1 AND 5", name="score"),)

    order_id: Mapped[int] = mapped_column(ForeignKey("service_order.id", ondelete="CASCADE"), primary_key=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("service.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id"))
    score: Mapped[int] = mapped_column(Integer)
    comment: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
