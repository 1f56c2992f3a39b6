"""Idempotent writes: a retry with the same Idempotency-Key gets the first answer, not a second effect."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from labcommons.booking.models import IdempotencyRecord
from labcommons.db import Database
from labcommons.errors import DomainError, InvalidInput

MAX_KEY_LENGTH = 200


class IdempotencyKeyReused(InvalidInput):
    code = "idempotency_key_reused"


@dataclass(frozen=True)
class Outcome:
    status_code: int
    body: Any
    replayed: bool = False


def fingerprint(method: str, path: str, payload: Any) -> str:
    """A stable hash of what a request asks for."""
    raw = json.dumps([method.upper(), path, payload], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()


def _stored(session: Session, user_id: int, key: str, print_: str) -> Outcome | None:
    record = session.scalars(
        select(IdempotencyRecord).where(IdempotencyRecord.user_id == user_id, IdempotencyRecord.key == key)
    ).first()
    if record is None:
        return None
    if record.fingerprint != print_:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was already used for a different request.", field="Idempotency-Key"
        )
    return Outcome(record.status_code, json.loads(record.response_body), replayed=True)


def run_idempotent(
    db: Database,
    user_id: int,
    key: str | None,
    print_: str,
    work: Callable[[Session], Outcome],
) -> Outcome:
    """Run `work` in one write transaction, recording its answer under `key` in that same transaction.

    Rejected requests (domain errors) record nothing and change nothing, so they may be retried. When two
    copies of one request race, the loser finds the winner's record once the winner has committed.
    """
    if key is not None and not (0 < len(key) <= MAX_KEY_LENGTH):
        raise InvalidInput(
            f"The Idempotency-Key must have 1 to {MAX_KEY_LENGTH} characters.", field="Idempotency-Key"
        )
    if key is None:
        with db.unit_of_work() as session:
            return work(session)
    try:
        with db.unit_of_work() as session:
            prior = _stored(session, user_id, key, print_)
            if prior is not None:
                return prior
            outcome = work(session)
            session.add(
                IdempotencyRecord(
                    user_id=user_id, key=key, fingerprint=print_, status_code=outcome.status_code,
                    response_body=json.dumps(outcome.body, default=str),
                )
            )
            session.flush()
            return outcome
    except (DomainError, IntegrityError):
        # A concurrent copy of this request may have won meanwhile: answer as it did.
        with db.unit_of_work(write=False) as session:
            prior = _stored(session, user_id, key, print_)
        if prior is not None:
            return prior
        raise
