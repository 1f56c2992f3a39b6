"""`labcommons worker` processes that crash, run long, or race each other: a job survives its worker's death and
takes effect once.

Workers beat every 0.3 s and count as dead after 2 s of silence, while job_stale_minutes is an hour: a job that is
recovered within seconds was recovered by the heartbeat rule (see tests/reliability/support.py `worker_env`).
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text

from labcommons import jobs
from labcommons.db import Database, utcnow
from labcommons.notifications.models import Job, JobStatus, JobWorker
from tests.reliability.support import CountingSmtp, job_rows, wait_until, worker_env, workers

DEAD_SECONDS = 2.0  # worker_env's job_worker_dead_seconds


def job(db: Database, job_id: int) -> Job:
    with db.unit_of_work(write=False) as session:
        return session.get_one(Job, job_id)


def worker_row(db: Database, worker_id: str) -> JobWorker | None:
    with db.unit_of_work(write=False) as session:
        return session.get(JobWorker, worker_id)


def mail_job(db: Database, subject: str, to: str = "alice@example.org") -> int:
    with db.unit_of_work() as session:
        job_id = jobs.enqueue(session, "send_mail", {"to": to, "subject": subject, "text": f"Body of {subject}"})
    assert job_id is not None
    return job_id


@pytest.mark.slow
@pytest.mark.xdist_group("servers")
def test_a_worker_killed_while_sending_leaves_the_mail_to_another_that_sends_it_once(
        db: Database, db_url: str) -> None:
    subject = "Held at the server, then the sender dies"
    with CountingSmtp() as smtp:
        smtp.stall(subject)
        job_id = mail_job(db, subject)
        # Both start together (the SMTP client gives up after 30 s, so no worker start-up may fall in between);
        # whichever claims the mail is the one to die.
        with workers(["one", "two"], worker_env(db_url, smtp.port)) as started:
            # The sender has handed the message over and waits for the server's answer, which never comes.
            assert smtp.recorder.stalled.wait(120)
            held = job(db, job_id)
            [victim] = [w for w in started if w.name == held.locked_by]
            [rescuer] = [w for w in started if w is not victim]
            assert held.locked_at is not None
            wait_until(lambda: worker_row(db, rescuer.name) is not None, 60, "the other worker to register")
            rescuer_row = worker_row(db, rescuer.name)
            assert rescuer_row is not None
            # A live worker stuck in a send for longer than the dead limit keeps its job: the other worker polls
            # and runs its recovery all along, while the sender's heartbeat thread keeps beating.
            beaten_after = max(held.locked_at + timedelta(seconds=DEAD_SECONDS + 1),
                               rescuer_row.started_at + timedelta(seconds=1))
            wait_until(lambda: _beat_after(db, victim.name, beaten_after), 20,
                       "the sender to beat past the dead limit while it waits")
            still = job(db, job_id)
            assert (still.status, still.locked_by, still.attempts) == (JobStatus.running, victim.name, 1)
            victim.kill()  # before the server accepted the message
            killed_at = utcnow()
            wait_until(lambda: job(db, job_id).status == JobStatus.done, 60, "the other worker to send it")
        done = job(db, job_id)
        assert (done.status, done.locked_by, done.attempts) == (JobStatus.done, rescuer.name, 2)
        assert done.finished_at is not None
        # Recovered by the heartbeat rule, not by job_stale_minutes (an hour here).
        assert done.finished_at - killed_at < timedelta(minutes=5)
        assert smtp.subjects()[subject] == 1


def _beat_after(db: Database, worker_id: str, moment: datetime) -> bool:
    row = worker_row(db, worker_id)
    return row is not None and row.heartbeat_at > moment


def _blocked_deletes(db: Database) -> list[int]:
    """PostgreSQL backends of this database waiting for a row lock in a DELETE on the job table."""
    with db.engine.connect() as connection:
        return list(connection.scalars(text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
            "AND query ILIKE 'DELETE FROM job %'")))


def _backend_alive(db: Database, pid: int) -> bool:
    with db.engine.connect() as connection:
        return bool(connection.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}))


@pytest.mark.slow
@pytest.mark.xdist_group("servers")
def test_a_writing_job_killed_mid_run_leaves_nothing_and_runs_again_once(
        db: Database, db_url: str, tmp_path: Path) -> None:
    if db.is_sqlite:
        pytest.skip("needs a row lock to stop the worker mid-transaction; SQLite locks the whole database")
    now = utcnow()
    # What the booking sweep (a writes=True handler) prunes, in two statements: old done jobs, then old failed ones.
    with db.unit_of_work() as session:
        for key, status, age in (("old-done", JobStatus.done, 8), ("old-failed", JobStatus.failed, 31)):
            moment = now - timedelta(days=age)
            session.add(Job(kind="send_mail", payload="{}", dedupe_key=key, status=status, attempts=1,
                            max_attempts=5, run_after=moment, created_at=moment, finished_at=moment,
                            last_error=""))

    def remaining() -> list[str]:
        with db.unit_of_work(write=False) as session:
            return sorted(k or "" for k in session.scalars(select(Job.dedupe_key).where(Job.dedupe_key.like("old-%"))))

    with CountingSmtp() as smtp:
        env = worker_env(db_url, smtp.port)
        # The test holds the old failed job's row: the sweep deletes the done one, then waits at the failed one.
        holder = db.engine.connect()
        held = holder.begin()
        holder.execute(select(Job.id).where(Job.dedupe_key == "old-failed").with_for_update())
        try:
            with workers(["first"], env) as [first]:
                wait_until(lambda: bool(_blocked_deletes(db)), 120, "the sweep to block halfway")
                [backend] = _blocked_deletes(db)
                [sweep] = [j for j in job_rows_of(db, "booking_sweep") if j.status == JobStatus.running]
                assert (sweep.locked_by, sweep.attempts) == ("first", 1)
                first.kill()
        finally:
            held.rollback()
            holder.close()
        # The killed worker's transaction ends with a rollback once PostgreSQL finds its client gone.
        wait_until(lambda: not _backend_alive(db, backend), 60, "the killed worker's transaction to end")
        assert remaining() == ["old-done", "old-failed"]  # nothing of the half-run sweep stayed
        assert job(db, sweep.id).status == JobStatus.running
        with workers(["second"], env):
            wait_until(lambda: job(db, sweep.id).status == JobStatus.done, 60, "the sweep to run again")
    again = job(db, sweep.id)
    assert (again.status, again.locked_by, again.attempts) == (JobStatus.done, "second", 2)
    assert remaining() == []


def job_rows_of(db: Database, kind: str) -> list[Job]:
    with db.unit_of_work(write=False) as session:
        return job_rows(session, (kind,))


@pytest.mark.slow
@pytest.mark.xdist_group("servers")
def test_three_workers_racing_over_sixty_mails_send_each_exactly_once(db: Database, db_url: str) -> None:
    names = ["a", "b", "c"]
    with CountingSmtp() as smtp:
        with workers(names, worker_env(db_url, smtp.port)):
            # Queue the mails once every worker polls, so that they race for them.
            wait_until(lambda: all(worker_row(db, n) is not None for n in names), 120, "the workers to register")
            ids = [mail_job(db, f"race {n}", to=f"user{n}@example.org") for n in range(60)]
            wait_until(lambda: all(job(db, i).status == JobStatus.done for i in ids), 120, "every mail to go")
        assert smtp.subjects() == Counter({f"race {n}": 1 for n in range(60)})
    with db.unit_of_work(write=False) as session:
        rows = [session.get_one(Job, i) for i in ids]
    # Attempts 1: no job was claimed twice, however the claims interleaved.
    assert {(r.status, r.attempts) for r in rows} == {(JobStatus.done, 1)}
    by_worker = Counter(r.locked_by for r in rows)
    assert set(by_worker) <= set(names)
    print(f"mails sent per worker: {dict(by_worker)}")
    assert len(by_worker) >= 2, by_worker  # it was a race, not one worker draining the queue alone
