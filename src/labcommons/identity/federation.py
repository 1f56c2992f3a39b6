"""Signing in through upstream OpenID Connect providers (the platform as relying party)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from labcommons.identity.models import IdentityProvider


def enabled_providers(session: Session) -> Sequence[IdentityProvider]:
    """The providers the sign-in page offers, by region then name."""
    return session.scalars(
        select(IdentityProvider).where(IdentityProvider.enabled.is_(True))
        .order_by(IdentityProvider.region_code, IdentityProvider.name)
    ).all()
