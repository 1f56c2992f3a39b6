"""Matching tables: the expert directory, the match index's documents, posted demands with their matches,
providers' subscriptions to demands and the offers they answer with.

`match_document` holds one row per searchable item (instrument, service, expert): its tokens and its embedding,
computed once per change of the item, never per query. A change to a catalogue row marks its document dirty in
the same transaction (see matching/index.py); `changed_at` tells each process that its in-memory index is stale.
"""

from __future__ import annotations

import enum
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from labcommons.catalog.models import Facility, Institution, Service, _enum
from labcommons.db import Base, UTCDateTime, utcnow


class ItemKind(enum.StrEnum):
    instrument = "instrument"
    service = "service"
    expert = "expert"


class Availability(enum.StrEnum):
    """Whether an expert takes consultations now."""

    available = "available"
    limited = "limited"
    unavailable = "unavailable"


class DemandStatus(enum.StrEnum):
    open = "open"
    fulfilled = "fulfilled"  # an offer was accepted
    closed = "closed"  # withdrawn by its author


class OfferStatus(enum.StrEnum):
    open = "open"
    accepted = "accepted"
    declined = "declined"
    withdrawn = "withdrawn"


class Expert(Base):
    """A person at an institution who gives technical consultation, found by matching."""

    __tablename__ = "expert"

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(40), unique=True)
    # The expert's own sign-in, when they have one: they may then edit their profile.
    user_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id"), unique=True)
    institution_id: Mapped[int] = mapped_column(ForeignKey("institution.id"), index=True)
    facility_id: Mapped[int | None] = mapped_column(ForeignKey("facility.id"), index=True)
    region_code: Mapped[str] = mapped_column(ForeignKey("region.code"), index=True)
    name_zh: Mapped[str] = mapped_column(String(100))
    name_en: Mapped[str] = mapped_column(String(100))
    title_zh: Mapped[str] = mapped_column(String(100), default="")
    title_en: Mapped[str] = mapped_column(String(100), default="")
    bio_zh: Mapped[str] = mapped_column(Text, default="")
    bio_en: Mapped[str] = mapped_column(Text, default="")
    # Taxonomy codes of the expert's fields, e.g. ["GEN.SPATIAL", "MIC.CONF"].
    fields: Mapped[list[str]] = mapped_column(JSON, default=list)
    skills_zh: Mapped[list[str]] = mapped_column(JSON, default=list)
    skills_en: Mapped[list[str]] = mapped_column(JSON, default=list)
    languages: Mapped[list[str]] = mapped_column(JSON, default=list)
    availability: Mapped[Availability] = mapped_column(
        _enum(Availability, "expert_availability"), default=Availability.available
    )
    # The consultation service an order for this expert goes through (its facility's staff run the order).
    consultation_service_id: Mapped[int | None] = mapped_column(ForeignKey("service.id"))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    institution: Mapped[Institution] = relationship(lazy="raise")
    facility: Mapped[Facility | None] = relationship(lazy="raise")
    consultation_service: Mapped[Service | None] = relationship(lazy="raise")


