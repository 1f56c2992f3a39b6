"""Catalogue tables."""

from __future__ import annotations

import enum
from datetime import date, datetime

from sqlalchemy import CheckConstraint, Date, Enum, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from labcommons.db import Base, UTCDateTime, utcnow


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Portable: VARCHAR plus a named CHECK constraint on both dialects, values are the lower-case strings.
    return Enum(cls, name=name, native_enum=False, create_constraint=True, length=20,
                values_callable=lambda e: [m.value for m in e])


class InstitutionKind(enum.StrEnum):
    university = "university"
    laboratory = "laboratory"
    hospital = "hospital"
    company = "company"
    government = "government"


class InstrumentStatus(enum.StrEnum):
    active = "active"
    maintenance = "maintenance"
    retired = "retired"


class OpenTo(enum.StrEnum):
    """Who may book an instrument, widening from its own institution to everyone."""

    institution = "institution"
    region = "region"
    everyone = "everyone"


class ServiceKind(enum.StrEnum):
    testing = "testing"
    rnd = "rnd"
    consultation = "consultation"


class Region(Base):
    __tablename__ = "region"

    code: Mapped[str] = mapped_column(String(16), primary_key=True)
    name_zh: Mapped[str] = mapped_column(String(100))
    name_en: Mapped[str] = mapped_column(String(100))


class Category(Base):
    """Reference data from taxonomy.csv; a code's parent is the part before its last dot."""

    __tablename__ = "category"

    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    parent_code: Mapped[str | None] = mapped_column(ForeignKey("category.code"))
    name_zh: Mapped[str] = mapped_column(String(100))
    name_en: Mapped[str] = mapped_column(String(200))


class Institution(Base):
    __tablename__ = "institution"

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(40), unique=True)
    region_code: Mapped[str] = mapped_column(ForeignKey("region.code"), index=True)
    kind: Mapped[InstitutionKind] = mapped_column(_enum(InstitutionKind, "institution_kind"))
    name_zh: Mapped[str] = mapped_column(String(200))
    name_en: Mapped[str] = mapped_column(String(200))

    region: Mapped[Region] = relationship(lazy="raise")


class Facility(Base):
    __tablename__ = "facility"

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(40), unique=True)
    institution_id: Mapped[int] = mapped_column(ForeignKey("institution.id"), index=True)
    name_zh: Mapped[str] = mapped_column(String(200))
    name_en: Mapped[str] = mapped_column(String(200))
    description_zh: Mapped[str] = mapped_column(Text, default="")
    description_en: Mapped[str] = mapped_column(Text, default="")

    institution: Mapped[Institution] = relationship(lazy="raise")


