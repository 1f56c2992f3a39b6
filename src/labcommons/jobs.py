"""Background jobs: a queue in our own database, handlers by kind, retries with backoff, and a polling worker.

Why a table and not a broker: one mechanism on SQLite and PostgreSQL, jobs are enqueued in the same transaction
as the change they announce (a rolled-back booking never mails), and there is no extra service to run.
PostgreSQL workers claim with SELECT ... FOR UPDATE SKIP LOCKED; SQLite claims inside BEGIN IMMEDIATE.

Delivery is at least once. A handler that only sends (e-mail) runs after its claim is committed, with no write
transaction open, and "done" is recorded in a second short transaction: a crash or database error after the mail
was handed to SMTP and before that commit, or a run longer than `job_stale_minutes`, sends it again. Handlers
registered with `writes=True` do their database work and the "done" mark in one transaction instead.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, event, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from labcommons.config import get_settings
from labcommons.db import Database, utcnow
from labcommons.notifications.models import Job, JobStatus

log = logging.getLogger("labcommons.jobs")

Handler = Callable[[Session, dict[str, Any]], None]


@dataclass(frozen=True)
class _Registered:
    run: Handler
    # The payload is wiped once the job is finished (it may hold a password-reset link).
    sensitive: bool = False
    # Database work: runs in the write transaction that marks the job done. Otherwise the handler gets a read
    # session (rolled back afterwards) and runs with no write lock held, so a slow SMTP server blocks no writer.
    writes: bool = False


_HANDLERS: dict[str, _Registered] = {}
# Modules whose import registers handlers; loaded before a worker runs so every kind is known.
HANDLER_MODULES = (
    "labcommons.notifications.service", "labcommons.booking.sweeps", "labcommons.orders.notify",
    "labcommons.matching.index", "labcommons.reporting.aggregate", "labcommons.security.service",
)
# Jobs every worker loop makes sure exist once per interval: (kind, seconds). The dedupe key names the interval,
# so however many workers run, each sweep runs once per interval.
PERIODIC: tuple[tuple[str, int], ...] = (
    ("booking_sweep", 60), ("match_refresh", 60), ("stat_refresh", 60), ("rate_limit_prune", 600),
)
# How long finished jobs are kept for inspection before the sweep prunes them (failed ones are worth a longer look).
KEEP_FINISHED = timedelta(days=7)
KEEP_FAILED = timedelta(days=30)
_ENQUEUED_KEY = "labcommons_jobs_enqueued"
# Set after a commit that enqueued work, so an in-process worker picks it up without waiting for its poll.
_wake = threading.Event()


def handler(kind: str, *, sensitive: bool = False, writes: bool = False) -> Callable[[Handler], Handler]:
    """Register the function that runs jobs of `kind`; it gets a session and the decoded payload.

    Only `writes=True` handlers get a session whose changes are committed (with the job's "done" mark).
    """

    def register(fn: Handler) -> Handler:
        _HANDLERS[kind] = _Registered(fn, sensitive, writes)
        return fn

    return register


def load_handlers() -> None:
    for module in HANDLER_MODULES:
        importlib.import_module(module)


def enqueue(
    session: Session,
    kind: str,
    payload: dict[str, Any],
    *,
    dedupe_key: str | None = None,
    run_after: datetime | None = None,
    max_attempts: int | None = None,
) -> int | None:
    """Queue a job in the session's transaction; the id, or None when a job with `dedupe_key` already exists."""
    settings = get_settings()
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    now = utcnow()
    statement = (
        insert(Job)
        .values(
            kind=kind, payload=json.dumps(payload, default=str, ensure_ascii=False), dedupe_key=dedupe_key,
            status=JobStatus.queued, attempts=0, max_attempts=max_attempts or settings.job_max_attempts,
            run_after=run_after or now, last_error="", created_at=now,
        )
        .on_conflict_do_nothing(index_elements=[Job.dedupe_key])
        .returning(Job.id)
    )
    job_id = session.execute(statement).scalar_one_or_none()
    if job_id is not None:
        session.info[_ENQUEUED_KEY] = True
    return job_id


@event.listens_for(Session, "after_commit")
def _wake_after_commit(session: Session) -> None:
    if not session.in_nested_transaction() and session.info.pop(_ENQUEUED_KEY, False):
        _wake.set()


@event.listens_for(Session, "after_rollback")
def _forget_after_rollback(session: Session) -> None:
    if session.get_nested_transaction() is None:
        session.info.pop(_ENQUEUED_KEY, None)


# --- running -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    kind: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int


@dataclass
class RunStats:
    done: int = 0
    retried: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        return self.done + self.retried + self.failed


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def backoff(attempts: int) -> timedelta:
    """The wait before retry number `attempts`: doubling from the base, capped (no jitter, so tests can step)."""
    settings = get_settings()
    seconds = min(settings.job_retry_max_seconds, settings.job_retry_base_seconds * 2 ** max(0, attempts - 1))
    return timedelta(seconds=seconds)


def requeue_stale(db: Database, *, now: datetime | None = None, older_than: timedelta | None = None) -> int:
    """Give back jobs whose worker died mid-run (locked longer than the limit); those out of attempts fail."""
    now = now or utcnow()
    cutoff = now - (older_than or timedelta(minutes=get_settings().job_stale_minutes))
    stale = (Job.status == JobStatus.running) & (Job.locked_at < cutoff)
    with db.unit_of_work() as session:
        failed = session.execute(
            update(Job).where(stale, Job.attempts >= Job.max_attempts).values(
                status=JobStatus.failed, finished_at=now, locked_at=None, locked_by=None,
                last_error="the worker stopped while running it",
            )
        ).rowcount  # type: ignore[attr-defined]
        requeued = session.execute(
            update(Job).where(stale).values(status=JobStatus.queued, run_after=now, locked_at=None, locked_by=None)
        ).rowcount  # type: ignore[attr-defined]
    if failed or requeued:
        log.warning("recovered stale jobs: %d requeued, %d failed", requeued, failed)
    return int(requeued) + int(failed)


def claim_next(db: Database, worker_id: str, *, now: datetime | None = None) -> ClaimedJob | None:
    """Take the oldest due job for this worker (committed as running), or None when nothing is due."""
    now = now or utcnow()
    with db.unit_of_work() as session:
        query = (
            select(Job)
            .where(Job.status == JobStatus.queued, Job.run_after <= now)
            .order_by(Job.run_after, Job.id)
            .limit(1)
        )
        if not db.is_sqlite:
            # Other workers skip the row we hold instead of waiting for it; SQLite's BEGIN IMMEDIATE serialises.
            query = query.with_for_update(skip_locked=True)
        job = session.scalars(query).first()
        if job is None:
            return None
        job.status = JobStatus.running
        job.attempts += 1
        job.locked_at = now
        job.locked_by = worker_id
        return ClaimedJob(job.id, job.kind, json.loads(job.payload or "{}"), job.attempts, job.max_attempts)


def _mine(job_id: int, worker_id: str) -> Any:
    return (Job.id == job_id) & (Job.status == JobStatus.running) & (Job.locked_by == worker_id)


def _record(db: Database, job_id: int, worker_id: str, values: dict[str, Any]) -> bool:
    """Write a job's outcome in its own short transaction if it is still this worker's; whether it was."""
    with db.unit_of_work() as session:
        result = session.execute(update(Job).where(_mine(job_id, worker_id)).values(**values))
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def run_claimed(db: Database, job: ClaimedJob, worker_id: str, *, now: datetime | None = None) -> JobStatus:
    """Run a claimed job; then done, or queued again with backoff, or failed.

    Returns `running` when the job is no longer this worker's (it was presumed dead and the job given away).
    """
    now = now or utcnow()
    registered = _HANDLERS.get(job.kind)
    done: dict[str, Any] = dict(status=JobStatus.done, finished_at=now, locked_at=None, last_error="")
    if registered is not None and registered.sensitive:
        done["payload"] = "{}"
    try:
        if registered is None:
            raise LookupError(f"no handler for job kind {job.kind!r}")
        if registered.writes:
            with db.unit_of_work() as session:
                # The job's row is held for the whole run, so the work and the "done" mark commit together.
                held = session.execute(update(Job).where(_mine(job.id, worker_id)).values(locked_at=now))
                if held.rowcount != 1:  # type: ignore[attr-defined]
                    log.warning("job %s was taken from worker %s before it ran; skipped", job.id, worker_id)
                    return JobStatus.running
                registered.run(session, job.payload)
                session.execute(update(Job).where(_mine(job.id, worker_id)).values(**done))
            return JobStatus.done
        # Renewing the lock is the last check that the job is ours: a worker that was presumed dead finds it gone
        # instead of sending a second time, and stale recovery leaves it alone for the next job_stale_minutes.
        if not _record(db, job.id, worker_id, dict(locked_at=now)):
            log.warning("job %s was taken from worker %s before it ran; skipped", job.id, worker_id)
            return JobStatus.running
        # No write transaction while the handler sends: on SQLite it would hold the database's write lock.
        with db.session() as session:
            registered.run(session, job.payload)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:2000]
        final = registered is None or job.attempts >= job.max_attempts
        values: dict[str, Any] = dict(locked_at=None, locked_by=None, last_error=error)
        if final:
            values.update(status=JobStatus.failed, finished_at=now)
            if registered is not None and registered.sensitive:
                values["payload"] = "{}"
            log.error("job %s (%s) failed for good after %d attempts: %s", job.id, job.kind, job.attempts, error)
        else:
            values.update(status=JobStatus.queued, run_after=now + backoff(job.attempts))
            log.warning("job %s (%s) attempt %d failed, will retry: %s", job.id, job.kind, job.attempts, error)
        _record(db, job.id, worker_id, values)
        return JobStatus.failed if final else JobStatus.queued
    # Outside the try: if this commit fails after a send, the job stays running and stale recovery retries it.
    if not _record(db, job.id, worker_id, done):
        log.warning("job %s was taken from worker %s while it ran", job.id, worker_id)
    return JobStatus.done


