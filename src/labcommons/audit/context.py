"""Who is acting: one mutable record per request (or CLI run, or job), read when audit entries are written.

The record is shared by reference, so the caller found by an authentication dependency running in a worker
thread is seen by the commit that happens in another; a session may override it (`session.info["audit_actor"]`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class AuditContext:
    actor_id: int | None = None
    # "user" (browser session), "token" (API token), "system" (jobs and sweeps) or "cli".
    actor_kind: str = "system"
    client_ip: str | None = None


_current: ContextVar[AuditContext | None] = ContextVar("labcommons_audit_context", default=None)


def current() -> AuditContext:
    """The acting context, or a system context when none was opened (jobs, tests calling services directly)."""
    return _current.get() or AuditContext()


@contextmanager
def acting(actor_kind: str = "system", client_ip: str | None = None, actor_id: int | None = None
           ) -> Iterator[AuditContext]:
    """Open an acting context for a request, a CLI command or a job; authentication fills in the actor."""
    context = AuditContext(actor_id=actor_id, actor_kind=actor_kind, client_ip=client_ip)
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def identify(actor_id: int, actor_kind: str) -> None:
    """Record the authenticated caller in the open context (a no-op outside one)."""
    context = _current.get()
    if context is not None:
        context.actor_id = actor_id
        context.actor_kind = actor_kind
