"""Background jobs: a queue in our own database, handlers by kind, retries with backoff, and a polling worker.

Why a table and not a broker: one mechanism on SQLite and PostgreSQL, jobs are enqueued in the same transaction
as the change they announce (a rolled-back booking never mails), and there is no extra service to run.
PostgreSQL workers claim with SELECT ... FOR UPDATE SKIP LOCKED; SQLite claims inside BEGIN IMMEDIATE.

Delivery is at least once. A handler that only sends (e-mail) runs after its claim is committed, with no write
transaction open, and "done" is recorded in a second short transaction: a crash or database error after the mail
was handed to SMTP and before that commit sends it again. Handlers registered with `writes=True` do their
database work and the "done" mark in one transaction instead, so they take effect exactly once.

Workers register in `job_worker` and beat every `job_heartbeat_seconds` from a thread of their own (a long handler
does not stop the beats). A running job whose worker stopped, or has been silent for `job_worker_dead_seconds`, is
queued again by the next loop of any worker; `job_stale_minutes` remains the limit for jobs of workers with no row.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, event, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from labcommons.config import get_settings
from labcommons.db import Database, utcnow
from labcommons.notifications.models import Job, JobStatus, JobWorker

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
# Rows of workers that stopped or fell silent this long ago are pruned (their jobs were recovered long before).
KEEP_WORKERS = timedelta(days=1)
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


@dataclass(frozen=True)
class JobSpec:
    """A job to queue: what `enqueue` takes, as a value, so several can be queued in one statement."""

    kind: str
    payload: dict[str, Any]
    dedupe_key: str | None = None
    run_after: datetime | None = None
    max_attempts: int | None = None


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
    ids = enqueue_many(session, [JobSpec(kind, payload, dedupe_key, run_after, max_attempts)])
    return ids[0] if ids else None


def enqueue_many(session: Session, specs: Sequence[JobSpec]) -> list[int]:
    """Queue several jobs with one INSERT (a booking's notification and reminder, say); the ids of those queued,
    leaving out any whose dedupe_key already exists."""
    if not specs:
        return []
    settings = get_settings()
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    now = utcnow()
    rows = [
        dict(kind=spec.kind, payload=json.dumps(spec.payload, default=str, ensure_ascii=False),
             dedupe_key=spec.dedupe_key, status=JobStatus.queued, attempts=0,
             max_attempts=spec.max_attempts or settings.job_max_attempts, run_after=spec.run_after or now,
             last_error="", created_at=now)
        for spec in specs
    ]
    statement = (
        insert(Job).values(rows).on_conflict_do_nothing(index_elements=[Job.dedupe_key]).returning(Job.id)
    )
    ids = [int(i) for i in session.execute(statement).scalars()]
    if ids:
        session.info[_ENQUEUED_KEY] = True
    return ids


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


def _orphaned(now: datetime, stale_cutoff: datetime) -> Any:
    """Running jobs whose worker is gone: it stopped or fell silent, or (no row at all) the lock is too old."""
    dead_cutoff = now - timedelta(seconds=get_settings().job_worker_dead_seconds)
    known = select(JobWorker.worker_id)
    alive = known.where(JobWorker.stopped_at.is_(None), JobWorker.heartbeat_at >= dead_cutoff)
    return (Job.status == JobStatus.running) & or_(
        Job.locked_by.in_(known) & Job.locked_by.not_in(alive),
        (or_(Job.locked_by.is_(None), Job.locked_by.not_in(known))) & (Job.locked_at < stale_cutoff),
    )


def _give_back(session: Session, ids: list[int], now: datetime) -> tuple[int, int]:
    """Queue the given running jobs again at once, failing those out of attempts; (requeued, failed)."""
    if not ids:
        return 0, 0
    failed = session.execute(
        update(Job).where(Job.id.in_(ids), Job.attempts >= Job.max_attempts).values(
            status=JobStatus.failed, finished_at=now, locked_at=None, locked_by=None,
            last_error="the worker stopped while running it",
        )
    ).rowcount  # type: ignore[attr-defined]
    requeued = session.execute(
        update(Job).where(Job.id.in_(ids), Job.status == JobStatus.running)
        .values(status=JobStatus.queued, run_after=now, locked_at=None, locked_by=None)
    ).rowcount  # type: ignore[attr-defined]
    return int(requeued), int(failed)


def requeue_stale(db: Database, *, now: datetime | None = None, older_than: timedelta | None = None) -> int:
    """Give back the running jobs of dead workers (stopped, or no heartbeat for `job_worker_dead_seconds`, or with
    no row and locked longer than `job_stale_minutes`); those out of attempts fail. How many were recovered."""
    now = now or utcnow()
    orphaned = _orphaned(now, now - (older_than or timedelta(minutes=get_settings().job_stale_minutes)))
    # A read first: every worker loop runs this, and on SQLite a write transaction would take the write lock.
    with db.unit_of_work(write=False) as session:
        if session.scalar(select(Job.id).where(orphaned).limit(1)) is None:
            return 0
    with db.unit_of_work() as session:
        query = select(Job.id).where(orphaned).order_by(Job.id)
        if not db.is_sqlite:
            # A row still locked is being finished by a `writes=True` handler, or by the open transaction of a
            # killed worker that PostgreSQL has not noticed yet; it is decided when that transaction ends.
            query = query.with_for_update(skip_locked=True, of=Job)
        requeued, failed = _give_back(session, list(session.scalars(query)), now)
    if failed or requeued:
        log.warning("recovered jobs of dead workers: %d requeued, %d failed", requeued, failed)
    return requeued + failed


# --- worker registrations and heartbeats -----------------------------------------------------------------------


def register_worker(db: Database, worker_id: str, *, now: datetime | None = None) -> int:
    """Record the worker as started and alive; jobs still locked under its id belong to an earlier run of it (a
    worker restarted with the same `--id`) and are given back. How many were."""
    now = now or utcnow()
    with db.unit_of_work() as session:
        _upsert_worker(session, worker_id, now)
        query = select(Job.id).where(Job.status == JobStatus.running, Job.locked_by == worker_id)
        if not db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        requeued, failed = _give_back(session, list(session.scalars(query)), now)
    if requeued or failed:
        log.warning("worker %s: %d jobs of its earlier run requeued, %d failed", worker_id, requeued, failed)
    return requeued + failed


def _upsert_worker(session: Session, worker_id: str, now: datetime) -> None:
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    values = dict(host=socket.gethostname(), pid=os.getpid(), started_at=now, heartbeat_at=now, stopped_at=None)
    session.execute(
        insert(JobWorker).values(worker_id=worker_id, **values)
        .on_conflict_do_update(index_elements=[JobWorker.worker_id], set_=values)
    )


def beat(db: Database, worker_id: str, *, now: datetime | None = None) -> None:
    """Record that the worker is alive (re-registering it if its row was pruned while it was suspended)."""
    now = now or utcnow()
    with db.unit_of_work() as session:
        updated = session.execute(
            update(JobWorker).where(JobWorker.worker_id == worker_id, JobWorker.stopped_at.is_(None))
            .values(heartbeat_at=now)
        ).rowcount  # type: ignore[attr-defined]
        if not updated:
            _upsert_worker(session, worker_id, now)


def mark_stopped(db: Database, worker_id: str, *, now: datetime | None = None) -> None:
    """Record a clean exit: whatever it still had running is recovered by the next loop of another worker."""
    now = now or utcnow()
    with db.unit_of_work() as session:
        session.execute(update(JobWorker).where(JobWorker.worker_id == worker_id)
                        .values(stopped_at=now, heartbeat_at=now))


class Heartbeat:
    """Beats for one worker from a daemon thread, so a handler running for minutes does not make it look dead."""

    def __init__(self, db: Database, worker_id: str, interval: float | None = None) -> None:
        self.db = db
        self.worker_id = worker_id
        self.interval = interval if interval is not None else get_settings().job_heartbeat_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"labcommons-heartbeat-{worker_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                beat(self.db, self.worker_id)
            except Exception:  # the database is away; the next beat tries again
                log.warning("job worker %s: heartbeat failed", self.worker_id, exc_info=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=max(self.interval, 1.0) + 35.0)


@contextmanager
def registered(db: Database, worker_id: str) -> Iterator[None]:
    """Register the worker, keep its heartbeat while the block runs, and mark it stopped when the block ends."""
    try:
        register_worker(db, worker_id)
    except Exception:  # the heartbeat thread registers it once the database answers
        log.exception("job worker %s: could not register", worker_id)
    heartbeat = Heartbeat(db, worker_id)
    heartbeat.start()
    try:
        yield
    finally:
        heartbeat.stop()
        try:
            mark_stopped(db, worker_id)
        except Exception:  # without the mark its jobs are recovered job_worker_dead_seconds later instead
            log.exception("job worker %s: could not record its stop", worker_id)


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
        # A beat with every claim too: a worker whose heartbeat thread was held up (on SQLite, by the write lock
        # its own `writes=True` handler held) is never presumed dead with a job it has just claimed.
        session.execute(update(JobWorker).where(JobWorker.worker_id == worker_id, JobWorker.stopped_at.is_(None))
                        .values(heartbeat_at=now))
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
    """Delete done and cancelled jobs older than 7 days, failed ones older than 30, and the rows of workers gone
    for a day; how many rows went."""
    now = now or utcnow()
    finished = func.coalesce(Job.finished_at, Job.created_at)
    removed = 0
    for statuses, age in (((JobStatus.done, JobStatus.cancelled), KEEP_FINISHED), ((JobStatus.failed,), KEEP_FAILED)):
        result = session.execute(delete(Job).where(Job.status.in_(statuses), finished < now - age))
        removed += int(result.rowcount)  # type: ignore[attr-defined]
    gone = session.execute(delete(JobWorker).where(or_(JobWorker.stopped_at < now - KEEP_WORKERS,
                                                       JobWorker.heartbeat_at < now - KEEP_WORKERS)))
    removed += int(gone.rowcount)  # type: ignore[attr-defined]
    return removed


def queue_depth(session: Session) -> dict[str, int]:
    """How many jobs are in each status (every status named, zero when none)."""
    counts: dict[JobStatus, int] = {status: n for status, n in session.execute(
        select(Job.status, func.count()).group_by(Job.status))}
    return {status.value: int(counts.get(status, 0)) for status in JobStatus}


def oldest_queued_age_seconds(session: Session, now: datetime | None = None) -> float:
    """Seconds the longest-waiting due job has waited since it became due (0.0 when none is due)."""
    now = now or utcnow()
    oldest = session.scalar(
        select(func.min(Job.run_after)).where(Job.status == JobStatus.queued, Job.run_after <= now)
    )
    if oldest is None:
        return 0.0
    return max(0.0, (now - oldest).total_seconds())


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
        """Loop in the calling thread until stop() is called, registered and beating all along."""
        load_handlers()
        with registered(self.db, self.worker_id):
            self._loop()

    def _loop(self) -> None:
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
