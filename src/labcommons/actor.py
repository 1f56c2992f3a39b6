"""The caller of a request, passed explicitly into services."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Actor:
    """An authenticated user as services need them: who, and where they belong."""

    user_id: int
    email: str
    name: str
    institution_id: int
    region_code: str
    locale: str | None = None
    timezone: str | None = None
