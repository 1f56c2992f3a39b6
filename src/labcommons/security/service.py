"""Write rate limits: each caller's writes counted per minute in `rate_limit_bucket`, shared by every process.

A fixed one-minute window per key, counted by one upsert (INSERT ... ON CONFLICT DO UPDATE ... RETURNING) on both
PostgreSQL and SQLite, so concurrent requests in any number of processes are all counted and no read-then-write
race lets a burst through. A window allows at most `limit` writes; across a window's edge a caller may get up to
twice that within a minute, the price of one small row per caller instead of a log of request times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, case, cast, delete, func, literal
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from labcommons import jobs
from labcommons.db import UTCDateTime, utcnow
from labcommons.identity import service as identity
from labcommons.security.models import RateLimitBucket

WINDOW = timedelta(minutes=1)
# How often the periodic job deletes buckets of windows that are over (they would restart at 1 anyway).
PRUNE_INTERVAL_SECONDS = 600


@dataclass(frozen=True)
class WriteCount:
    """One counted write: the caller's key, their writes in this window so far, and when the window ends."""

    key: str
    count: int
    limit: int
    retry_after: int

    @property
    def allowed(self) -> bool:
        return self.count <= self.limit


def window_of(moment: datetime) -> datetime:
    """The start of the one-minute window `moment` falls in."""
    return moment.replace(second=0, microsecond=0)


def count_write(
    session: Session,
    *,
    limit: int,
    address: str | None,
    bearer: str | None = None,
    session_token: str | None = None,
    now: datetime | None = None,
) -> WriteCount:
    """Count one write in the current minute against its caller, in one statement; `allowed` says whether it is
    within `limit`.

    The caller is the user behind a live bearer token (else a live session cookie), so one person's writes share a
    budget however many tokens or browsers they use; anyone else, including a forged credential, counts against
    the client address.
    """
    now = now or utcnow()
    window = window_of(now)
    by_address = literal(f"write:addr:{address or 'unknown'}", String)
    owner = identity.credential_owner(bearer=bearer, session_token=session_token)
    key: Any = by_address if owner is None else func.coalesce(
        literal("write:user:", String) + cast(owner.scalar_subquery(), String), by_address
    )
    table = RateLimitBucket
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    window_value = literal(window, UTCDateTime())
    # `>=`: a process whose clock runs a little behind keeps counting in the newer window instead of resetting it.
    current = table.window_start >= window_value
    statement = (
        insert(table)
        .values(key=key, window_start=window, count=1)
        .on_conflict_do_update(
            index_elements=[table.key],
            set_={"count": case((current, table.count + 1), else_=1),
                  "window_start": case((current, table.window_start), else_=window_value)},
        )
        .returning(table.key, table.count, table.window_start)
    )
    key_, count, window_start = session.execute(statement).one()
    retry_after = max(1, math.ceil((window_start + WINDOW - now).total_seconds()))
    return WriteCount(key=key_, count=int(count), limit=limit, retry_after=retry_after)


def prune_buckets(session: Session, *, now: datetime | None = None) -> int:
    """Delete the buckets of windows that are over; how many went."""
    cutoff = window_of(now or utcnow()) - WINDOW
    result = session.execute(delete(RateLimitBucket).where(RateLimitBucket.window_start < cutoff))
    return int(getattr(result, "rowcount", 0) or 0)


@jobs.handler("rate_limit_prune", writes=True)
def rate_limit_prune(session: Session, payload: dict[str, Any]) -> None:
    """The periodic job that keeps `rate_limit_bucket` down to the callers of the last minutes."""
    prune_buckets(session)
