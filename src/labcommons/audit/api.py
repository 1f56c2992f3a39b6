"""Audit log endpoints under /api/v1/audit: a region's entries (region authorities, platform administrators) and
the verification of the whole hash chain (platform administrators). Token scope `audit:read`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from labcommons.actor import Actor
from labcommons.audit import seal, service
from labcommons.audit.service import AuditQuery
from labcommons.db import MAX_ID
from labcommons.errors import InvalidInput
from labcommons.http import Db, Instant, require_role_for
from labcommons.identity.roles import Action

router = APIRouter(prefix="/audit", tags=["audit"])

Reader = Annotated[Actor, Depends(require_role_for("audit:read", Action.view_audit_log))]
Verifier = Annotated[Actor, Depends(require_role_for("audit:read", Action.verify_audit_log))]

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API token"},
    403: {"description": "Not a region authority (of that region) or platform administrator, or a token without "
                         "`audit:read`"},
    422: {"description": "Invalid input; `field` names it"},
}


class AuditEntryRead(BaseModel):
    seq: int = Field(description="Position in the hash chain, from 1 without gaps")
    at: datetime
    actor_id: int | None
    actor_name: str | None
    actor_kind: str = Field(description="user, token, anonymous, system or cli")
    client_ip: str | None = Field(description="Shown to platform administrators only")
    action: str = Field(examples=["booking.created", "login"])
    entity_type: str
    entity_id: str
    region_code: str | None
    institution_id: int | None
    facility_id: int | None
    before: dict[str, Any] = Field(description="Changed fields before; personal data as keyed digests")
    after: dict[str, Any]
    prev_hash: str
    hash: str


class AuditPageRead(BaseModel):
    entries: list[AuditEntryRead]
    next_before_seq: int | None = Field(description="Pass as before_seq for older entries; null on the last page")


class ProblemRead(BaseModel):
    seq: int | None
    kind: str
    detail: str


class VerifyRead(BaseModel):
    ok: bool
    entries: int
    last_seq: int
    last_hash: str
    problems: list[ProblemRead]


def _aware(value: datetime | None, name: str) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise InvalidInput(f"{name} needs a UTC offset, e.g. 2026-11-24T08:00:00+08:00.", field=name)
    return value


@router.get("", response_model=AuditPageRead, responses=ERRORS)
def list_audit_entries(
    actor: Reader, db: Db,
    region: Annotated[str | None, Query(max_length=8, description="Region code; default every region you read")]
    = None,
    entity_type: Annotated[str | None, Query(max_length=40, examples=["booking"])] = None,
    entity_id: Annotated[str | None, Query(max_length=80)] = None,
    actor_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    action: Annotated[str | None, Query(max_length=64, description="Prefix, e.g. `booking.` or `login`")] = None,
    since: Annotated[Instant | None, Query(description="From this time (with offset), included")] = None,
    until: Annotated[Instant | None, Query(description="Before this time (with offset)")] = None,
    before_seq: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_LIMIT)] = 50,
) -> AuditPageRead:
    """The newest audit entries you may read, newest first, with keyset paging by `before_seq`."""
    query = AuditQuery(region_code=region, entity_type=entity_type, entity_id=entity_id, actor_id=actor_id,
                       action=action, since=_aware(since, "since"), until=_aware(until, "until"),
                       before_seq=before_seq, limit=limit)
    seal.bring_current(db)
    with db.unit_of_work(write=False) as session:
        page = service.list_entries(session, actor, query)
    return AuditPageRead(entries=[AuditEntryRead(**vars(e)) for e in page.entries],
                         next_before_seq=page.next_before_seq)


@router.get("/verify", response_model=VerifyRead, responses=ERRORS)
def verify_audit_chain(
    actor: Verifier, db: Db,
    anchor: Annotated[list[str] | None, Query(max_length=20, description=(
        "Published anchors SEQ:HASH (from `labcommons audit head`) that must still be in the chain"))] = None,
) -> VerifyRead:
    """Recompute every entry's HMAC and link; report changed, missing or reordered entries."""
    anchors = [service.parse_anchor(a) for a in anchor or []]
    seal.bring_current(db)
    with db.unit_of_work(write=False) as session:
        report = service.verify(session, actor, anchors=anchors)
    return VerifyRead(ok=report.ok, entries=report.entries, last_seq=report.last_seq, last_hash=report.last_hash,
                      problems=[ProblemRead(seq=p.seq, kind=p.kind, detail=p.detail) for p in report.problems])