def prune(session: Session, now: datetime | None = None) -> int:
    """Delete done and cancelled jobs older than 7 days and failed ones older than 30; how many went."""
    now = now or utcnow()
    finished = func.coalesce(Job.finished_at, Job.created_at)
    removed = 0
    for statuses, age in (((JobStatus.done, JobStatus.cancelled), KEEP_FINISHED), ((JobStatus.failed,), KEEP_FAILED)):
        result = session.execute(delete(Job).where(Job.status.in_(statuses), finished < now - age))
        removed += int(result.rowcount)  # type: ignore[attr-defined]
    return removed


def run_once(db: Database, worker_id: str, *, now: datetime | None = None) -> JobStatus | None:
    """Claim and run one due job; its resulting status, or None when nothing was due."""
    load_handlers()
    job = claim_next(db, worker_id, now=now)
    if job is None:
        return None
    return run_claimed(db, job, worker_id, now=now)


def schedule_periodic(db: Database, *, now: datetime | None = None) -> int:
    """Queue this interval's run of every periodic job (a no-op where it is queued already); how many were new."""
    now = now or utcnow()
    added = 0
    with db.unit_of_work() as session:
        for kind, seconds in PERIODIC:
            bucket = int(now.timestamp()) // seconds
            if enqueue(session, kind, {"bucket": bucket}, dedupe_key=f"{kind}:{bucket}", run_after=now) is not None:
                added += 1
    return added


