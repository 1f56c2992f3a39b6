"""Imports every domain's tables so the metadata is complete (Alembic and tests use it)."""

from labcommons.booking.models import Booking, IdempotencyRecord
from labcommons.catalog.models import Category, Facility, Institution, Instrument, Region, Service
from labcommons.db import Base
from labcommons.identity.models import ApiToken, User, WebSession

__all__ = [
    "ApiToken", "Base", "Booking", "Category", "Facility", "IdempotencyRecord", "Institution", "Instrument",
    "Region", "Service", "User", "WebSession",
]
