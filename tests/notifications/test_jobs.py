"""The job queue in the database: dedupe, retries with backoff, stale locks, parallel workers, the app runner."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from labcommons import jobs
from labcommons.app import create_app
from labcommons.db import Database, utcnow
from labcommons.notifications.models import Job, JobStatus, JobWorker
from tests.test_mail import settings_env

_calls: Counter[str] = Counter()
_failures_left: dict[str, int] = {}
_lock = threading.Lock()


@jobs.handler("test_echo")
def _echo(session: Any, payload: dict[str, Any]) -> None:
    with _lock:
        if _failures_left.get(payload["name"], 0) > 0:
            _failures_left[payload["name"]] -= 1
            raise ConnectionError("the service is down")
        _calls[payload["name"]] += 1


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    _calls.clear()
    _failures_left.clear()
    # Worker threads here also run the periodic jobs; match_refresh would load the embedding model (seconds of CPU
    # and memory) where it is installed, and a stop() would time out waiting for it.
    with settings_env(matching_embeddings="false"):
        yield


def all_jobs(db: Database) -> list[Job]:
    with db.unit_of_work(write=False) as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def put(db: Database, name: str, **kw: Any) -> int | None:
    with db.unit_of_work() as session:
        return jobs.enqueue(session, "test_echo", {"name": name}, **kw)


def test_enqueue_is_idempotent_on_the_dedupe_key(db: Database) -> None:
    first = put(db, "a", dedupe_key="k1")
    assert first is not None
    assert put(db, "a", dedupe_key="k1") is None
    assert put(db, "b") is not None and put(db, "b") is not None  # no key, no dedupe
    assert [j.dedupe_key for j in all_jobs(db)] == ["k1", None, None]


def test_a_rolled_back_transaction_enqueues_nothing(db: Database) -> None:
    with pytest.raises(RuntimeError), db.unit_of_work() as session:
        jobs.enqueue(session, "test_echo", {"name": "x"}, dedupe_key="x")
        raise RuntimeError("the change failed")
    assert all_jobs(db) == []


def test_runner_runs_each_job_once_and_then_nothing(db: Database) -> None:
    put(db, "a", dedupe_key="a")
    stats = jobs.run_pending(db, "w1")
    assert (stats.done, stats.retried, stats.failed) == (1, 0, 0)
    assert jobs.run_pending(db, "w1").total == 0
    assert _calls == Counter({"a": 1})
    [job] = all_jobs(db)
    assert job.status == JobStatus.done and job.attempts == 1 and job.finished_at is not None
    assert job.locked_at is None


def test_jobs_wait_for_their_run_after(db: Database) -> None:
    now = utcnow()
    put(db, "later", run_after=now + timedelta(hours=2))
    assert jobs.run_pending(db, "w", now=now).total == 0
    assert jobs.run_pending(db, "w", now=now + timedelta(hours=2)).done == 1


def test_a_failure_is_retried_with_backoff(db: Database) -> None:
    _failures_left["flaky"] = 2
    put(db, "flaky")
    now = utcnow()
    assert jobs.run_pending(db, "w", now=now).retried == 1
    [job] = all_jobs(db)
    assert job.status == JobStatus.queued and job.attempts == 1 and "service is down" in job.last_error
    assert job.run_after == now + jobs.backoff(1)
    assert jobs.run_pending(db, "w", now=now).total == 0  # not due yet
    second = now + jobs.backoff(1)
    assert jobs.run_pending(db, "w", now=second).retried == 1
    assert all_jobs(db)[0].run_after == second + jobs.backoff(2) == second + 2 * jobs.backoff(1)
    assert jobs.run_pending(db, "w", now=second + jobs.backoff(2)).done == 1
    assert _calls == Counter({"flaky": 1})
    assert all_jobs(db)[0].attempts == 3


def test_after_max_attempts_the_job_fails(db: Database) -> None:
    _failures_left["doomed"] = 99
    with db.unit_of_work() as session:
        jobs.enqueue(session, "test_echo", {"name": "doomed"}, max_attempts=3)
    moment = utcnow()
    for _ in range(3):
        jobs.run_pending(db, "w", now=moment)
        moment += timedelta(days=1)
    [job] = all_jobs(db)
    assert job.status == JobStatus.failed and job.attempts == 3 and "ConnectionError" in job.last_error
    assert job.finished_at is not None
    assert jobs.run_pending(db, "w", now=moment + timedelta(days=30)).total == 0


def test_an_unknown_kind_fails_at_once(db: Database) -> None:
    with db.unit_of_work() as session:
        jobs.enqueue(session, "no_such_kind", {})
    assert jobs.run_pending(db, "w").failed == 1
    assert "no handler" in all_jobs(db)[0].last_error


def test_a_stale_lock_is_recovered(db: Database) -> None:
    put(db, "orphan")
    now = utcnow()
    claimed = jobs.claim_next(db, "dead-worker", now=now)  # the worker dies before running it
    assert claimed is not None and all_jobs(db)[0].status == JobStatus.running
    assert jobs.requeue_stale(db, now=now + timedelta(minutes=1)) == 0  # still within the limit
    later = now + timedelta(minutes=16)
    assert jobs.requeue_stale(db, now=later, older_than=timedelta(minutes=15)) == 1
    job = all_jobs(db)[0]
    assert job.status == JobStatus.queued and job.locked_by is None
    assert jobs.run_pending(db, "alive", now=later).done == 1
    assert _calls == Counter({"orphan": 1})
    # The presumed-dead worker waking up finds the job gone: it neither runs it again nor marks it.
    assert jobs.run_claimed(db, claimed, "dead-worker", now=later) == JobStatus.running
    assert _calls == Counter({"orphan": 1})
    job = all_jobs(db)[0]
    assert job.status == JobStatus.done and job.locked_by == "alive" and job.attempts == 2


def test_a_stale_job_out_of_attempts_fails(db: Database) -> None:
    with db.unit_of_work() as session:
        jobs.enqueue(session, "test_echo", {"name": "x"}, max_attempts=1)
    now = utcnow()
    jobs.claim_next(db, "dead", now=now)
    jobs.requeue_stale(db, now=now + timedelta(hours=1))
    job = all_jobs(db)[0]
    assert job.status == JobStatus.failed and "stopped" in job.last_error


def test_two_workers_in_parallel_run_every_job_exactly_once(db: Database) -> None:
    for n in range(20):
        put(db, f"job{n}", dedupe_key=f"job{n}")
    start = threading.Barrier(2)
    results: list[jobs.RunStats] = []

    def work(name: str) -> None:
        start.wait()
        results.append(jobs.run_pending(db, name))

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sum(r.done for r in results) == 20
    assert _calls == Counter({f"job{n}": 1 for n in range(20)})
    with db.unit_of_work(write=False) as session:
        assert session.scalar(select(func.count()).where(Job.status == JobStatus.done)) == 20
        assert set(session.scalars(select(Job.locked_by))) <= {"w0", "w1"}


def test_worker_thread_picks_up_committed_jobs_and_stops(db: Database) -> None:
    worker = jobs.Worker(db, "bg", poll_seconds=30)
    worker.start()
    try:
        put(db, "woken")  # the commit wakes the worker long before its 30-second poll
        for _ in range(200):
            if _calls["woken"]:
                break
            threading.Event().wait(0.02)
        assert _calls == Counter({"woken": 1})
    finally:
        worker.stop()
    assert not worker.running


def test_app_lifespan_starts_and_stops_the_in_process_runner(db: Database) -> None:
    app = create_app(db=db, run_jobs=True)
    with TestClient(app):
        runner = app.state.job_runner
        assert runner.running
        put(db, "via-app")
        for _ in range(200):
            if _calls["via-app"]:
                break
            threading.Event().wait(0.02)
        assert _calls["via-app"] == 1
    assert not runner.running


def test_apps_given_a_database_run_no_jobs_unless_asked(db: Database) -> None:
    app = create_app(db=db)
    with TestClient(app):
        assert not hasattr(app.state, "job_runner")
    with settings_env(jobs_in_process="false"):
        switched_off = create_app(db=db, run_jobs=True)
        with TestClient(switched_off):
            assert not hasattr(switched_off.state, "job_runner")


_slow_started = threading.Event()


@jobs.handler("test_slow")
def _slow(session: Any, payload: dict[str, Any]) -> None:
    session.scalar(select(func.count()).select_from(Job))  # handlers may read while they work
    _slow_started.set()
    time.sleep(1.0)
    with _lock:
        _calls["slow"] += 1


def test_a_slow_handler_does_not_block_other_writers(db: Database) -> None:
    _slow_started.clear()
    with db.unit_of_work() as session:
        jobs.enqueue(session, "test_slow", {})
    runner = threading.Thread(target=jobs.run_pending, args=(db, "slow-worker"))
    runner.start()
    try:
        assert _slow_started.wait(10)
        began = time.monotonic()
        put(db, "meanwhile")  # any write: on SQLite it needs the database's write lock
        waited = time.monotonic() - began
    finally:
        runner.join(30)
    assert waited < 0.5
    assert _calls["slow"] == 1
    slow = [j for j in all_jobs(db) if j.kind == "test_slow"]
    assert [(j.status, j.attempts, j.locked_by) for j in slow] == [(JobStatus.done, 1, "slow-worker")]


def test_the_claim_is_committed_before_the_handler_runs(db: Database) -> None:
    seen: list[tuple[JobStatus, str | None, int]] = []

    @jobs.handler("test_peek")
    def _peek(session: Any, payload: dict[str, Any]) -> None:
        with db.unit_of_work(write=False) as other:  # another connection sees only committed state
            job = other.scalars(select(Job).where(Job.kind == "test_peek")).one()
            seen.append((job.status, job.locked_by, job.attempts))

    with db.unit_of_work() as session:
        jobs.enqueue(session, "test_peek", {})
    assert jobs.run_pending(db, "peeker").done == 1
    assert seen == [(JobStatus.running, "peeker", 1)]


def test_a_job_taken_away_while_it_ran_is_not_marked_by_its_old_worker(db: Database) -> None:
    put(db, "slowpoke")
    now = utcnow()
    claimed = jobs.claim_next(db, "old", now=now)
    assert claimed is not None

    @jobs.handler("test_echo_stolen")
    def _stolen(session: Any, payload: dict[str, Any]) -> None:
        jobs.requeue_stale(db, now=now + timedelta(hours=1))  # presumed dead mid-run; the job is given back

    stolen = jobs.ClaimedJob(claimed.id, "test_echo_stolen", claimed.payload, claimed.attempts, claimed.max_attempts)
    assert jobs.run_claimed(db, stolen, "old", now=now) == JobStatus.done
    [job] = all_jobs(db)
    assert job.status == JobStatus.queued and job.locked_by is None  # not marked done by the worker that lost it


def test_prune_deletes_old_finished_jobs_only(db: Database) -> None:
    now = utcnow()
    ages = {"done-old": (JobStatus.done, 8), "done-new": (JobStatus.done, 6),
            "cancelled-old": (JobStatus.cancelled, 8), "failed-old": (JobStatus.failed, 31),
            "failed-mid": (JobStatus.failed, 8), "queued-old": (JobStatus.queued, 60),
            "running-old": (JobStatus.running, 60)}
    with db.unit_of_work() as session:
        for name, (status, days) in ages.items():
            moment = now - timedelta(days=days)
            finished = moment if status in (JobStatus.done, JobStatus.failed) else None
            session.add(Job(kind="test_echo", payload="{}", dedupe_key=name, status=status, attempts=1,
                            max_attempts=5, run_after=moment, created_at=moment, finished_at=finished,
                            last_error=""))
    with db.unit_of_work() as session:
        assert jobs.prune(session, now) == 3
    assert sorted(j.dedupe_key or "" for j in all_jobs(db)) == [
        "done-new", "failed-mid", "queued-old", "running-old"]


# --- worker heartbeats and prompt recovery ---------------------------------------------------------------------


def workers_by_id(db: Database) -> dict[str, JobWorker]:
    with db.unit_of_work(write=False) as session:
        return {w.worker_id: w for w in session.scalars(select(JobWorker))}


def test_a_worker_registers_beats_and_records_its_stop(db: Database) -> None:
    t0 = utcnow()
    jobs.register_worker(db, "w1", now=t0)
    registered = workers_by_id(db)["w1"]
    assert (registered.started_at, registered.heartbeat_at, registered.stopped_at) == (t0, t0, None)
    assert registered.pid > 0 and registered.host
    jobs.beat(db, "w1", now=t0 + timedelta(seconds=5))
    assert workers_by_id(db)["w1"].heartbeat_at == t0 + timedelta(seconds=5)
    jobs.mark_stopped(db, "w1", now=t0 + timedelta(seconds=9))
    assert workers_by_id(db)["w1"].stopped_at == t0 + timedelta(seconds=9)


@pytest.mark.parametrize("silent_for, recovered", [(29, 0), (31, 1)])
def test_the_job_of_a_silent_worker_is_requeued_after_the_dead_limit_not_the_stale_one(
        db: Database, silent_for: int, recovered: int) -> None:
    put(db, "orphan")
    t0 = utcnow()
    with settings_env(job_worker_dead_seconds=30, job_stale_minutes=15):
        jobs.register_worker(db, "crashed", now=t0)
        claimed = jobs.claim_next(db, "crashed", now=t0)  # the claim beats too; then the worker dies
        assert claimed is not None and claimed.attempts == 1
        assert jobs.requeue_stale(db, now=t0 + timedelta(seconds=silent_for)) == recovered
    [job] = all_jobs(db)
    if not recovered:
        assert (job.status, job.locked_by) == (JobStatus.running, "crashed")
        return
    assert (job.status, job.locked_by, job.attempts) == (JobStatus.queued, None, 1)
    assert jobs.run_pending(db, "alive", now=t0 + timedelta(seconds=silent_for)).done == 1
    assert _calls == Counter({"orphan": 1})
    assert [(j.status, j.attempts, j.locked_by) for j in all_jobs(db)] == [(JobStatus.done, 2, "alive")]


def test_the_job_of_a_stopped_worker_is_requeued_at_once(db: Database) -> None:
    put(db, "cut-off")
    t0 = utcnow()
    jobs.register_worker(db, "leaving", now=t0)
    assert jobs.claim_next(db, "leaving", now=t0) is not None
    jobs.mark_stopped(db, "leaving", now=t0)  # e.g. Ctrl-C in the middle of a handler
    assert jobs.requeue_stale(db, now=t0) == 1
    assert all_jobs(db)[0].status == JobStatus.queued


def test_a_dead_workers_job_out_of_attempts_fails(db: Database) -> None:
    with db.unit_of_work() as session:
        jobs.enqueue(session, "test_echo", {"name": "last"}, max_attempts=1)
    t0 = utcnow()
    jobs.register_worker(db, "crashed", now=t0)
    jobs.claim_next(db, "crashed", now=t0)
    assert jobs.requeue_stale(db, now=t0 + timedelta(hours=1)) == 1
    [job] = all_jobs(db)
    assert (job.status, job.attempts) == (JobStatus.failed, 1) and "stopped" in job.last_error


def test_a_live_workers_job_is_never_taken_however_long_it_runs(db: Database) -> None:
    put(db, "long")
    t0 = utcnow()
    jobs.register_worker(db, "busy", now=t0)
    jobs.claim_next(db, "busy", now=t0)
    # Hours later the worker still beats: neither the dead limit nor job_stale_minutes applies to it.
    jobs.beat(db, "busy", now=t0 + timedelta(hours=3))
    assert jobs.requeue_stale(db, now=t0 + timedelta(hours=3, seconds=1)) == 0
    assert all_jobs(db)[0].status == JobStatus.running


def test_a_worker_restarted_under_the_same_id_gives_back_its_earlier_runs_jobs(db: Database) -> None:
    put(db, "before-restart")
    t0 = utcnow()
    jobs.register_worker(db, "w1", now=t0)
    jobs.claim_next(db, "w1", now=t0)
    assert jobs.register_worker(db, "w1", now=t0 + timedelta(seconds=1)) == 1  # the restart, beating afresh
    job = all_jobs(db)[0]
    assert (job.status, job.locked_by, job.attempts) == (JobStatus.queued, None, 1)
    assert workers_by_id(db)["w1"].stopped_at is None


_long_started = threading.Event()
_long_release = threading.Event()


@jobs.handler("test_long")
def _long(session: Any, payload: dict[str, Any]) -> None:
    _long_started.set()
    assert _long_release.wait(60), "the test never released the long job"
    with _lock:
        _calls["long"] += 1


def test_a_worker_running_a_long_handler_keeps_beating_and_keeps_its_job(db: Database) -> None:
    _long_started.clear()
    _long_release.clear()
    with db.unit_of_work() as session:
        job_id = jobs.enqueue(session, "test_long", {})
    with settings_env(job_heartbeat_seconds=0.1, job_worker_dead_seconds=0.5):
        worker = jobs.Worker(db, "long-runner", poll_seconds=0.1)
        worker.start()
        try:
            assert _long_started.wait(30)
            with db.unit_of_work(write=False) as session:
                claimed_at = session.get_one(Job, job_id).locked_at
            assert claimed_at is not None
            # Wait for beats sent well after the dead limit would have passed, had the handler stopped them.
            deadline = claimed_at + timedelta(seconds=1.5)
            for _ in range(600):
                if workers_by_id(db)["long-runner"].heartbeat_at > deadline:
                    break
                time.sleep(0.05)
            assert workers_by_id(db)["long-runner"].heartbeat_at > deadline
            assert jobs.requeue_stale(db) == 0  # what every other worker's loop runs
            with db.unit_of_work(write=False) as session:
                job = session.get_one(Job, job_id)
                assert (job.status, job.locked_by, job.attempts) == (JobStatus.running, "long-runner", 1)
        finally:
            _long_release.set()
            worker.stop(timeout=30)
    assert not worker.running
    with db.unit_of_work(write=False) as session:
        job = session.get_one(Job, job_id)
        assert (job.status, job.attempts) == (JobStatus.done, 1)
    assert _calls["long"] == 1
    assert workers_by_id(db)["long-runner"].stopped_at is not None  # the clean exit is recorded


_writes_seen: list[int] = []
_writes_db: list[Database] = []


@jobs.handler("test_writes", writes=True)
def _writes(session: Any, payload: dict[str, Any]) -> None:
    session.add(Job(kind="test_echo", payload="{}", dedupe_key=f"written:{payload['n']}", status=JobStatus.done,
                    attempts=1, max_attempts=1, run_after=utcnow(), created_at=utcnow(), last_error=""))
    session.flush()
    # Meanwhile another worker decides this one is dead: the row it would requeue is held by this transaction,
    # so it skips it (on SQLite no other writer can even start until this transaction ends).
    _writes_seen.append(jobs.requeue_stale(_writes_db[0], now=utcnow() + timedelta(days=1)))


def test_a_writes_job_in_progress_is_not_taken_from_a_presumed_dead_worker(db: Database) -> None:
    if db.is_sqlite:
        pytest.skip("SQLite serialises writers: no recovery can start while the handler's transaction is open")
    _writes_seen.clear()
    _writes_db[:] = [db]
    t0 = utcnow()
    with db.unit_of_work() as session:
        job_id = jobs.enqueue(session, "test_writes", {"n": 1}, run_after=t0 - timedelta(hours=2))
    jobs.register_worker(db, "slow-w", now=t0 - timedelta(hours=1))
    claimed = jobs.claim_next(db, "slow-w", now=t0 - timedelta(hours=1))
    assert claimed is not None and claimed.id == job_id
    assert jobs.run_claimed(db, claimed, "slow-w") == JobStatus.done
    assert _writes_seen == [0]
    with db.unit_of_work(write=False) as session:
        job = session.get_one(Job, job_id)
        assert (job.status, job.attempts) == (JobStatus.done, 1)
        assert session.scalar(select(func.count()).where(Job.dedupe_key == "written:1")) == 1


def test_prune_drops_the_rows_of_workers_gone_for_a_day(db: Database) -> None:
    now = utcnow()
    jobs.register_worker(db, "live", now=now - timedelta(days=3))
    jobs.beat(db, "live", now=now)
    jobs.register_worker(db, "stopped-long-ago", now=now - timedelta(days=2))
    jobs.mark_stopped(db, "stopped-long-ago", now=now - timedelta(days=2))
    jobs.register_worker(db, "stopped-now", now=now - timedelta(hours=1))
    jobs.mark_stopped(db, "stopped-now", now=now)
    jobs.register_worker(db, "silent", now=now - timedelta(days=2))
    with db.unit_of_work() as session:
        assert jobs.prune(session, now) == 2
    assert sorted(workers_by_id(db)) == ["live", "stopped-now"]


def test_queue_depth_and_the_oldest_due_jobs_wait(db: Database) -> None:
    now = utcnow()
    with db.unit_of_work(write=False) as session:
        assert jobs.queue_depth(session) == {s.value: 0 for s in JobStatus}
        assert jobs.oldest_queued_age_seconds(session, now) == 0.0
    put(db, "due-long-ago", run_after=now - timedelta(seconds=90))
    put(db, "due-now", run_after=now)
    put(db, "later", run_after=now + timedelta(hours=1))  # not due: not waiting yet
    put(db, "done", run_after=now - timedelta(hours=2))
    jobs.claim_next(db, "w", now=now)  # the oldest due one ("done") ...
    with db.unit_of_work() as session:
        session.execute(update(Job).where(Job.status == JobStatus.running).values(status=JobStatus.done))
    jobs.claim_next(db, "w", now=now)  # ... and "due-long-ago" is running now
    with db.unit_of_work(write=False) as session:
        assert jobs.queue_depth(session) == {"queued": 2, "running": 1, "done": 1, "failed": 0, "cancelled": 0}
        assert jobs.oldest_queued_age_seconds(session, now + timedelta(seconds=10)) == 10.0
