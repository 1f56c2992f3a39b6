"""Audit tables: the append-only entries and the head of their hash chain."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from labcommons.db import Base, UTCDateTime


class _RecordFields:
    """The fields of a change, shared by chained entries and pending records (deferred sealing)."""

    at: Mapped[datetime] = mapped_column(UTCDateTime)
    # "user", "token" (an API token), "system" (jobs, sweeps) or "cli".
    actor_kind: Mapped[str] = mapped_column(String(16))
    client_ip: Mapped[str | None] = mapped_column(String(64))
    # "<entity>.created", "<entity>.updated", "<entity>.deleted", or a named event such as "login".
    action: Mapped[str] = mapped_column(String(64))
    entity_type: Mapped[str] = mapped_column(String(40))
    entity_id: Mapped[str] = mapped_column(String(80))
    # Where the entity lives, so a region authority reads its region's log and facilities their own.
    region_code: Mapped[str | None] = mapped_column(String(8))
    institution_id: Mapped[int | None] = mapped_column()
    facility_id: Mapped[int | None] = mapped_column()
    # Canonical JSON {"before": {...}, "after": {...}}; personal data appears only as keyed digests.
    changes: Mapped[str] = mapped_column(Text)


class AuditEntry(_RecordFields, Base):
    """One state change. `hash` chains it to the entry before (see audit.chain); nothing updates or deletes it."""

    __tablename__ = "audit_entry"
    __table_args__ = (
        Index("ix_audit_entry_region_seq", "region_code", "seq"),
        Index("ix_audit_entry_entity", "entity_type", "entity_id"),
    )

    # The position in the chain: 1, 2, 3, … without gaps, given under the head's lock at commit.
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    # The user who acted, by id only (their name and e-mail live in user_account, which deletion pseudonymises).
    actor_id: Mapped[int | None] = mapped_column(index=True)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The chain's last position and hash; one row. Taking it for update serialises the appends."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class AuditPending(_RecordFields, Base):
    """A change recorded at its commit but not yet in the chain (deferred sealing, see audit.seal).

    Appending to the one chain at every commit makes all writers queue on the head row; with deferred sealing a
    commit only inserts here, each row carrying its own HMAC, and a sealer moves the rows into the chain in order.
    """

    __tablename__ = "audit_pending"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    actor_id: Mapped[int | None] = mapped_column()
    # HMAC of the fields above under the audit key, so a row changed before sealing is found out.
    mac: Mapped[str] = mapped_column(String(64))
