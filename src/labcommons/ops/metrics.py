"""Prometheus metrics: request latency, requests in flight, bookings created, the job queue, the database pool.

With several worker processes every process writes its values to files in PROMETHEUS_MULTIPROC_DIR and a scrape,
whichever process answers it, adds them up (prometheus_client's multiprocess mode). The variable must be set
before prometheus_client is first imported by the process: `observability.use_metrics_dir` does that, and this
module must be imported only after it (observability imports it lazily).

The job queue is read from the database at scrape time, so it is the same whichever process answers.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import event, func, inspect, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool

from labcommons.booking.models import Booking
from labcommons.db import Database, transaction_within, utcnow
from labcommons.notifications.models import Job, JobStatus

log = logging.getLogger("labcommons.metrics")

MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
# Our own registry, not prometheus_client's global one: in multiprocess mode a scrape reads the files instead, and
# in one process /metrics shows exactly what is defined here.
REGISTRY = CollectorRegistry(auto_describe=True)

# Around the booking target (p99 under 50 ms) the buckets are dense; the tail shows what pages and reports cost.
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUEST_DURATION = Histogram(
    "labcommons_http_request_duration_seconds",
    "Time from the request's arrival to the end of its response, by method, route template and status class.",
    ("method", "route", "status"), buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
REQUESTS_IN_FLIGHT = Gauge(
    "labcommons_http_requests_in_flight", "Requests being served now, summed over the live worker processes.",
    multiprocess_mode="livesum", registry=REGISTRY,
)
BOOKINGS_CREATED = Counter(
    "labcommons_bookings_created", "Bookings committed to the database, by status at creation and kind.",
    ("status", "kind"), registry=REGISTRY,
)
DB_POOL_IN_USE = Gauge(
    "labcommons_db_pool_connections_in_use",
    "Database connections checked out of the processes' pools now, summed over the live worker processes.",
    multiprocess_mode="livesum", registry=REGISTRY,
)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")

# Histogram children by label values: labels() validates and locks on every call, a dict lookup does not.
_children: dict[tuple[str, str, str], Any] = {}


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    """Record one finished request in the latency histogram."""
    status_class = _STATUS_CLASSES[min(max(status // 100, 1), 5) - 1]
    key = (method if method in METHODS else "other", route, status_class)
    child = _children.get(key)
    if child is None:
        child = _children[key] = REQUEST_DURATION.labels(*key)
    child.observe(seconds)


# --- bookings, counted when their transaction commits ------------------------------------------------------------

_NEW_BOOKINGS = "labcommons_metrics_new_bookings"


def _enum_value(value: Any) -> str:
    return str(getattr(value, "value", value))


def _after_flush(session: Session, flush_context: Any) -> None:
    new = [obj for obj in session.new if isinstance(obj, Booking)]
    if not new:
        return
    # The innermost transaction: rolling back a savepoint forgets the bookings flushed inside it.
    transaction = session.get_nested_transaction() or session.get_transaction()
    pending = session.info.setdefault(_NEW_BOOKINGS, [])
    for booking in new:
        # From the instance's state, never through attribute access (no SQL inside a flush event).
        values = inspect(booking).dict
        pending.append((transaction, _enum_value(values.get("status")), _enum_value(values.get("kind", "use"))))


def _after_commit(session: Session) -> None:
    if session.in_nested_transaction():  # a savepoint released; the outer transaction may still roll back
        return
    for _transaction, status, kind in session.info.pop(_NEW_BOOKINGS, ()):
        BOOKINGS_CREATED.labels(status, kind).inc()


def _after_soft_rollback(session: Session, previous_transaction: Any) -> None:
    pending = session.info.get(_NEW_BOOKINGS)
    if pending and previous_transaction.nested:
        session.info[_NEW_BOOKINGS] = [p for p in pending if not transaction_within(p[0], previous_transaction)]


def _after_transaction_end(session: Session, transaction: Any) -> None:
    if transaction.parent is None:  # rolled back or closed: what it flushed was never committed
        session.info.pop(_NEW_BOOKINGS, None)


def _pool_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    DB_POOL_IN_USE.inc()


def _pool_checkin(dbapi_connection: Any, record: Any) -> None:
    DB_POOL_IN_USE.dec()


def _listen() -> None:
    """Hook every session and every pool of the process (idempotent)."""
    if event.contains(Session, "after_flush", _after_flush):
        return
    event.listen(Session, "after_flush", _after_flush)
    event.listen(Session, "after_commit", _after_commit)
    event.listen(Session, "after_soft_rollback", _after_soft_rollback)
    event.listen(Session, "after_transaction_end", _after_transaction_end)
    event.listen(Pool, "checkout", _pool_checkout)
    event.listen(Pool, "checkin", _pool_checkin)


_listen()


# --- scraping ----------------------------------------------------------------------------------------------------


def job_queue(db: Database, now: datetime | None = None) -> tuple[dict[str, int], float]:
    """Jobs by status and the age in seconds of the oldest queued job that is due (0 when none), in one query."""
    now = now or utcnow()
    with db.session() as session:
        rows = session.execute(
            select(Job.status, func.count(), func.min(Job.run_after)).group_by(Job.status)
        ).all()
        session.rollback()
    counts = {status.value: 0 for status in JobStatus}
    oldest_age = 0.0
    for status, count, earliest in rows:
        counts[_enum_value(status)] = int(count)
        if status == JobStatus.queued and earliest is not None:
            oldest_age = max(0.0, (now - earliest).total_seconds())
    return counts, oldest_age


class _ScrapeTime(Collector):
    """Families computed for one scrape: the job queue, read from the database just before."""

    def __init__(self, queue: tuple[dict[str, int], float] | None, own: CollectorRegistry | None) -> None:
        self.queue = queue
        self.own = own

    def collect(self) -> Iterator[Metric]:
        if self.own is not None:
            yield from self.own.collect()
        up = GaugeMetricFamily("labcommons_metrics_database_up",
                               "1 when the scrape could read the job queue from the database.")
        up.add_metric([], 1.0 if self.queue is not None else 0.0)
        yield up
        if self.queue is None:
            return
        counts, oldest_age = self.queue
        jobs = GaugeMetricFamily("labcommons_jobs", "Jobs in the queue table by status.", labels=["status"])
        for status, count in sorted(counts.items()):
            jobs.add_metric([status], float(count))
        yield jobs
        age = GaugeMetricFamily("labcommons_job_oldest_queued_age_seconds",
                                "How long the oldest due job has been waiting for a worker (0: none waiting).")
        age.add_metric([], oldest_age)
        yield age


def _process_gone(pid: int) -> bool:
    """Whether no live process has this id (a zombie, killed and not yet reaped by its parent, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    try:
        # Linux: the state follows the command, which is in parentheses and may hold spaces.
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


def _forget_dead_processes(path: str) -> None:
    """Drop the live gauges (in flight, pool in use) of worker processes that are gone, however they ended.

    A crashed or killed worker never says so; its files name its pid, and a scrape on the same host can see that
    no such process is left. Counters and histograms of dead workers stay: their counts happened."""
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        pid_text = os.path.basename(name).rsplit("_", 1)[-1].removesuffix(".db")
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _process_gone(int(pid_text)):
            multiprocess.mark_process_dead(int(pid_text), path)


def exposition(db: Database | None) -> bytes:
    """The text exposition of every metric, added up over the worker processes when there are several."""
    queue = None
    if db is not None:
        try:
            queue = job_queue(db)
        except Exception:
            log.warning("metrics: could not read the job queue", exc_info=True)
    registry = CollectorRegistry(auto_describe=False)
    if MULTIPROCESS_DIR:
        _forget_dead_processes(MULTIPROCESS_DIR)
        multiprocess.MultiProcessCollector(registry, path=MULTIPROCESS_DIR)
        registry.register(_ScrapeTime(queue, None))
    else:
        registry.register(_ScrapeTime(queue, REGISTRY))
    return generate_latest(registry)