class Instrument(Base):
    __tablename__ = "instrument"
    __table_args__ = (
        CheckConstraint("slot_minutes > 0", name="slot_positive"),
        CheckConstraint(
            "min_booking_minutes > 0 AND min_booking_minutes <= max_booking_minutes", name="booking_bounds"
        ),
        Index("ix_instrument_category_status", "category_code", "status"),
        # The earliest free slot walks each grid in id order (booking.service.earliest_slots).
        Index("ix_instrument_slot_id", "slot_minutes", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(40), unique=True)
    facility_id: Mapped[int] = mapped_column(ForeignKey("facility.id"), index=True)
    # Copied from the facility so that search filters and facets over a million rows need no joins;
    # set by the catalogue service whenever the facility is set.
    institution_id: Mapped[int] = mapped_column(ForeignKey("institution.id"), index=True)
    region_code: Mapped[str] = mapped_column(ForeignKey("region.code"), index=True)
    name_zh: Mapped[str] = mapped_column(String(200))
    name_en: Mapped[str] = mapped_column(String(200))
    description_zh: Mapped[str] = mapped_column(Text, default="")
    description_en: Mapped[str] = mapped_column(Text, default="")
    manufacturer: Mapped[str] = mapped_column(String(120), default="")
    model: Mapped[str] = mapped_column(String(120), default="")
    category_code: Mapped[str] = mapped_column(ForeignKey("category.code"))
    location_zh: Mapped[str] = mapped_column(String(200), default="")
    location_en: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[InstrumentStatus] = mapped_column(
        _enum(InstrumentStatus, "instrument_status"), default=InstrumentStatus.active
    )
    slot_minutes: Mapped[int] = mapped_column(Integer, default=30)
    min_booking_minutes: Mapped[int] = mapped_column(Integer, default=30)
    max_booking_minutes: Mapped[int] = mapped_column(Integer, default=480)
    open_to: Mapped[OpenTo] = mapped_column(_enum(OpenTo, "open_to"), default=OpenTo.everyone)
    # Tokenised text the full-text index reads (CJK split into uni- and bigrams); see catalog/search.py.
    search_name: Mapped[str] = mapped_column(Text, default="")
    search_body: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    facility: Mapped[Facility] = relationship(lazy="raise")
    institution: Mapped[Institution] = relationship(lazy="raise")
    region: Mapped[Region] = relationship(lazy="raise")
    category: Mapped[Category] = relationship(lazy="raise")


class PriceUnit(enum.StrEnum):
    """What a service's list price is charged per."""

    sample = "sample"
    project = "project"
    hour = "hour"


class Service(Base):
    """Work done by facility staff for a user (testing, contract R&D, consultation), ordered as a ServiceOrder."""

    __tablename__ = "service"
    __table_args__ = (
        CheckConstraint("list_price_fen IS NULL OR list_price_fen >= 0", name="price"),
        CheckConstraint("turnaround_days IS NULL OR turnaround_days >= 0", name="turnaround"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(40), unique=True)
    facility_id: Mapped[int] = mapped_column(ForeignKey("facility.id"), index=True)
    kind: Mapped[ServiceKind] = mapped_column(_enum(ServiceKind, "service_kind"))
    name_zh: Mapped[str] = mapped_column(String(200))
    name_en: Mapped[str] = mapped_column(String(200))
    description_zh: Mapped[str] = mapped_column(Text, default="")
    description_en: Mapped[str] = mapped_column(Text, default="")
    category_code: Mapped[str] = mapped_column(ForeignKey("category.code"))
    turnaround_days: Mapped[int | None] = mapped_column(Integer)
    # Integer fen (CNY cents); NULL means quoted on request.
    list_price_fen: Mapped[int | None] = mapped_column(Integer)
    price_unit: Mapped[PriceUnit] = mapped_column(_enum(PriceUnit, "price_unit"), default=PriceUnit.sample)
    sample_requirements_zh: Mapped[str] = mapped_column(Text, default="")
    sample_requirements_en: Mapped[str] = mapped_column(Text, default="")
    # Copied from the facility, as for instruments, so search filters need no joins. Added after the first
    # migration, so without foreign keys (SQLite adds a column in place only without one).
    institution_id: Mapped[int | None] = mapped_column(Integer, index=True)
    region_code: Mapped[str | None] = mapped_column(String(16), index=True)
    is_active: Mapped[bool] = mapped_column(default=True)
    search_name: Mapped[str] = mapped_column(Text, default="")
    search_body: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    facility: Mapped[Facility] = relationship(lazy="raise")
    category: Mapped[Category] = relationship(lazy="raise")


class ServiceAccreditation(Base):
    """A test item's accreditation (CMA, CNAS, ...) with its certificate, shown on the service page."""

    __tablename__ = "service_accreditation"
    __table_args__ = (UniqueConstraint("service_id", "scheme", name="uq_service_accreditation_scheme"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("service.id", ondelete="CASCADE"), index=True)
    scheme: Mapped[str] = mapped_column(String(20))
    certificate_no: Mapped[str] = mapped_column(String(80), default="")
    valid_until: Mapped[date | None] = mapped_column(Date)


class ServiceInstrument(Base):
    """An instrument a service uses."""

    __tablename__ = "service_instrument"

    service_id: Mapped[int] = mapped_column(ForeignKey("service.id", ondelete="CASCADE"), primary_key=True)
    instrument_id: Mapped[int] = mapped_column(ForeignKey("instrument.id", ondelete="CASCADE"), primary_key=True)


# Registers the flush listener that keeps the match index current wherever catalogue rows are written.
import labcommons.matching.hooks  # noqa: E402,F401
