"""Rate-limit counters, shared by every app process through the database."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from labcommons.db import Base, UTCDateTime


class RateLimitBucket(Base):
    """Requests counted for one key (a user or a client address, and a kind of request) in a fixed window."""

    __tablename__ = "rate_limit_bucket"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(UTCDateTime)
    count: Mapped[int] = mapped_column(default=0)
