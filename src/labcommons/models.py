"""Imports every domain's tables so the metadata is complete (Alembic and tests use it)."""

from labcommons.booking.models import Booking, IdempotencyRecord
from labcommons.catalog.models import Category, Facility, Institution, Instrument, Region, Service
from labcommons.db import Base
from labcommons.identity.models import (
    ApiToken,
    ExternalIdentity,
    IdentityProvider,
    LoginState,
    LoginThrottle,
    OidcAccessToken,
    OidcAuthorizationCode,
    OidcClient,
    OidcConsent,
    PasswordReset,
    RoleGrant,
    SigningKey,
    User,
    WebSession,
)

__all__ = [
    "ApiToken", "Base", "Booking", "Category", "ExternalIdentity", "Facility", "IdempotencyRecord",
    "IdentityProvider", "Institution", "Instrument", "LoginState", "LoginThrottle", "OidcAccessToken",
    "OidcAuthorizationCode", "OidcClient", "OidcConsent", "PasswordReset", "Region", "RoleGrant", "Service",
    "SigningKey", "User", "WebSession",
]