class MatchDocument(Base):
    """What the matcher knows of one item: tokens, embedding, and whether they must be recomputed."""

    __tablename__ = "match_document"
    __table_args__ = (Index("ix_match_document_changed", "changed_at"), Index("ix_match_document_dirty", "dirty"))

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    item_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Set in the transaction that changes the item; cleared when tokens and embedding are recomputed.
    dirty: Mapped[bool] = mapped_column(Boolean, default=True)
    # False once the item is gone, retired or inactive: it stays as a row so that `changed_at` moves.
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    content_hash: Mapped[str] = mapped_column(String(64), default="")
    # Space-separated index tokens per field group, weighted by matching/index.py.
    name_tokens: Mapped[str] = mapped_column(Text, default="")
    body_tokens: Mapped[str] = mapped_column(Text, default="")
    category_code: Mapped[str | None] = mapped_column(String(32))
    region_code: Mapped[str | None] = mapped_column(String(16))
    facility_id: Mapped[int | None] = mapped_column(Integer)
    # float32 little-endian, L2-normalised; NULL when no embedding model was installed when it was computed.
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)
    embedding_model: Mapped[str] = mapped_column(String(80), default="")
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Demand(Base):
    """A user's need in their own words, saved with the matches it got."""

    __tablename__ = "demand"
    __table_args__ = (
        CheckConstraint("budget_fen IS NULL OR budget_fen >= 0", name="budget"),
        Index("ix_demand_user_created", "user_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id"))
    text: Mapped[str] = mapped_column(Text)
    budget_fen: Mapped[int | None] = mapped_column(BigInteger)
    deadline: Mapped[date | None] = mapped_column(Date)
    region_code: Mapped[str | None] = mapped_column(ForeignKey("region.code"))
    sample_type: Mapped[str] = mapped_column(String(200), default="")
    # Whether subscribed providers may see the demand and answer it with offers.
    share_with_providers: Mapped[bool] = mapped_column(Boolean, default=True)
    status: Mapped[DemandStatus] = mapped_column(_enum(DemandStatus, "demand_status"), default=DemandStatus.open)
    mode: Mapped[str] = mapped_column(String(16), default="hybrid")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class DemandMatch(Base):
    """One ranked result of a saved demand, with its explanation as it was when matched."""

    __tablename__ = "demand_match"
    __table_args__ = (
        UniqueConstraint("demand_id", "kind", "item_id", name="uq_demand_match_item"),
        Index("ix_demand_match_facility", "facility_id", "demand_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    demand_id: Mapped[int] = mapped_column(ForeignKey("demand.id", ondelete="CASCADE"), index=True)
    rank: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    item_id: Mapped[int] = mapped_column(Integer)
    # The facility that provides the item (the expert's facility, if any), whose subscribers hear of the demand.
    facility_id: Mapped[int | None] = mapped_column(ForeignKey("facility.id"))
    score: Mapped[float] = mapped_column(Float)
    explanation: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class DemandSubscription(Base):
    """A facility's opt-in to hear about demands that match its items."""

    __tablename__ = "demand_subscription"
    __table_args__ = (CheckConstraint("min_score >= 0 AND min_score <= 1", name="min_score"),)

    facility_id: Mapped[int] = mapped_column(ForeignKey("facility.id", ondelete="CASCADE"), primary_key=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Only demands whose best match at this facility scores at least this.
    min_score: Mapped[float] = mapped_column(Float, default=0.3)
    # Also e-mail the subscriber when a new demand matches (the inbox lists them either way).
    notify_email: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("user_account.id"))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class DemandOffer(Base):
    """A provider's answer to a demand: a service, a message and a price; accepted, it becomes a service order."""

    __tablename__ = "demand_offer"
    __table_args__ = (
        CheckConstraint("price_fen IS NULL OR price_fen >= 0", name="price"),
        Index("ix_demand_offer_demand", "demand_id", "status"),
        Index("ix_demand_offer_facility", "facility_id", "created_at"),
        # One open offer per facility and demand, whatever races.
        Index("uq_demand_offer_open", "demand_id", "facility_id", unique=True,
              sqlite_where=text("status = 'open'"), postgresql_where=text("status = 'open'")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    demand_id: Mapped[int] = mapped_column(ForeignKey("demand.id"))
    facility_id: Mapped[int] = mapped_column(ForeignKey("facility.id"))
    service_id: Mapped[int] = mapped_column(ForeignKey("service.id"))
    expert_id: Mapped[int | None] = mapped_column(ForeignKey("expert.id"))
    message: Mapped[str] = mapped_column(Text, default="")
    price_fen: Mapped[int | None] = mapped_column(BigInteger)
    available_from: Mapped[date | None] = mapped_column(Date)
    status: Mapped[OfferStatus] = mapped_column(_enum(OfferStatus, "offer_status"), default=OfferStatus.open)
    order_id: Mapped[int | None] = mapped_column(ForeignKey("service_order.id"), unique=True)
    created_by: Mapped[int] = mapped_column(ForeignKey("user_account.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    service: Mapped[Service] = relationship(lazy="raise")
    facility: Mapped[Facility] = relationship(lazy="raise")
