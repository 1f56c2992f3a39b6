"""Deferred sealing: pending audit records are moved into the hash chain, oldest first, by whoever gets the head.

With `audit_sealing` deferred (the default on PostgreSQL) a commit only inserts its records into audit_pending,
each with its own HMAC, so writers never queue on the chain's head row. A sealer thread in every server and worker
process, and every reader of the log before it reads, chains them: it takes the head row (skipping the round when
another sealer has it), checks each record's HMAC, appends the records in id order and deletes them, in one
transaction. A record is in the chain a second or so after its commit; until then `audit verify` checks its HMAC.
"""

from __future__ import annotations

import hmac
import logging
import threading
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from labcommons.audit.capture import _table, chain_records, pending_mac
from labcommons.audit.chain import HEAD_ID, audit_key
from labcommons.db import Database
from labcommons.errors import DomainError

log = logging.getLogger(__name__)

FIELDS = ("at", "actor_id", "actor_kind", "client_ip", "action", "entity_type", "entity_id", "region_code",
          "institution_id", "facility_id", "changes")


class PendingRecordTampered(DomainError):
    """A pending audit record no longer matches its HMAC: it was changed after its commit."""

    status_code = 409
    code = "audit_record_tampered"


def seal_pending(session: Session, *, limit: int = 5000, wait: bool = True) -> int:
    """Chain up to `limit` pending records under the head's lock; how many. With `wait` false, 0 at once when
    another transaction holds the head (it is sealing, or appending inline)."""
    head = _table("audit_head")
    if session.get_bind().dialect.name == "postgresql":
        locked = session.execute(select(head.c.id).where(head.c.id == HEAD_ID)
                                 .with_for_update(skip_locked=not wait)).first()
        if locked is None and not wait and session.execute(
                select(head.c.id).where(head.c.id == HEAD_ID)).first() is not None:
            return 0
    pending = _table("audit_pending")
    rows = session.execute(select(pending).order_by(pending.c.id).limit(limit)).mappings().all()
    if not rows:
        return 0
    key = audit_key()
    records: list[dict[str, Any]] = []
    for row in rows:
        record = {name: row[name] for name in FIELDS}
        if not hmac.compare_digest(pending_mac(key, record), row["mac"]):
            raise PendingRecordTampered(f"Pending audit record {row['id']} does not match its HMAC.",
                                        field="audit_pending")
        records.append(record)
    chain_records(session, records)
    session.execute(delete(pending).where(pending.c.id.in_([row["id"] for row in rows])))
    return len(rows)


def seal_all(db: Database, *, wait: bool = True, limit: int = 5000) -> int:
    """Seal every pending record, a batch per transaction; how many were sealed."""
    total = 0
    while True:
        with db.unit_of_work() as session:
            sealed = seal_pending(session, limit=limit, wait=wait)
        total += sealed
        if sealed < limit:
            return total


def bring_current(db: Database) -> None:
    """Before the log is read: chain what is pending, so the reader sees every committed change. A tampered
    record stops the sealing there; `audit verify` reports it."""
    try:
        seal_all(db, wait=True)
    except PendingRecordTampered:
        log.error("a pending audit record does not match its HMAC; run `labcommons audit verify`")


def pending_problems(session: Session, *, limit: int = 100) -> list[tuple[int, str]]:
    """(id, detail) of pending records whose HMAC does not match, for `audit verify`."""
    pending = _table("audit_pending")
    key = audit_key()
    bad: list[tuple[int, str]] = []
    for row in session.execute(select(pending).order_by(pending.c.id)).mappings():
        if not hmac.compare_digest(pending_mac(key, {name: row[name] for name in FIELDS}), row["mac"]):
            bad.append((int(row["id"]), "a pending record does not match its HMAC"))
            if len(bad) >= limit:
                break
    return bad


class Sealer:
    """A daemon thread sealing pending records every `interval` seconds until stopped."""

    def __init__(self, db: Database, interval: float) -> None:
        self.db = db
        self.interval = interval
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="audit-sealer", daemon=True)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                seal_all(self.db, wait=False)
            except Exception:  # keep sealing later; the records wait safely in audit_pending
                log.exception("sealing the audit log failed")
            self.stop_event.wait(self.interval)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout)
        try:
            seal_all(self.db, wait=True)  # what this process committed last is chained before it exits
        except Exception:
            log.exception("sealing the audit log at shutdown failed")
