"""The hash chain: each entry's HMAC covers its content and the hash before it, so a changed, removed or
reordered entry breaks every hash after it; verification walks the chain in order."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from labcommons.audit.models import AuditEntry, AuditHead
from labcommons.config import get_settings

GENESIS = "0" * 64
HEAD_ID = 1


def audit_key() -> bytes:
    """The chain's HMAC key: the audit key setting, else one derived from the secret key."""
    settings = get_settings()
    if settings.audit_key:
        return settings.audit_key.encode()
    return hashlib.sha256(b"labcommons-audit:" + settings.secret_key.encode()).digest()


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: one spelling per value, so the hash is reproducible."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def entry_hash(key: bytes, prev_hash: str, seq: int, at: datetime, actor_id: int | None, actor_kind: str,
               client_ip: str | None, action: str, entity_type: str, entity_id: str, region_code: str | None,
               institution_id: int | None, facility_id: int | None, changes: str) -> str:
    """The HMAC-SHA256 of one entry's fields and the previous hash."""
    fields = [prev_hash, seq, at.isoformat(timespec="microseconds"), actor_id, actor_kind, client_ip, action,
              entity_type, entity_id, region_code, institution_id, facility_id, changes]
    return hmac.new(key, canonical_json(fields).encode(), hashlib.sha256).hexdigest()


def hash_of(key: bytes, entry: AuditEntry) -> str:
    """The hash an entry should carry given its stored fields."""
    return entry_hash(key, entry.prev_hash, entry.seq, entry.at, entry.actor_id, entry.actor_kind, entry.client_ip,
                      entry.action, entry.entity_type, entry.entity_id, entry.region_code, entry.institution_id,
                      entry.facility_id, entry.changes)


@dataclass
class Problem:
    seq: int | None
    # "changed", "missing", "unlinked", "head_mismatch", "anchor_mismatch", "anchor_missing"
    kind: str
    detail: str


@dataclass
class VerifyReport:
    entries: int = 0
    last_seq: int = 0
    last_hash: str = GENESIS
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _entries(session: Session, batch: int) -> Iterator[AuditEntry]:
    after = 0
    while True:
        rows = session.scalars(select(AuditEntry).where(AuditEntry.seq > after).order_by(AuditEntry.seq)
                               .limit(batch)).all()
        if not rows:
            return
        yield from rows
        after = rows[-1].seq
        session.expunge_all()


def verify(session: Session, *, anchors: list[tuple[int, str]] | None = None, batch: int = 5000,
           max_problems: int = 100, progress: Any = None) -> VerifyReport:
    """Walk the whole chain and report every entry whose hash, link or position is wrong.

    `anchors` are (seq, hash) pairs published earlier: each must still be in the chain, which catches a tail cut
    off together with the head, or a chain rewritten by someone holding the key."""
    key = audit_key()
    expected_anchor = dict(anchors or [])
    report = VerifyReport()
    expected_seq, prev = 1, GENESIS

    def problem(seq: int | None, kind: str, detail: str) -> None:
        if len(report.problems) < max_problems:
            report.problems.append(Problem(seq, kind, detail))

    for entry in _entries(session, batch):
        if entry.seq != expected_seq:
            problem(expected_seq, "missing", f"entries {expected_seq}..{entry.seq - 1} are missing")
        if entry.prev_hash != prev:
            problem(entry.seq, "unlinked", "its previous hash is not the hash of the entry before it")
        if not hmac.compare_digest(hash_of(key, entry), entry.hash):
            problem(entry.seq, "changed", "its content does not match its hash")
        if entry.seq in expected_anchor and expected_anchor.pop(entry.seq) != entry.hash:
            problem(entry.seq, "anchor_mismatch", "its hash differs from the published anchor")
        prev, expected_seq = entry.hash, entry.seq + 1
        report.entries += 1
        report.last_seq, report.last_hash = entry.seq, entry.hash
        if progress is not None:
            progress(1)
    for seq in sorted(expected_anchor):
        problem(seq, "anchor_missing", "the published anchor's entry is not in the chain")
    from labcommons.audit.seal import pending_problems  # seal builds on capture, which imports this module

    for pending_id, detail in pending_problems(session):
        problem(None, "pending_changed", f"pending record {pending_id}: {detail}")
    head = session.get(AuditHead, HEAD_ID)
    head_seq, head_hash = (head.seq, head.hash) if head else (0, GENESIS)
    if (head_seq, head_hash) != (report.last_seq, report.last_hash):
        problem(head_seq, "head_mismatch",
                f"the head says entry {head_seq} is last, the chain ends at {report.last_seq}")
    return report
