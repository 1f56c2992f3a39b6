"""Who may do what: every permission check of the platform lives here (see docs/permissions.md)."""

from __future__ import annotations

from labcommons.actor import Actor
from labcommons.errors import Forbidden


def is_platform_admin(actor: Actor) -> bool:
    return any(g.role == "platform_admin" for g in actor.grants)


def require_platform_admin(actor: Actor) -> None:
    """Forbidden unless the actor is a platform admin (placeholder until the role table lands)."""
    if not is_platform_admin(actor):
        raise Forbidden("Only a platform administrator may do this.")
