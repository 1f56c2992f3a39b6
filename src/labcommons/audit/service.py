"""Reading the audit log: who may read which region's entries, filtered pages of entries, chain verification."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.audit import chain
from labcommons.audit.models import AuditEntry
from labcommons.errors import Forbidden, InvalidInput
from labcommons.identity import roles
from labcommons.identity.models import Role, User
from labcommons.identity.roles import Action

MAX_LIMIT = 200


@dataclass(frozen=True)
class AuditQuery:
    region_code: str | None = None
    entity_type: str | None = None
    entity_id: str | None = None
    actor_id: int | None = None
    # A prefix: "booking." gives every booking change, "login" the sign-ins.
    action: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    # Keyset paging: entries older than this position.
    before_seq: int | None = None
    limit: int = 50


@dataclass(frozen=True)
class EntryView:
    seq: int
    at: datetime
    actor_id: int | None
    actor_name: str | None
    actor_kind: str
    client_ip: str | None
    action: str
    entity_type: str
    entity_id: str
    region_code: str | None
    institution_id: int | None
    facility_id: int | None
    before: dict[str, Any]
    after: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass
class AuditPage:
    entries: list[EntryView] = field(default_factory=list)
    # Pass as before_seq for the next (older) page; None on the last page.
    next_before_seq: int | None = None


def readable_regions(actor: Actor) -> set[str] | None:
    """The regions whose log the actor reads: None for all (platform admins), else their authorities' regions."""
    if roles.authorize(actor, Action.verify_audit_log):
        return None
    regions = {g.region_code for g in actor.grants if g.role == Role.region_authority and g.region_code}
    if not regions:
        raise Forbidden("Reading the audit log needs the region authority or platform administrator role.")
    return regions


def sees_addresses(actor: Actor) -> bool:
    """Client addresses are personal data: platform administrators see them, region authorities do not."""
    return roles.authorize(actor, Action.verify_audit_log)


def list_entries(session: Session, actor: Actor, query: AuditQuery) -> AuditPage:
    """The newest entries matching `query` that the actor may read, newest first."""
    regions = readable_regions(actor)
    if query.region_code is not None:
        roles.require(actor, Action.view_audit_log, region_code=query.region_code)
    if not 1 <= query.limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}.", field="limit")
    stmt = select(AuditEntry).order_by(AuditEntry.seq.desc()).limit(query.limit + 1)
    if query.region_code is not None:
        stmt = stmt.where(AuditEntry.region_code == query.region_code)
    elif regions is not None:
        stmt = stmt.where(AuditEntry.region_code.in_(sorted(regions)))
    if query.entity_type:
        stmt = stmt.where(AuditEntry.entity_type == query.entity_type)
    if query.entity_id:
        stmt = stmt.where(AuditEntry.entity_id == query.entity_id)
    if query.actor_id is not None:
        stmt = stmt.where(AuditEntry.actor_id == query.actor_id)
    if query.action:
        escaped = query.action.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = stmt.where(AuditEntry.action.like(f"{escaped}%", escape="\\"))
    if query.since is not None:
        stmt = stmt.where(AuditEntry.at >= query.since)
    if query.until is not None:
        stmt = stmt.where(AuditEntry.at < query.until)
    if query.before_seq is not None:
        stmt = stmt.where(AuditEntry.seq < query.before_seq)
    rows = list(session.scalars(stmt))
    page = AuditPage()
    if len(rows) > query.limit:
        rows = rows[: query.limit]
        page.next_before_seq = rows[-1].seq
    actor_ids = {row.actor_id for row in rows if row.actor_id is not None}
    names = dict(session.execute(select(User.id, User.name).where(User.id.in_(actor_ids))).all()) \
        if actor_ids else {}
    addresses = sees_addresses(actor)
    for row in rows:
        changes = json.loads(row.changes)
        page.entries.append(EntryView(
            seq=row.seq, at=row.at, actor_id=row.actor_id, actor_name=names.get(row.actor_id or 0),
            actor_kind=row.actor_kind, client_ip=row.client_ip if addresses else None, action=row.action,
            entity_type=row.entity_type, entity_id=row.entity_id, region_code=row.region_code,
            institution_id=row.institution_id, facility_id=row.facility_id, before=changes.get("before", {}),
            after=changes.get("after", {}), prev_hash=row.prev_hash, hash=row.hash,
        ))
    return page


def parse_anchor(text: str) -> tuple[int, str]:
    """An anchor published earlier, written SEQ:HASH."""
    seq, _, digest = text.partition(":")
    if not seq.isdigit() or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise InvalidInput("An anchor is written SEQ:HASH (the output of `labcommons audit head`).", field="anchor")
    return int(seq), digest


def verify(session: Session, actor: Actor | None, *, anchors: list[tuple[int, str]] | None = None,
           progress: Any = None) -> chain.VerifyReport:
    """Verify the whole chain (platform administrators; `actor` None is the command line)."""
    if actor is not None:
        roles.require(actor, Action.verify_audit_log)
    return chain.verify(session, anchors=anchors or [], progress=progress)


def head(session: Session) -> tuple[int, str]:
    """The chain's last position and hash, to publish somewhere the database's writers cannot change."""
    from labcommons.audit.models import AuditHead

    row = session.get(AuditHead, chain.HEAD_ID)
    return (row.seq, row.hash) if row else (0, chain.GENESIS)
