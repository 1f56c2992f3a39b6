"""The caller of a request, passed explicitly into services."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Grant:
    """One role of the actor over one scope; exactly one of the scope fields is set, none for platform roles."""

    role: str
    facility_id: int | None = None
    institution_id: int | None = None
    region_code: str | None = None


@dataclass(frozen=True)
class Actor:
    """An authenticated user as services need them: who, where they belong, what roles they hold.

    `scopes` is None for a browser session (everything the roles allow) and the token's scopes for an API token;
    `token_expires_at` is the calling API token's expiry (None for a browser session or a token that never expires).
    """

    user_id: int
    email: str
    name: str
    institution_id: int | None
    region_code: str
    locale: str | None = None
    timezone: str | None = None
    grants: tuple[Grant, ...] = field(default=())
    scopes: frozenset[str] | None = None
    token_expires_at: datetime | None = None