def run_pending(db: Database, worker_id: str | None = None, *, limit: int = 100,
                now: datetime | None = None) -> RunStats:
    """Run up to `limit` due jobs, one at a time; what happened to them."""
    worker_id = worker_id or default_worker_id()
    stats = RunStats()
    for _ in range(limit):
        status = run_once(db, worker_id, now=now)
        if status is None:
            break
        if status == JobStatus.done:
            stats.done += 1
        elif status == JobStatus.queued:
            stats.retried += 1
        elif status == JobStatus.failed:
            stats.failed += 1
    return stats


class Worker:
    """Polls the queue until stopped: runs due jobs, recovers stale locks, sleeps when idle."""

    def __init__(
        self,
        db: Database,
        worker_id: str | None = None,
        *,
        poll_seconds: float | None = None,
        batch: int = 50,
        on_batch: Callable[[RunStats], None] | None = None,
    ) -> None:
        self.db = db
        self.worker_id = worker_id or default_worker_id()
        self.poll_seconds = poll_seconds if poll_seconds is not None else get_settings().job_poll_seconds
        self.batch = batch
        self.on_batch = on_batch
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Loop in the calling thread until stop() is called."""
        load_handlers()
        while not self.stop_event.is_set():
            stats = RunStats()
            try:
                requeue_stale(self.db)
                schedule_periodic(self.db)
                stats = run_pending(self.db, self.worker_id, limit=self.batch)
            except Exception:  # a database outage must not kill the loop; try again after the poll interval
                log.exception("job worker %s: could not run jobs", self.worker_id)
            if self.on_batch is not None:
                self.on_batch(stats)
            if stats.total < self.batch:
                self._sleep()

    def _sleep(self) -> None:
        # Short slices: the wake event is shared by every worker of the process, so stop_event is checked too.
        deadline = time.monotonic() + self.poll_seconds
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            if _wake.wait(min(0.25, max(0.0, deadline - time.monotonic()))):
                _wake.clear()
                return

    def start(self) -> threading.Thread:
        """Run in a daemon thread (the in-process runner of the embedded default)."""
        self._thread = threading.Thread(target=self.run, name=f"labcommons-jobs-{self.worker_id}", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        _wake.set()  # wake the sleeper now rather than after its poll interval
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
